#include "trainer/checkpoint/manifest_json.h"

#include <fmt/core.h>
#include <fmt/format.h>

#include <limits>
#include <regex>
#include <stdexcept>

#include "trainer/checkpoint/fs_util.h"

namespace dsx::ckpt::detail {
namespace {

using nlohmann::json;

constexpr std::string_view kIndexFormatName = "dsx-checkpoint-index";

[[noreturn]] void bad(const std::string& where, const std::string& what) {
  throw std::runtime_error(fmt::format("{}: {}", where, what));
}

const json& field(const json& object, const char* key, const std::string& where) {
  if (!object.is_object()) bad(where, "expected a JSON object");
  const auto it = object.find(key);
  if (it == object.end()) bad(where, fmt::format("missing key \"{}\"", key));
  return *it;
}

std::string sub(const std::string& where, const char* key) {
  return where.empty() ? key : where + "." + key;
}
std::string item(const std::string& where, size_t i) {
  return fmt::format("{}[{}]", where, i);
}

int64_t as_int(const json& value, const std::string& where, int64_t min = 0) {
  if (!value.is_number_integer()) bad(where, "expected an integer");
  const int64_t v = value.is_number_unsigned() && value.get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max())
                        ? std::numeric_limits<int64_t>::max()
                        : value.get<int64_t>();
  if (v < min) bad(where, fmt::format("expected an integer >= {}, got {}", min, v));
  return v;
}

const std::string& as_string(const json& value, const std::string& where) {
  if (!value.is_string()) bad(where, "expected a string");
  return value.get_ref<const std::string&>();
}

const json& as_array(const json& value, const std::string& where) {
  if (!value.is_array()) bad(where, "expected an array");
  return value;
}

Shape as_shape(const json& value, const std::string& where) {
  Shape shape;
  const json& array = as_array(value, where);
  for (size_t i = 0; i < array.size(); ++i) shape.push_back(as_int(array[i], item(where, i)));
  return shape;
}

DType as_dtype(const json& value, const std::string& where) {
  const std::string& name = as_string(value, where);
  try {
    return dtype_from_name(name);
  } catch (const std::invalid_argument&) {
    bad(where, fmt::format("unknown dtype \"{}\"", name));
  }
}

// Checks "format" and "version" before anything else: a newer version may change everything below.
int check_format(const json& json_value, std::string_view expected_format) {
  if (!json_value.is_object()) bad("(top level)", "expected a JSON object");
  const std::string& format = as_string(field(json_value, "format", ""), "format");
  if (format != expected_format) bad("format", fmt::format("is \"{}\", expected \"{}\"", format, expected_format));
  const int64_t version = as_int(field(json_value, "version", ""), "version", 1);
  if (version > kFormatVersion) {
    bad("version", fmt::format("format version {} is newer than this build of dsx reads (up to {}); "
                               "use a newer dsx",
                               version, kFormatVersion));
  }
  return static_cast<int>(version);
}

json file_to_json(const FileInfo& file) {
  return json{{"name", file.name}, {"bytes", file.bytes}, {"crc32", crc_to_string(file.crc32)}};
}

FileInfo file_from_json(const json& value, const std::string& where) {
  FileInfo file;
  file.name = as_string(field(value, "name", where), sub(where, "name"));
  static const std::regex kFileName(R"(rank-\d{5,}\.h5)");
  if (!std::regex_match(file.name, kFileName))
    bad(sub(where, "name"), fmt::format("\"{}\" is not rank-NNNNN.h5", file.name));
  file.bytes = static_cast<uint64_t>(as_int(field(value, "bytes", where), sub(where, "bytes")));
  try {
    file.crc32 = crc_from_string(as_string(field(value, "crc32", where), sub(where, "crc32")));
  } catch (const std::invalid_argument& e) {
    bad(sub(where, "crc32"), e.what());
  }
  return file;
}

json slice_to_json(const StoredSlice& slice) {
  json out{{"file", slice.file}, {"offset", slice.offset}, {"extent", slice.extent}};
  if (!slice.dataset.empty()) out["dataset"] = slice.dataset;
  return out;
}

// The optional "dataset" of a slice (absent: the tensor's name).
std::string dataset_from_json(const json& value, const std::string& where) {
  if (!value.contains("dataset")) return "";
  std::string dataset = as_string(value.at("dataset"), sub(where, "dataset"));
  if (dataset.empty() || dataset.find('/') != std::string::npos)
    bad(sub(where, "dataset"), fmt::format("\"{}\" is not a dataset name (empty or containing '/')", dataset));
  return dataset;
}

StoredSlice slice_from_json(const json& value, const std::string& where, size_t n_files) {
  StoredSlice slice;
  const int64_t file = as_int(field(value, "file", where), sub(where, "file"));
  if (file >= static_cast<int64_t>(n_files)) bad(sub(where, "file"), fmt::format("file {} of {}", file, n_files));
  slice.file = static_cast<int>(file);
  slice.offset = as_shape(field(value, "offset", where), sub(where, "offset"));
  slice.extent = as_shape(field(value, "extent", where), sub(where, "extent"));
  slice.dataset = dataset_from_json(value, where);
  return slice;
}

json tensor_header_json(const TensorInfo& tensor) {
  return json{{"name", tensor.name}, {"shape", tensor.shape}, {"dtype", std::string(dtype_name(tensor.dtype))}};
}

TensorInfo tensor_header_from_json(const json& value, const std::string& where) {
  TensorInfo tensor;
  tensor.name = as_string(field(value, "name", where), sub(where, "name"));
  if (tensor.name.empty() || tensor.name == "." || tensor.name == ".." || tensor.name.find('/') != std::string::npos) {
    bad(sub(where, "name"), fmt::format("\"{}\" is not a valid tensor name", tensor.name));
  }
  tensor.shape = as_shape(field(value, "shape", where), sub(where, "shape"));
  tensor.dtype = as_dtype(field(value, "dtype", where), sub(where, "dtype"));
  return tensor;
}

bool boxes_overlap(const StoredSlice& a, const StoredSlice& b) {
  for (size_t d = 0; d < a.offset.size(); ++d) {
    const int64_t lo = std::max(a.offset[d], b.offset[d]);
    const int64_t hi = std::min(a.offset[d] + a.extent[d], b.offset[d] + b.extent[d]);
    if (lo >= hi) return false;
  }
  return true;
}

std::string box_str(const StoredSlice& s) {
  std::vector<std::string> parts;
  for (size_t d = 0; d < s.offset.size(); ++d)
    parts.push_back(fmt::format("{}:{}", s.offset[d], s.offset[d] + s.extent[d]));
  return fmt::format("[{}]", fmt::join(parts, ", "));
}

}  // namespace

