#include "trainer/checkpoint/inspect.h"

#include <fmt/core.h>
#include <fmt/format.h>

#include <algorithm>

#include "kernels/error.h"
#include "trainer/checkpoint/fs_util.h"

namespace dsx::ckpt {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string human_bytes(uint64_t bytes) {
  constexpr const char* kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  double value = static_cast<double>(bytes);
  size_t unit = 0;
  while (value >= 1024.0 && unit + 1 < std::size(kUnits)) {
    value /= 1024.0;
    ++unit;
  }
  return unit == 0 ? fmt::format("{} B", bytes) : fmt::format("{:.2f} {}", value, kUnits[unit]);
}

std::string shape_text(const json& shape) {
  std::vector<int64_t> dims = shape.get<std::vector<int64_t>>();
  return fmt::format("[{}]", fmt::join(dims, ", "));
}

// rank-00001.h5[128:256, 0:64], or the file name alone when the slice is the whole tensor.
std::string slice_text(const json& slice, const json& shape) {
  const auto offset = slice.at("offset").get<std::vector<int64_t>>();
  const auto extent = slice.at("extent").get<std::vector<int64_t>>();
  const auto dims = shape.get<std::vector<int64_t>>();
  const bool whole = extent == dims;
  std::string file = slice.at("file").get<std::string>();
  if (whole) return file;
  std::vector<std::string> ranges;
  for (size_t d = 0; d < offset.size(); ++d) ranges.push_back(fmt::format("{}:{}", offset[d], offset[d] + extent[d]));
  return fmt::format("{}[{}]", file, fmt::join(ranges, ", "));
}

std::string entry_kind_name(EntryKind kind) {
  switch (kind) {
    case EntryKind::complete:
      return "complete";
    case EntryKind::invalid:
      return "invalid";
    case EntryKind::temporary:
      return "temporary";
  }
  return "?";
}

void format_checkpoint(const json& d, std::string& out) {
  out += fmt::format("checkpoint {}\n", d.at("dir").get<std::string>());
  out += fmt::format("  step      {} (format version {})\n", d.at("step").get<int64_t>(),
                     d.at("format_version").get<int>());
  const json& files = d.at("files");
  out +=
      fmt::format("  files     {}, {} in all{}\n", files.size(), human_bytes(d.at("total_file_bytes").get<uint64_t>()),
                  d.at("verified").get<bool>() ? ", sizes and CRC-32 verified" : "");
  for (const json& f : files) {
    out += fmt::format("            {}  {:>12} bytes  crc32 {}\n", f.at("name").get<std::string>(),
                       f.at("bytes").get<uint64_t>(), f.at("crc32").get<std::string>());
  }
  out += fmt::format("  tensors   {}, {} elements, {} of data\n", d.at("n_tensors").get<size_t>(),
                     d.at("total_elements").get<int64_t>(), human_bytes(d.at("total_tensor_bytes").get<uint64_t>()));
  const auto keys = d.at("metadata_keys").get<std::vector<std::string>>();
  out += fmt::format("  metadata  {}\n", keys.empty() ? "(none)" : fmt::format("{}", fmt::join(keys, ", ")));
  out += fmt::format("  recipe    {} lines\n", d.at("recipe_lines").get<int64_t>());

  const json& tensors = d.at("tensors");
  size_t name_width = 4, shape_width = 5;
  for (const json& t : tensors) {
    name_width = std::max(name_width, t.at("name").get_ref<const std::string&>().size());
    shape_width = std::max(shape_width, shape_text(t.at("shape")).size());
  }
  out += fmt::format("\n  {:<{}}  {:<8}  {:<{}}  {:>12}  {}\n", "name", name_width, "dtype", "shape", shape_width,
                     "bytes", "slices");
  for (const json& t : tensors) {
    std::vector<std::string> slices;
    for (const json& s : t.at("slices")) slices.push_back(slice_text(s, t.at("shape")));
    out += fmt::format("  {:<{}}  {:<8}  {:<{}}  {:>12}  {}\n", t.at("name").get<std::string>(), name_width,
                       t.at("dtype").get<std::string>(), shape_text(t.at("shape")), shape_width,
                       t.at("bytes").get<int64_t>(), fmt::join(slices, " "));
  }
}

}  // namespace

