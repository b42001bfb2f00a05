#include "data/dataset.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <hdf5.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <list>
#include <mutex>
#include <nlohmann/json.hpp>
#include <optional>
#include <stdexcept>

#include "kernels/error.h"

namespace dsx::data {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// ---------------------------------------------------------------------------------------
// HDF5 plumbing

// Owns one HDF5 identifier and closes it with the matching H5*close function.
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  H5Id(H5Id&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = H5I_INVALID_HID; }
  H5Id& operator=(H5Id&& o) noexcept {
    if (this != &o) {
      reset();
      id_ = o.id_;
      closer_ = o.closer_;
      o.id_ = H5I_INVALID_HID;
    }
    return *this;
  }
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  ~H5Id() { reset(); }
  void reset() {
    if (id_ >= 0 && closer_) closer_(id_);
    id_ = H5I_INVALID_HID;
  }
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// HDF5 prints its error stack to stderr by default; dsx reports errors itself, with the file
// name, so automatic printing is switched off (per thread in a thread-safe HDF5) while a dsx
// call runs.
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

// The most specific message on the current HDF5 error stack (which is then cleared).
std::string hdf5_detail() {
  hid_t stack = H5Eget_current_stack();
  if (stack < 0) return "no detail";
  std::string detail;
  H5Ewalk2(
      stack, H5E_WALK_UPWARD,
      [](unsigned, const H5E_error2_t* err, void* out) -> herr_t {
        auto* text = static_cast<std::string*>(out);
        if (text->empty() && err->desc && *err->desc) *text = err->desc;
        return 0;
      },
      &detail);
  H5Eclose_stack(stack);
  return detail.empty() ? "no detail" : detail;
}

// Throws UserError "<file>: <what> (HDF5: <detail>)" when an HDF5 call failed.
void check_h5(herr_t status, const std::string& file, std::string_view what) {
  if (status < 0) throw UserError(fmt::format("'{}': {} (HDF5: {})", file, what, hdf5_detail()));
}
H5Id check_h5_id(hid_t id, H5Id::Closer closer, const std::string& file, std::string_view what) {
  if (id < 0) throw UserError(fmt::format("'{}': {} (HDF5: {})", file, what, hdf5_detail()));
  return H5Id(id, closer);
}

H5Id make_string_type(size_t length) {
  H5Id type(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(type.get(), std::max<size_t>(length, 1));
  H5Tset_strpad(type.get(), H5T_STR_NULLPAD);
  return type;
}

void write_string_attribute(hid_t loc, const char* name, const std::string& value, const std::string& file) {
  H5Id type = make_string_type(value.size());
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr = check_h5_id(H5Acreate2(loc, name, type.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose, file,
                          fmt::format("cannot create attribute '{}'", name));
  std::string padded = value.empty() ? std::string(1, '\0') : value;
  check_h5(H5Awrite(attr.get(), type.get(), padded.data()), file, fmt::format("cannot write attribute '{}'", name));
}

void write_int_attribute(hid_t loc, const char* name, int64_t value, hid_t file_type, const std::string& file) {
  H5Id space(H5Screate(H5S_SCALAR), H5Sclose);
  H5Id attr = check_h5_id(H5Acreate2(loc, name, file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT), H5Aclose, file,
                          fmt::format("cannot create attribute '{}'", name));
  check_h5(H5Awrite(attr.get(), H5T_NATIVE_INT64, &value), file, fmt::format("cannot write attribute '{}'", name));
}

// Opens a scalar root attribute, or throws UserError naming the file when it is absent.
H5Id open_attribute(hid_t loc, const char* name, const std::string& file) {
  if (H5Aexists(loc, name) <= 0) {
    throw UserError(fmt::format("'{}': not a dsx token shard: the attribute '{}' is missing", file, name));
  }
  H5Id attr =
      check_h5_id(H5Aopen(loc, name, H5P_DEFAULT), H5Aclose, file, fmt::format("cannot open attribute '{}'", name));
  H5Id space(H5Aget_space(attr.get()), H5Sclose);
  if (H5Sget_simple_extent_npoints(space.get()) != 1) {
    throw UserError(fmt::format("'{}': attribute '{}' must hold a single value", file, name));
  }
  return attr;
}

std::string read_string_attribute(hid_t loc, const char* name, const std::string& file) {
  H5Id attr = open_attribute(loc, name, file);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_STRING) {
    throw UserError(fmt::format("'{}': attribute '{}' must be a string", file, name));
  }
  if (H5Tis_variable_str(type.get()) > 0) {
    H5Id mem = H5Id(H5Tcopy(H5T_C_S1), H5Tclose);
    H5Tset_size(mem.get(), H5T_VARIABLE);
    char* value = nullptr;
    check_h5(H5Aread(attr.get(), mem.get(), &value), file, fmt::format("cannot read attribute '{}'", name));
    std::string out = value ? value : "";
    H5free_memory(value);
    return out;
  }
  const size_t size = H5Tget_size(type.get());
  std::string buffer(size, '\0');
  check_h5(H5Aread(attr.get(), type.get(), buffer.data()), file, fmt::format("cannot read attribute '{}'", name));
  buffer.resize(std::min(buffer.size(), buffer.find('\0')));
  return buffer;
}

int64_t read_int_attribute(hid_t loc, const char* name, const std::string& file) {
  H5Id attr = open_attribute(loc, name, file);
  H5Id type(H5Aget_type(attr.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_INTEGER) {
    throw UserError(fmt::format("'{}': attribute '{}' must be an integer", file, name));
  }
  int64_t value = 0;
  check_h5(H5Aread(attr.get(), H5T_NATIVE_INT64, &value), file, fmt::format("cannot read attribute '{}'", name));
  return value;
}

// A 1-D dataset's length after checking it exists, is 1-D and has the expected integer kind.
int64_t checked_1d_length(hid_t file_id, const char* name, size_t element_size, H5T_sign_t sign,
                          const std::string& file) {
  if (H5Lexists(file_id, name, H5P_DEFAULT) <= 0) {
    throw UserError(fmt::format("'{}': not a dsx token shard: the dataset '{}' is missing", file, name));
  }
  H5Id dset =
      check_h5_id(H5Dopen2(file_id, name, H5P_DEFAULT), H5Dclose, file, fmt::format("cannot open dataset '{}'", name));
  H5Id type(H5Dget_type(dset.get()), H5Tclose);
  if (H5Tget_class(type.get()) != H5T_INTEGER || H5Tget_size(type.get()) != element_size ||
      H5Tget_sign(type.get()) != sign) {
    throw UserError(fmt::format("'{}': dataset '{}' must hold {}-bit {} integers", file, name, element_size * 8,
                                sign == H5T_SGN_NONE ? "unsigned" : "signed"));
  }
  H5Id space(H5Dget_space(dset.get()), H5Sclose);
  if (H5Sget_simple_extent_ndims(space.get()) != 1) {
    throw UserError(fmt::format("'{}': dataset '{}' must be one-dimensional", file, name));
  }
  hsize_t dims[1] = {0};
  H5Sget_simple_extent_dims(space.get(), dims, nullptr);
  return static_cast<int64_t>(dims[0]);
}

// Reads elements [begin, begin + count) of a 1-D dataset into `out` (memory type mem_type).
void read_1d(hid_t dset, hid_t mem_type, int64_t begin, int64_t count, void* out, const std::string& file,
             std::string_view name) {
  if (count == 0) return;
  H5Id file_space(H5Dget_space(dset), H5Sclose);
  const hsize_t start[1] = {static_cast<hsize_t>(begin)};
  const hsize_t n[1] = {static_cast<hsize_t>(count)};
  check_h5(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, n, nullptr), file,
           fmt::format("cannot select elements of '{}'", name));
  H5Id mem_space(H5Screate_simple(1, n, nullptr), H5Sclose);
  check_h5(H5Dread(dset, mem_type, mem_space.get(), file_space.get(), H5P_DEFAULT, out), file,
           fmt::format("cannot read '{}' (the file may be truncated or damaged)", name));
}

H5Id open_hdf5_file(const std::string& path) {
  std::error_code ec;
  const auto status = fs::status(path, ec);
  if (!fs::exists(status)) throw UserError(fmt::format("'{}': no such file", path));
  if (!fs::is_regular_file(status)) throw UserError(fmt::format("'{}': not a regular file", path));
  if (!std::ifstream(path, std::ios::binary)) throw UserError(fmt::format("'{}': cannot be read", path));
  if (H5Fis_hdf5(path.c_str()) <= 0) {
    hdf5_detail();  // clear the stack
    throw UserError(fmt::format("'{}': not an HDF5 file (no HDF5 signature); expected a dsx token shard", path));
  }
  hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, H5P_DEFAULT);
  if (id < 0) {
    throw UserError(
        fmt::format("'{}': cannot open as HDF5; the file is truncated or damaged (HDF5: {})", path, hdf5_detail()));
  }
  return H5Id(id, H5Fclose);
}

// ---------------------------------------------------------------------------------------
// Files

struct FileDescriptor {
  int fd = -1;
  explicit FileDescriptor(int f) : fd(f) {}
  ~FileDescriptor() {
    if (fd >= 0) ::close(fd);
  }
  FileDescriptor(const FileDescriptor&) = delete;
  FileDescriptor& operator=(const FileDescriptor&) = delete;
};

// Flushes a file (or directory) to stable storage so a rename after it cannot expose a file
// whose contents are still only in the page cache.
void sync_path(const std::string& path) {
  FileDescriptor f(::open(path.c_str(), O_RDONLY));
  if (f.fd < 0) throw UserError(fmt::format("'{}': cannot open to sync", path));
  if (::fsync(f.fd) != 0 && !fs::is_directory(path)) throw UserError(fmt::format("'{}': fsync failed", path));
}

void rename_into_place(const std::string& from, const std::string& to) {
  std::error_code ec;
  fs::rename(from, to, ec);
  if (ec) throw UserError(fmt::format("cannot rename '{}' to '{}': {}", from, to, ec.message()));
  const std::string parent = fs::path(to).parent_path().string();
  sync_path(parent.empty() ? "." : parent);
}

std::string join(const std::string& dir, std::string_view name) {
  return (fs::path(dir) / name).string();
}

// ---------------------------------------------------------------------------------------
// index.json

json identity_json(const TokenizerIdentity& id) {
  return json{{"vocab_size", id.vocab_size}, {"tokenizer_hash", id.tokenizer_hash}, {"eos_id", id.eos_id}};
}

// Reads a required field of the given JSON kind; UserError names the file and the field.
template <class T>
T required(const json& obj, const char* key, const std::string& file, std::string_view where = "") {
  const std::string at = where.empty() ? std::string(key) : fmt::format("{}.{}", where, key);
  auto it = obj.find(key);
  if (it == obj.end()) throw UserError(fmt::format("'{}': field '{}' is missing", file, at));
  bool ok = false;
  if constexpr (std::is_same_v<T, std::string>)
    ok = it->is_string();
  else
    ok = it->is_number_integer();
  if (!ok) {
    throw UserError(fmt::format("'{}': field '{}' must be {}", file, at,
                                std::is_same_v<T, std::string> ? "a string" : "an integer"));
  }
  return it->get<T>();
}

bool is_safe_relative(const std::string& name) {
  const fs::path p(name);
  if (name.empty() || p.is_absolute()) return false;
  return std::none_of(p.begin(), p.end(), [](const fs::path& part) { return part == ".."; });
}

void check_identity(const TokenizerIdentity& id, const std::string& file) {
  if (id.vocab_size <= 0 || id.vocab_size > (int64_t{1} << 31)) {
    throw UserError(fmt::format("'{}': vocab_size {} is out of range (1 .. 2^31)", file, id.vocab_size));
  }
  if (id.eos_id < -1 || id.eos_id >= id.vocab_size) {
    throw UserError(fmt::format("'{}': eos_id {} is outside the vocabulary of {}", file, id.eos_id, id.vocab_size));
  }
}

void check_format_version(int64_t version, const std::string& file) {
  if (version > kDatasetFormatVersion) {
    throw UserError(
        fmt::format("'{}': {} format version {} is newer than the version {} this dsx reads; use a newer dsx", file,
                    kDatasetFormat, version, kDatasetFormatVersion));
  }
  if (version < 1) throw UserError(fmt::format("'{}': invalid format version {}", file, version));
}

}  // namespace