std::string index_file_name(int writer_index) {
  return fmt::format("rank-{:05d}.index.json", writer_index);
}

void check_slices_tile(const TensorInfo& tensor) {
  const auto where = fmt::format("tensor '{}' {}", tensor.name, shape_str(tensor.shape));
  if (tensor.slices.empty()) bad(where, "no file holds any part of it");
  int64_t covered = 0;
  for (const StoredSlice& s : tensor.slices) {
    if (s.offset.size() != tensor.shape.size() || s.extent.size() != tensor.shape.size()) {
      bad(where, fmt::format("slice in file {} has {} offsets and {} extents for {} dimensions", s.file,
                             s.offset.size(), s.extent.size(), tensor.shape.size()));
    }
    for (size_t d = 0; d < s.offset.size(); ++d) {
      if (s.offset[d] < 0 || s.extent[d] < 0 || s.offset[d] + s.extent[d] > tensor.shape[d]) {
        bad(where, fmt::format("slice {} in file {} lies outside the tensor", box_str(s), s.file));
      }
    }
    covered += shape_numel(s.extent);
  }
  for (size_t i = 0; i < tensor.slices.size(); ++i) {
    for (size_t j = i + 1; j < tensor.slices.size(); ++j) {
      const StoredSlice& a = tensor.slices[i];
      const StoredSlice& b = tensor.slices[j];
      if (boxes_overlap(a, b) && shape_numel(a.extent) > 0 && shape_numel(b.extent) > 0) {
        bad(where, fmt::format("slices {} (file {}) and {} (file {}) overlap", box_str(a), a.file, box_str(b), b.file));
      }
    }
  }
  // In-bounds and pairwise disjoint, so the slices cover the tensor exactly when the volumes add up.
  if (covered != shape_numel(tensor.shape)) {
    bad(where, fmt::format("its slices hold {} of its {} elements", covered, shape_numel(tensor.shape)));
  }
}

