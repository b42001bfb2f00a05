#include "trainer/checkpoint/h5_slices.h"

#include <fmt/core.h>
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <optional>
#include <span>
#include <stdexcept>
#include <utility>
#include <vector>

namespace dsx::ckpt::detail {

// The stored types below double as memory types, which is only right on a little-endian host.
static_assert(std::endian::native == std::endian::little, "checkpoint I/O assumes a little-endian host");

namespace {

constexpr const char* kTensorsGroup = "tensors";

// Silences HDF5's automatic error printing while alive (we report errors ourselves) and restores
// whatever handler was installed before. HDF5's error state is per thread in thread-safe builds.
class QuietHdf5 {
 public:
  QuietHdf5() {
    H5Eget_auto2(H5E_DEFAULT, &func_, &data_);
    H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr);
  }
  ~QuietHdf5() { H5Eset_auto2(H5E_DEFAULT, func_, data_); }
  QuietHdf5(const QuietHdf5&) = delete;
  QuietHdf5& operator=(const QuietHdf5&) = delete;

 private:
  H5E_auto2_t func_ = nullptr;
  void* data_ = nullptr;
};

// The innermost description on HDF5's error stack: the most specific reason a call failed.
std::string hdf5_reason() {
  std::string reason;
  auto visit = [](unsigned, const H5E_error2_t* err, void* out) -> herr_t {
    if (err->desc != nullptr && static_cast<std::string*>(out)->empty()) *static_cast<std::string*>(out) = err->desc;
    return 0;
  };
  H5Ewalk2(H5E_DEFAULT, H5E_WALK_UPWARD, visit, &reason);
  H5Eclear2(H5E_DEFAULT);
  return reason.empty() ? "unknown HDF5 error" : reason;
}

[[noreturn]] void fail(const std::filesystem::path& path, const std::string& what) {
  throw std::runtime_error(fmt::format("{}: {}", path.filename().string(), what));
}

hid_t checked(hid_t id, const std::filesystem::path& path, std::string_view what) {
  if (id < 0) fail(path, fmt::format("{} ({})", what, hdf5_reason()));
  return id;
}

void checked(herr_t status, const std::filesystem::path& path, std::string_view what) {
  if (status < 0) fail(path, fmt::format("{} ({})", what, hdf5_reason()));
}

// A narrow IEEE-like float as an HDF5 type: sign bit, exponent and mantissa fields, bias.
H5Id narrow_float_type(size_t bytes, size_t sign_pos, size_t exp_pos, size_t exp_bits, size_t mant_bits, size_t bias) {
  H5Id type(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
  // Order matters: fields first, then precision, then size (HDF5 checks each against the others).
  bool ok = H5Tset_fields(type.get(), sign_pos, exp_pos, exp_bits, 0, mant_bits) >= 0;
  ok = ok && H5Tset_precision(type.get(), bytes * 8) >= 0;
  ok = ok && H5Tset_size(type.get(), bytes) >= 0;
  ok = ok && H5Tset_ebias(type.get(), bias) >= 0;
  if (!ok) throw std::logic_error("cannot build the HDF5 type of a narrow float: " + hdf5_reason());
  return type;
}

// The HDF5 type of a dsx dtype, used both in the file and in memory.
H5Id hdf5_type(DType dtype) {
  switch (dtype) {
    case DType::f64:
      return H5Id(H5Tcopy(H5T_IEEE_F64LE), H5Tclose);
    case DType::f32:
      return H5Id(H5Tcopy(H5T_IEEE_F32LE), H5Tclose);
    case DType::i32:
      return H5Id(H5Tcopy(H5T_STD_I32LE), H5Tclose);
    case DType::i64:
      return H5Id(H5Tcopy(H5T_STD_I64LE), H5Tclose);
    case DType::bf16:
      return narrow_float_type(2, 15, 7, 8, 7, 127);
    case DType::fp8_e4m3:
      return narrow_float_type(1, 7, 3, 4, 3, 7);
    case DType::fp8_e5m2:
      return narrow_float_type(1, 7, 2, 5, 2, 15);
  }
  throw std::logic_error("hdf5_type: unknown dtype");
}

std::vector<hsize_t> to_hsize(const Shape& shape) {
  return std::vector<hsize_t>(shape.begin(), shape.end());
}

H5Id make_space(const Shape& shape) {
  if (shape.empty()) return H5Id(H5Screate(H5S_SCALAR), H5Sclose);
  const auto dims = to_hsize(shape);
  return H5Id(H5Screate_simple(static_cast<int>(dims.size()), dims.data(), nullptr), H5Sclose);
}

void write_string_attribute(hid_t object, const char* name, std::string_view value, const std::filesystem::path& path) {
  H5Id type(checked(H5Tcopy(H5T_C_S1), path, "cannot copy the string type"), H5Tclose);
  checked(H5Tset_size(type.get(), std::max<size_t>(value.size(), 1)), path, "cannot size a string attribute");
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr(checked(H5Acreate2(object, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), path,
                    fmt::format("cannot create attribute {}", name)),
            H5Aclose);
  std::string padded(value);
  padded.resize(std::max<size_t>(value.size(), 1), '\0');
  checked(H5Awrite(attr.get(), type.get(), padded.data()), path, fmt::format("cannot write attribute {}", name));
}

void write_int_attribute(hid_t object, const char* name, std::span<const int64_t> values,
                         const std::filesystem::path& path) {
  const hsize_t n = values.size();
  H5Id space(H5Screate_simple(1, &n, nullptr), H5Sclose);
  H5Id attr(checked(H5Acreate2(object, name, H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT), path,
                    fmt::format("cannot create attribute {}", name)),
            H5Aclose);
  checked(H5Awrite(attr.get(), H5T_NATIVE_INT64, values.data()), path, fmt::format("cannot write attribute {}", name));
}

// A fixed-length string attribute of object, or nullopt when absent or not a fixed-length string.
std::optional<std::string> read_string_attribute(hid_t object, const char* name) {
  if (H5Aexists(object, name) <= 0) return std::nullopt;
  H5Id attr(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  if (!attr.valid()) return std::nullopt;
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  if (!type.valid() || H5Tget_class(type.get()) != H5T_STRING || H5Tis_variable_str(type.get()) != 0) {
    return std::nullopt;
  }
  std::string value(H5Tget_size(type.get()), '\0');
  if (H5Aread(attr.get(), type.get(), value.data()) < 0) return std::nullopt;
  value.resize(value.find('\0') == std::string::npos ? value.size() : value.find('\0'));
  return value;
}

// An integer attribute holding exactly one value, or nullopt.
std::optional<int64_t> read_int_attribute(hid_t object, const char* name) {
  if (H5Aexists(object, name) <= 0) return std::nullopt;
  H5Id attr(H5Aopen(object, name, H5P_DEFAULT), H5Aclose);
  if (!attr.valid()) return std::nullopt;
  H5Id space(H5Aget_space(attr.get()), H5Sclose);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  if (!space.valid() || H5Sget_simple_extent_npoints(space.get()) != 1 || H5Tget_class(type.get()) != H5T_INTEGER) {
    return std::nullopt;
  }
  int64_t value = 0;
  if (H5Aread(attr.get(), H5T_NATIVE_INT64, &value) < 0) return std::nullopt;
  return value;
}

}  // namespace

H5Id& H5Id::operator=(H5Id&& o) noexcept {
  if (this != &o) {
    reset();
    id_ = std::exchange(o.id_, H5I_INVALID_HID);
    closer_ = o.closer_;
  }
  return *this;
}

bool H5Id::close() {
  if (id_ < 0) return true;
  const herr_t status = closer_(id_);
  id_ = H5I_INVALID_HID;
  return status >= 0;
}

// ---- writing -----------------------------------------------------------------------------------

SliceFileWriter::SliceFileWriter(const std::filesystem::path& path, const FileIdentity& identity) : path_(path) {
  QuietHdf5 quiet;
  file_ = H5Id(checked(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), path, "cannot create file"),
               H5Fclose);
  const hid_t root = file_.get();
  write_string_attribute(root, "format", kFormatName, path);
  const int64_t version = kFormatVersion;
  const int64_t writer = identity.writer_index;
  const int64_t writers = identity.n_writers;
  write_int_attribute(root, "version", {&version, 1}, path);
  write_int_attribute(root, "writer_index", {&writer, 1}, path);
  write_int_attribute(root, "n_writers", {&writers, 1}, path);
  write_int_attribute(root, "step", {&identity.step, 1}, path);
  tensors_ = H5Id(checked(H5Gcreate2(root, kTensorsGroup, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT), path,
                          "cannot create group /tensors"),
                  H5Gclose);
}

void SliceFileWriter::write(const TensorSlice& slice, const std::string& dataset_name) {
  QuietHdf5 quiet;
  // HDF5 reads host memory: a device tensor is staged through a host copy.
  const Tensor data = slice.data.device() == Device::cpu ? slice.data : slice.data.to(Device::cpu);
  H5Id type = hdf5_type(data.dtype());
  H5Id space = make_space(data.shape());
  H5Id dataset(checked(H5Dcreate2(tensors_.get(), dataset_name.c_str(), type.get(), space.get(), H5P_DEFAULT,
                                  H5P_DEFAULT, H5P_DEFAULT),
                       path_, fmt::format("cannot create dataset for tensor '{}'", slice.name)),
               H5Dclose);
  if (data.numel() > 0) {
    checked(H5Dwrite(dataset.get(), type.get(), H5S_ALL, H5S_ALL, H5P_DEFAULT, data.raw()), path_,
            fmt::format("cannot write tensor '{}'", slice.name));
  }
  // Self-description for HDF5 tools; the manifest is what dsx reads.
  write_string_attribute(dataset.get(), "dtype", dtype_name(data.dtype()), path_);
  if (!slice.global_shape.empty()) {
    write_int_attribute(dataset.get(), "global_shape", slice.global_shape, path_);
    write_int_attribute(dataset.get(), "offset", slice.offset, path_);
  }
}

void SliceFileWriter::close() {
  QuietHdf5 quiet;
  const bool group_closed = tensors_.close();
  const bool file_closed = file_.close();
  if (!group_closed || !file_closed) fail(path_, "cannot finish writing the file (" + hdf5_reason() + ")");
}

// ---- reading -----------------------------------------------------------------------------------

SliceFileReader::SliceFileReader(const std::filesystem::path& path) : path_(path) {
  QuietHdf5 quiet;
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) fail(path, "not a readable HDF5 file (" + hdf5_reason() + ")");
  file_ = H5Id(id, H5Fclose);
  const auto format = read_string_attribute(id, "format");
  if (format != kFormatName)
    fail(path, fmt::format("not a {} file (its root has no format=\"{}\" attribute)", kFormatName, kFormatName));
  const auto version = read_int_attribute(id, "version");
  if (!version) fail(path, "has no format version attribute");
  if (*version > kFormatVersion || *version < 1) {
    fail(path,
         fmt::format("has format version {}, this build of dsx reads versions 1 to {}", *version, kFormatVersion));
  }
  identity_.writer_index = static_cast<int>(read_int_attribute(id, "writer_index").value_or(-1));
  identity_.n_writers = static_cast<int>(read_int_attribute(id, "n_writers").value_or(-1));
  identity_.step = read_int_attribute(id, "step").value_or(-1);
}