// =========================================================================================
// DatasetIndex

DatasetIndex DatasetIndex::load(const std::string& dir) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw UserError(fmt::format("'{}': no such dataset directory", dir));
  const std::string file = join(dir, kIndexFileName);
  if (!fs::exists(file, ec)) {
    throw UserError(
        fmt::format("'{}' is missing: '{}' is not a complete dsx token dataset (an interrupted "
                    "`dsx data prep` leaves no index; run it again)",
                    file, dir));
  }
  std::ifstream in(file, std::ios::binary);
  if (!in) throw UserError(fmt::format("'{}': cannot be read", file));
  json doc;
  try {
    doc = json::parse(in);
  } catch (const json::parse_error& e) {
    throw UserError(fmt::format("'{}': invalid JSON: {}", file, e.what()));
  }
  if (!doc.is_object()) throw UserError(fmt::format("'{}': expected a JSON object", file));
  const std::string format = required<std::string>(doc, "format", file);
  if (format != kDatasetFormat) {
    throw UserError(fmt::format("'{}': format '{}' is not '{}'", file, format, kDatasetFormat));
  }
  check_format_version(required<int64_t>(doc, "format_version", file), file);

  DatasetIndex index;
  index.identity.vocab_size = required<int64_t>(doc, "vocab_size", file);
  index.identity.tokenizer_hash = required<std::string>(doc, "tokenizer_hash", file);
  index.identity.eos_id = required<int64_t>(doc, "eos_id", file);
  check_identity(index.identity, file);
  index.tokens = required<int64_t>(doc, "tokens", file);
  index.documents = required<int64_t>(doc, "documents", file);
  auto shards = doc.find("shards");
  if (shards == doc.end() || !shards->is_array() || shards->empty()) {
    throw UserError(fmt::format("'{}': field 'shards' must be a non-empty list", file));
  }
  int64_t tokens = 0, documents = 0;
  for (size_t i = 0; i < shards->size(); ++i) {
    const json& s = (*shards)[i];
    const std::string where = fmt::format("shards[{}]", i);
    if (!s.is_object()) throw UserError(fmt::format("'{}': '{}' must be an object", file, where));
    ShardEntry entry{required<std::string>(s, "file", file, where), required<int64_t>(s, "tokens", file, where),
                     required<int64_t>(s, "documents", file, where)};
    if (!is_safe_relative(entry.file)) {
      throw UserError(fmt::format("'{}': '{}.file' must be a relative path inside the dataset", file, where));
    }
    if (entry.tokens < 1 || entry.documents < 1 || entry.documents > entry.tokens) {
      throw UserError(fmt::format("'{}': '{}' has inconsistent counts ({} tokens, {} documents)", file, where,
                                  entry.tokens, entry.documents));
    }
    tokens += entry.tokens;
    documents += entry.documents;
    index.shards.push_back(std::move(entry));
  }
  if (tokens != index.tokens || documents != index.documents) {
    throw UserError(fmt::format("'{}': totals ({} tokens, {} documents) do not match the shards' sums ({}, {})", file,
                                index.tokens, index.documents, tokens, documents));
  }
  return index;
}