json to_json(const Manifest& manifest) {
  json files = json::array();
  for (const FileInfo& f : manifest.files) files.push_back(file_to_json(f));
  json tensors = json::array();
  for (const TensorInfo& t : manifest.tensors) {
    json entry = tensor_header_json(t);
    json slices = json::array();
    for (const StoredSlice& s : t.slices) slices.push_back(slice_to_json(s));
    entry["slices"] = std::move(slices);
    tensors.push_back(std::move(entry));
  }
  return json{{"format", kFormatName},         {"version", kFormatVersion},     {"step", manifest.step},
              {"files", std::move(files)},     {"tensors", std::move(tensors)}, {"metadata", manifest.metadata},
              {"recipe", manifest.recipe_yaml}};
}

Manifest manifest_from_json(const json& value) {
  Manifest manifest;
  manifest.version = check_format(value, kFormatName);
  manifest.step = as_int(field(value, "step", ""), "step");
  const json& files = as_array(field(value, "files", ""), "files");
  for (size_t i = 0; i < files.size(); ++i) manifest.files.push_back(file_from_json(files[i], item("files", i)));
  const json& tensors = as_array(field(value, "tensors", ""), "tensors");
  std::map<std::string, size_t, std::less<>> seen;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string where = item("tensors", i);
    TensorInfo tensor = tensor_header_from_json(tensors[i], where);
    const json& slices = as_array(field(tensors[i], "slices", where), sub(where, "slices"));
    for (size_t k = 0; k < slices.size(); ++k) {
      tensor.slices.push_back(slice_from_json(slices[k], item(sub(where, "slices"), k), manifest.files.size()));
    }
    if (!seen.emplace(tensor.name, i).second) bad(where, fmt::format("tensor '{}' is listed twice", tensor.name));
    try {
      check_slices_tile(tensor);
    } catch (const std::runtime_error& e) {
      bad(where, e.what());
    }
    manifest.tensors.push_back(std::move(tensor));
  }
  manifest.metadata = field(value, "metadata", "");
  if (!manifest.metadata.is_object()) bad("metadata", "expected a JSON object");
  manifest.recipe_yaml = as_string(field(value, "recipe", ""), "recipe");
  return manifest;
}

json to_json(const WriterIndex& index) {
  json tensors = json::array();
  for (const TensorInfo& t : index.tensors) {
    for (const StoredSlice& slice : t.slices) {  // an entry per slice
      json entry = tensor_header_json(t);
      entry["offset"] = slice.offset;
      entry["extent"] = slice.extent;
      if (!slice.dataset.empty()) entry["dataset"] = slice.dataset;
      tensors.push_back(std::move(entry));
    }
  }
  return json{{"format", kIndexFormatName},   {"version", kFormatVersion}, {"writer_index", index.writer_index},
              {"n_writers", index.n_writers}, {"step", index.step},        {"file", file_to_json(index.file)},
              {"tensors", std::move(tensors)}};
}

WriterIndex writer_index_from_json(const json& value) {
  WriterIndex index;
  check_format(value, kIndexFormatName);
  index.writer_index = static_cast<int>(as_int(field(value, "writer_index", ""), "writer_index"));
  index.n_writers = static_cast<int>(as_int(field(value, "n_writers", ""), "n_writers", 1));
  index.step = as_int(field(value, "step", ""), "step");
  index.file = file_from_json(field(value, "file", ""), "file");
  const json& tensors = as_array(field(value, "tensors", ""), "tensors");
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::string where = item("tensors", i);
    TensorInfo tensor = tensor_header_from_json(tensors[i], where);
    StoredSlice slice;
    slice.file = index.writer_index;
    slice.offset = as_shape(field(tensors[i], "offset", where), sub(where, "offset"));
    slice.extent = as_shape(field(tensors[i], "extent", where), sub(where, "extent"));
    slice.dataset = dataset_from_json(tensors[i], where);
    tensor.slices.push_back(std::move(slice));
    index.tensors.push_back(std::move(tensor));
  }
  return index;
}

}  // namespace dsx::ckpt::detail