void SliceFileReader::read_box(const std::string& name, DType dtype, const Shape& stored_extent,
                               const Shape& file_start, const Shape& count, const Tensor& dest,
                               const Shape& mem_start) const {
  if (dest.device() != Device::cpu) {  // HDF5 writes host memory: read into a host copy, then move it
    Tensor host = dest.to(Device::cpu);
    read_box(name, dtype, stored_extent, file_start, count, host, mem_start);
    Tensor(dest).copy_from(host);
    return;
  }
  QuietHdf5 quiet;
  const std::string dataset_path = std::string(kTensorsGroup) + "/" + name;
  if (H5Lexists(file_.get(), kTensorsGroup, H5P_DEFAULT) <= 0 ||
      H5Lexists(file_.get(), dataset_path.c_str(), H5P_DEFAULT) <= 0) {
    fail(path_, fmt::format("has no dataset /{}", dataset_path));
  }
  H5Id dataset(checked(H5Dopen2(file_.get(), dataset_path.c_str(), H5P_DEFAULT), path_,
                       fmt::format("cannot open dataset /{}", dataset_path)),
               H5Dclose);
  H5Id expected_type = hdf5_type(dtype);
  H5Id stored_type(checked(H5Dget_type(dataset.get()), path_, "cannot read a dataset type"), H5Tclose);
  if (H5Tequal(stored_type.get(), expected_type.get()) <= 0) {
    fail(path_,
         fmt::format("dataset /{} does not hold {} elements as the manifest says", dataset_path, dtype_name(dtype)));
  }
  H5Id file_space(checked(H5Dget_space(dataset.get()), path_, "cannot read a dataspace"), H5Sclose);
  const int rank = H5Sget_simple_extent_ndims(file_space.get());
  std::vector<hsize_t> dims(static_cast<size_t>(std::max(rank, 0)));
  if (rank >= 0) H5Sget_simple_extent_dims(file_space.get(), dims.data(), nullptr);
  if (rank < 0 || dims != to_hsize(stored_extent)) {
    fail(path_, fmt::format("dataset /{} has shape [{}], the manifest says {}", dataset_path, fmt::join(dims, ", "),
                            shape_str(stored_extent)));
  }
  if (shape_numel(count) == 0) return;
  H5Id mem_space = make_space(dest.shape());
  if (!count.empty()) {
    const auto fstart = to_hsize(file_start);
    const auto mstart = to_hsize(mem_start);
    const auto n = to_hsize(count);
    checked(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, fstart.data(), nullptr, n.data(), nullptr), path_,
            "cannot select a box in the file");
    checked(H5Sselect_hyperslab(mem_space.get(), H5S_SELECT_SET, mstart.data(), nullptr, n.data(), nullptr), path_,
            "cannot select a box in memory");
  }
  checked(H5Dread(dataset.get(), expected_type.get(), mem_space.get(), file_space.get(), H5P_DEFAULT, dest.raw()),
          path_, fmt::format("cannot read dataset /{}", dataset_path));
}

}  // namespace dsx::ckpt::detail