void DatasetIndex::save(const std::string& dir) const {
  json doc = identity_json(identity);
  doc["format"] = std::string(kDatasetFormat);
  doc["format_version"] = kDatasetFormatVersion;
  doc["token_dtype"] = "uint32";
  doc["tokens"] = tokens;
  doc["documents"] = documents;
  doc["shards"] = json::array();
  for (const auto& s : shards)
    doc["shards"].push_back({{"file", s.file}, {"tokens", s.tokens}, {"documents", s.documents}});

  const std::string file = join(dir, kIndexFileName);
  const std::string partial = file + ".partial";
  {
    std::ofstream out(partial, std::ios::binary | std::ios::trunc);
    if (!out) throw UserError(fmt::format("'{}': cannot be created", partial));
    out << doc.dump(2) << '\n';
    out.flush();
    if (!out) throw UserError(fmt::format("'{}': write failed", partial));
  }
  sync_path(partial);
  rename_into_place(partial, file);
}

// =========================================================================================
// ShardWriter

struct ShardWriter::Impl {
  std::string path;
  std::string partial_path;
  TokenizerIdentity identity;
  int64_t chunk_tokens = 0;
  H5Id file;  // declared before the dataset: members close in reverse order
  H5Id tokens_dset;
  std::vector<TokenId> pending;  // appended but not yet written
  int64_t written = 0;           // tokens already in the file
  std::vector<int64_t> offsets{0};
  bool finished = false;