json describe_checkpoint(const CheckpointReader& reader) {
  const Manifest& m = reader.manifest();
  json files = json::array();
  uint64_t file_bytes = 0;
  for (const FileInfo& f : m.files) {
    files.push_back({{"name", f.name}, {"bytes", f.bytes}, {"crc32", detail::crc_to_string(f.crc32)}});
    file_bytes += f.bytes;
  }
  json tensors = json::array();
  int64_t tensor_bytes = 0, elements = 0;
  for (const TensorInfo& t : m.tensors) {
    json slices = json::array();
    for (const StoredSlice& s : t.slices) {
      slices.push_back(
          {{"file", m.files.at(static_cast<size_t>(s.file)).name}, {"offset", s.offset}, {"extent", s.extent}});
    }
    tensors.push_back({{"name", t.name},
                       {"shape", t.shape},
                       {"dtype", std::string(dtype_name(t.dtype))},
                       {"bytes", t.nbytes()},
                       {"slices", std::move(slices)}});
    tensor_bytes += t.nbytes();
    elements += shape_numel(t.shape);
  }
  json keys = json::array();
  for (const auto& [key, value] : m.metadata.items()) keys.push_back(key);
  const int64_t recipe_lines = m.recipe_yaml.empty() ? 0
                                                     : std::count(m.recipe_yaml.begin(), m.recipe_yaml.end(), '\n') +
                                                           (m.recipe_yaml.back() != '\n');
  return json{{"kind", "checkpoint"},
              {"dir", reader.dir().string()},
              {"step", m.step},
              {"format_version", m.version},
              {"files", std::move(files)},
              {"total_file_bytes", file_bytes},
              {"n_tensors", m.tensors.size()},
              {"total_elements", elements},
              {"total_tensor_bytes", tensor_bytes},
              {"tensors", std::move(tensors)},
              {"metadata_keys", std::move(keys)},
              {"recipe_lines", recipe_lines},
              {"verified", false}};
}

json describe_root(const fs::path& root) {
  json entries = json::array();
  for (const CheckpointEntry& e : list_checkpoints(root)) {
    entries.push_back({{"dir", e.dir.filename().string()},
                       {"step", e.step},
                       {"state", entry_kind_name(e.kind)},
                       {"problem", e.problem}});
  }
  json description{{"kind", "root"}, {"dir", root.string()}, {"checkpoints", std::move(entries)}, {"latest", nullptr}};
  if (const auto newest = latest(root)) {
    description["latest"] = describe_checkpoint(CheckpointReader(*newest, ReaderOptions{.verify_checksums = false}));
  }
  return description;
}

json describe(const fs::path& dir, bool verify) {
  if (!fs::is_directory(dir)) throw UserError(fmt::format("checkpoint inspect: {} is not a directory", dir.string()));
  if (!is_checkpoint_dir(dir)) {
    json description = describe_root(dir);
    if (description["checkpoints"].empty()) {
      throw UserError(
          fmt::format("checkpoint inspect: {} holds no checkpoint (no manifest.json and no step-* "
                      "directories)",
                      dir.string()));
    }
    if (verify && !description["latest"].is_null()) {
      CheckpointReader reader(description["latest"]["dir"].get<std::string>());
      reader.verify_all();
      description["latest"]["verified"] = true;
    }
    return description;
  }
  CheckpointReader reader(dir, ReaderOptions{.verify_checksums = false});
  if (verify) reader.verify_all();
  json description = describe_checkpoint(reader);
  description["verified"] = verify;
  return description;
}

std::string format_description(const json& d) {
  std::string out;
  if (d.at("kind") == "checkpoint") {
    format_checkpoint(d, out);
    return out;
  }
  const json& entries = d.at("checkpoints");
  const auto complete =
      std::count_if(entries.begin(), entries.end(), [](const json& e) { return e["state"] == "complete"; });
  out += fmt::format("checkpoint root {}: {} complete checkpoint{}, {} other director{}\n",
                     d.at("dir").get<std::string>(), complete, complete == 1 ? "" : "s", entries.size() - complete,
                     entries.size() - complete == 1 ? "y" : "ies");
  for (const json& e : entries) {
    const std::string& problem = e.at("problem").get_ref<const std::string&>();
    out += fmt::format("  {:<28}  {}{}\n", e.at("dir").get<std::string>(), e.at("state").get<std::string>(),
                       problem.empty() ? "" : ": " + problem);
  }
  if (d.at("latest").is_null()) {
    out += "no complete checkpoint\n";
  } else {
    out += "\nnewest complete ";
    format_checkpoint(d.at("latest"), out);
  }
  return out;
}

}  // namespace dsx::ckpt