  // Writes pending tokens once enough have gathered for a few chunks at a time.
  int64_t flush_threshold() const { return std::max<int64_t>(chunk_tokens, int64_t{1} << 20); }

  void create() {
    QuietHdf5 quiet;
    file = check_h5_id(H5Fcreate(partial_path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), H5Fclose, partial_path,
                       "cannot create file");
    const hsize_t dims[1] = {0};
    const hsize_t max_dims[1] = {H5S_UNLIMITED};
    H5Id space(H5Screate_simple(1, dims, max_dims), H5Sclose);
    H5Id dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
    const hsize_t chunk[1] = {static_cast<hsize_t>(chunk_tokens)};
    check_h5(H5Pset_chunk(dcpl.get(), 1, chunk), partial_path, "cannot set the chunk size");
    tokens_dset =
        check_h5_id(H5Dcreate2(file.get(), "tokens", H5T_STD_U32LE, space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                    H5Dclose, partial_path, "cannot create dataset 'tokens'");
  }

  void flush() {
    if (pending.empty()) return;
    QuietHdf5 quiet;
    const hsize_t new_size[1] = {static_cast<hsize_t>(written) + pending.size()};
    check_h5(H5Dset_extent(tokens_dset.get(), new_size), partial_path, "cannot extend dataset 'tokens'");
    H5Id file_space(H5Dget_space(tokens_dset.get()), H5Sclose);
    const hsize_t start[1] = {static_cast<hsize_t>(written)};
    const hsize_t count[1] = {pending.size()};
    check_h5(H5Sselect_hyperslab(file_space.get(), H5S_SELECT_SET, start, nullptr, count, nullptr), partial_path,
             "cannot select tokens");
    H5Id mem_space(H5Screate_simple(1, count, nullptr), H5Sclose);
    check_h5(
        H5Dwrite(tokens_dset.get(), H5T_NATIVE_UINT32, mem_space.get(), file_space.get(), H5P_DEFAULT, pending.data()),
        partial_path, "cannot write tokens (disk full?)");
    written += static_cast<int64_t>(pending.size());
    pending.clear();
  }

  void write_offsets_and_attributes() {
    QuietHdf5 quiet;
    const hsize_t dims[1] = {offsets.size()};
    H5Id space(H5Screate_simple(1, dims, nullptr), H5Sclose);
    H5Id dset = check_h5_id(
        H5Dcreate2(file.get(), "doc_offsets", H5T_STD_I64LE, space.get(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
        H5Dclose, partial_path, "cannot create dataset 'doc_offsets'");
    check_h5(H5Dwrite(dset.get(), H5T_NATIVE_INT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, offsets.data()), partial_path,
             "cannot write 'doc_offsets'");
    write_string_attribute(file.get(), "format", std::string(kDatasetFormat), partial_path);
    write_int_attribute(file.get(), "format_version", kDatasetFormatVersion, H5T_STD_I32LE, partial_path);
    write_int_attribute(file.get(), "vocab_size", identity.vocab_size, H5T_STD_I64LE, partial_path);
    write_string_attribute(file.get(), "tokenizer_hash", identity.tokenizer_hash, partial_path);
    write_int_attribute(file.get(), "eos_id", identity.eos_id, H5T_STD_I64LE, partial_path);
  }

  void close_handles() {
    tokens_dset.reset();
    if (file.valid()) {
      QuietHdf5 quiet;
      const herr_t status = H5Fclose(file.get());
      file = H5Id();
      check_h5(status, partial_path, "cannot close file");
    }
  }
};

ShardWriter::ShardWriter(std::string path, TokenizerIdentity identity, int64_t chunk_tokens)
    : impl_(std::make_unique<Impl>()) {
  if (chunk_tokens < 1) throw std::invalid_argument("ShardWriter: chunk_tokens must be positive");
  check_identity(identity, path);
  impl_->path = std::move(path);
  impl_->partial_path = impl_->path + ".partial";
  impl_->identity = std::move(identity);
  impl_->chunk_tokens = chunk_tokens;
  impl_->create();
}

ShardWriter::~ShardWriter() {
  if (!impl_ || impl_->finished) return;
  impl_->tokens_dset.reset();
  impl_->file.reset();
  std::error_code ec;
  fs::remove(impl_->partial_path, ec);
}

ShardWriter::ShardWriter(ShardWriter&&) noexcept = default;
ShardWriter& ShardWriter::operator=(ShardWriter&&) noexcept = default;

void ShardWriter::append_document(std::span<const TokenId> tokens) {
  if (impl_->finished) throw std::logic_error("ShardWriter: append after finish");
  if (tokens.empty()) throw std::invalid_argument("ShardWriter: a document needs at least one token");
  const int64_t vocab = impl_->identity.vocab_size;
  for (TokenId t : tokens) {
    if (static_cast<int64_t>(t) >= vocab) {
      throw std::invalid_argument(fmt::format("ShardWriter: token id {} is outside the vocabulary of {}", t, vocab));
    }
  }
  impl_->pending.insert(impl_->pending.end(), tokens.begin(), tokens.end());
  impl_->offsets.push_back(impl_->offsets.back() + static_cast<int64_t>(tokens.size()));
  if (static_cast<int64_t>(impl_->pending.size()) >= impl_->flush_threshold()) impl_->flush();
}

int64_t ShardWriter::tokens() const {
  return impl_->offsets.back();
}
int64_t ShardWriter::documents() const {
  return static_cast<int64_t>(impl_->offsets.size()) - 1;
}

void ShardWriter::finish() {
  if (impl_->finished) return;
  impl_->flush();
  impl_->write_offsets_and_attributes();
  impl_->close_handles();
  sync_path(impl_->partial_path);
  rename_into_place(impl_->partial_path, impl_->path);
  impl_->finished = true;
}

// =========================================================================================
// DatasetWriter

struct DatasetWriter::Impl {
  std::string dir;
  TokenizerIdentity identity;
  Options options;
  std::optional<ShardWriter> current;
  std::vector<ShardEntry> finished_shards;
  int64_t tokens = 0;
  int64_t documents = 0;
  bool created_dir = false;  // the writer made the directory: an unfinished write removes it
  bool finished = false;

  std::string next_shard_name() const { return fmt::format("shard-{:05d}.h5", finished_shards.size()); }

  void close_current() {
    if (!current) return;
    ShardEntry entry{next_shard_name(), current->tokens(), current->documents()};
    current->finish();
    current.reset();
    finished_shards.push_back(std::move(entry));
  }
};

DatasetWriter::DatasetWriter(std::string dir, TokenizerIdentity identity)
    : DatasetWriter(std::move(dir), std::move(identity), Options{}) {}

DatasetWriter::DatasetWriter(std::string dir, TokenizerIdentity identity, Options options)
    : impl_(std::make_unique<Impl>()) {
  if (options.shard_tokens < 1) throw UserError(fmt::format("shard size must be at least 1 token"));
  if (options.chunk_tokens < 1) throw UserError(fmt::format("chunk size must be at least 1 token"));
  check_identity(identity, dir);
  std::error_code ec;
  impl_->created_dir = !fs::exists(dir, ec);
  fs::create_directories(dir, ec);
  if (ec || !fs::is_directory(dir)) {
    throw UserError(fmt::format("'{}': cannot create the output directory{}", dir, ec ? ": " + ec.message() : ""));
  }
  if (fs::exists(join(dir, kIndexFileName))) {
    throw UserError(fmt::format("'{}' already holds a dataset (index.json); choose another output directory", dir));
  }
  impl_->dir = std::move(dir);
  impl_->identity = std::move(identity);
  impl_->options = options;
}

DatasetWriter::~DatasetWriter() {
  if (!impl_ || impl_->finished) return;
  impl_->current.reset();  // removes its partial file
  std::error_code ec;
  for (const auto& s : impl_->finished_shards) fs::remove(join(impl_->dir, s.file), ec);
  if (impl_->created_dir && fs::is_empty(impl_->dir, ec)) fs::remove(impl_->dir, ec);
}

void DatasetWriter::add_document(std::span<const TokenId> tokens) {
  if (impl_->finished) throw std::logic_error("DatasetWriter: add_document after finish");
  if (!impl_->current) {
    impl_->current.emplace(join(impl_->dir, impl_->next_shard_name()), impl_->identity, impl_->options.chunk_tokens);
  }
  impl_->current->append_document(tokens);
  impl_->tokens += static_cast<int64_t>(tokens.size());
  impl_->documents += 1;
  if (impl_->current->tokens() >= impl_->options.shard_tokens) impl_->close_current();
}

int64_t DatasetWriter::tokens() const {
  return impl_->tokens;
}
int64_t DatasetWriter::documents() const {
  return impl_->documents;
}
int64_t DatasetWriter::shards_written() const {
  return static_cast<int64_t>(impl_->finished_shards.size());
}

DatasetIndex DatasetWriter::finish() {
  if (impl_->finished) throw std::logic_error("DatasetWriter: finish called twice");
  impl_->close_current();
  if (impl_->documents == 0) throw UserError(fmt::format("'{}': no documents to write", impl_->dir));
  DatasetIndex index;
  index.identity = impl_->identity;
  index.shards = impl_->finished_shards;
  index.tokens = impl_->tokens;
  index.documents = impl_->documents;
  index.save(impl_->dir);
  impl_->finished = true;
  return index;
}

// =========================================================================================
// Reading

ShardInfo inspect_shard(const std::string& path) {
  QuietHdf5 quiet;
  H5Id file = open_hdf5_file(path);
  ShardInfo info;
  info.path = path;
  const std::string format = read_string_attribute(file.get(), "format", path);
  if (format != kDatasetFormat) {
    throw UserError(
        fmt::format("'{}': HDF5 file of format '{}', not a dsx token shard ('{}')", path, format, kDatasetFormat));
  }
  const int64_t version = read_int_attribute(file.get(), "format_version", path);
  check_format_version(version, path);
  info.format_version = static_cast<int>(version);
  info.identity.vocab_size = read_int_attribute(file.get(), "vocab_size", path);
  info.identity.tokenizer_hash = read_string_attribute(file.get(), "tokenizer_hash", path);
  info.identity.eos_id = read_int_attribute(file.get(), "eos_id", path);
  check_identity(info.identity, path);

  info.tokens = checked_1d_length(file.get(), "tokens", 4, H5T_SGN_NONE, path);
  const int64_t n_offsets = checked_1d_length(file.get(), "doc_offsets", 8, H5T_SGN_2, path);
  if (n_offsets < 2) throw UserError(fmt::format("'{}': 'doc_offsets' must hold at least 2 entries", path));
  info.documents = n_offsets - 1;
  H5Id offsets = check_h5_id(H5Dopen2(file.get(), "doc_offsets", H5P_DEFAULT), H5Dclose, path,
                             "cannot open dataset 'doc_offsets'");
  int64_t first = -1, last = -1;
  read_1d(offsets.get(), H5T_NATIVE_INT64, 0, 1, &first, path, "doc_offsets");
  read_1d(offsets.get(), H5T_NATIVE_INT64, n_offsets - 1, 1, &last, path, "doc_offsets");
  if (first != 0 || last != info.tokens) {
    throw UserError(fmt::format("'{}': 'doc_offsets' runs from {} to {} but must run from 0 to the {} tokens", path,
                                first, last, info.tokens));
  }
  return info;
}

namespace {

// A shard opened for reading, with its document offsets in memory.
struct OpenShard {
  size_t index = 0;
  H5Id file;
  H5Id tokens;
  std::vector<int64_t> offsets;
};

constexpr size_t kMaxOpenShards = 8;

}  // namespace

struct TokenDataset::Impl {
  std::string dir;
  DatasetIndex index;
  std::vector<int64_t> shard_starts;  // token position of each shard in the stream; back() = tokens
  mutable std::mutex mutex;
  mutable std::list<OpenShard> open_shards;  // most recently used first

  std::string shard_path(size_t s) const { return join(dir, index.shards[s].file); }

  OpenShard open_shard(size_t s) const {
    const std::string path = shard_path(s);
    OpenShard shard;
    shard.index = s;
    shard.file = open_hdf5_file(path);
    H5Id dapl(H5Pcreate(H5P_DATASET_ACCESS), H5Pclose);
    // No chunk cache: the chunks are uncompressed, so HDF5 then reads exactly the requested
    // tokens from the file; a cache would read whole chunks (128 KiB) for every shuffled
    // window, and windows are rarely revisited soon.
    H5Pset_chunk_cache(dapl.get(), 0, 0, 1.0);
    shard.tokens =
        check_h5_id(H5Dopen2(shard.file.get(), "tokens", dapl.get()), H5Dclose, path, "cannot open dataset 'tokens'");
    const int64_t docs = index.shards[s].documents;
    shard.offsets.resize(static_cast<size_t>(docs) + 1);
    H5Id offsets = check_h5_id(H5Dopen2(shard.file.get(), "doc_offsets", H5P_DEFAULT), H5Dclose, path,
                               "cannot open dataset 'doc_offsets'");
    read_1d(offsets.get(), H5T_NATIVE_INT64, 0, docs + 1, shard.offsets.data(), path, "doc_offsets");
    for (size_t i = 1; i < shard.offsets.size(); ++i) {
      if (shard.offsets[i] <= shard.offsets[i - 1]) {
        throw UserError(fmt::format("'{}': 'doc_offsets' must increase strictly (entry {} is {}, entry {} is {})", path,
                                    i - 1, shard.offsets[i - 1], i, shard.offsets[i]));
      }
    }
    return shard;
  }

  // The open shard s, opening it (and closing the least recently used) when needed.
  OpenShard& acquire(size_t s) const {
    auto it = std::find_if(open_shards.begin(), open_shards.end(), [s](const OpenShard& o) { return o.index == s; });
    if (it != open_shards.end()) {
      open_shards.splice(open_shards.begin(), open_shards, it);
      return open_shards.front();
    }
    open_shards.push_front(open_shard(s));
    if (open_shards.size() > kMaxOpenShards) open_shards.pop_back();
    return open_shards.front();
  }
};

TokenDataset::TokenDataset(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
TokenDataset::~TokenDataset() = default;
TokenDataset::TokenDataset(TokenDataset&&) noexcept = default;
TokenDataset& TokenDataset::operator=(TokenDataset&&) noexcept = default;

TokenDataset TokenDataset::open(const std::string& dir) {
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->index = DatasetIndex::load(dir);
  const std::string index_file = join(dir, kIndexFileName);
  impl->shard_starts.push_back(0);
  for (size_t s = 0; s < impl->index.shards.size(); ++s) {
    const ShardEntry& entry = impl->index.shards[s];
    const std::string path = impl->shard_path(s);
    if (!fs::exists(path)) {
      throw UserError(fmt::format("'{}': shard listed in '{}' is missing", path, index_file));
    }
    const ShardInfo info = inspect_shard(path);
    if (info.identity != impl->index.identity) {
      throw UserError(fmt::format(
          "'{}': written with tokenizer (hash {}, vocab {}, eos {}) but '{}' names (hash {}, vocab {}, eos {})", path,
          info.identity.tokenizer_hash, info.identity.vocab_size, info.identity.eos_id, index_file,
          impl->index.identity.tokenizer_hash, impl->index.identity.vocab_size, impl->index.identity.eos_id));
    }
    if (info.tokens != entry.tokens || info.documents != entry.documents) {
      throw UserError(fmt::format("'{}': holds {} tokens in {} documents but '{}' says {} in {}", path, info.tokens,
                                  info.documents, index_file, entry.tokens, entry.documents));
    }
    impl->shard_starts.push_back(impl->shard_starts.back() + entry.tokens);
  }
  return TokenDataset(std::move(impl));
}

const std::string& TokenDataset::dir() const {
  return impl_->dir;
}
const DatasetIndex& TokenDataset::index() const {
  return impl_->index;
}

std::vector<int64_t> TokenDataset::document_offsets(size_t shard) const {
  if (shard >= num_shards()) throw std::out_of_range("TokenDataset::document_offsets: no such shard");
  QuietHdf5 quiet;
  std::lock_guard lock(impl_->mutex);
  return impl_->acquire(shard).offsets;
}

void TokenDataset::read(int64_t begin, std::span<TokenId> out, std::span<int32_t> segment_ids) const {
  const int64_t count = static_cast<int64_t>(out.size());
  if (begin < 0 || begin + count > tokens()) {
    throw std::out_of_range(fmt::format("TokenDataset::read: [{}, {}) is outside the {} tokens of '{}'", begin,
                                        begin + count, tokens(), dir()));
  }
  if (!segment_ids.empty() && segment_ids.size() != out.size()) {
    throw std::invalid_argument("TokenDataset::read: segment_ids must match the token count");
  }
  QuietHdf5 quiet;
  std::lock_guard lock(impl_->mutex);
  const auto& starts = impl_->shard_starts;
  size_t s = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin()) - 1;
  int64_t done = 0;
  int32_t segment = 0;
  while (done < count) {
    OpenShard& shard = impl_->acquire(s);
    const int64_t local_begin = begin + done - starts[s];
    const int64_t n = std::min(count - done, starts[s + 1] - starts[s] - local_begin);
    read_1d(shard.tokens.get(), H5T_NATIVE_UINT32, local_begin, n, out.data() + done, impl_->shard_path(s), "tokens");
    if (!segment_ids.empty()) {
      // Walk the document starts inside [local_begin, local_begin + n); the very first token
      // of the read opens segment 0 even when it is a document start.
      auto next = std::lower_bound(shard.offsets.begin(), shard.offsets.end(), local_begin);
      for (int64_t i = 0; i < n; ++i) {
        if (next != shard.offsets.end() && *next == local_begin + i) {
          if (done + i > 0) ++segment;
          ++next;
        }
        segment_ids[static_cast<size_t>(done + i)] = segment;
      }
    }
    done += n;
    ++s;
  }
}

}  // namespace dsx::data
