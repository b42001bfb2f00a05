#include "trainer/checkpoint/checkpoint.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>

#include "kernels/error.h"
#include "trainer/checkpoint/fs_util.h"
#include "trainer/checkpoint/h5_slices.h"
#include "trainer/checkpoint/manifest_json.h"

namespace dsx::ckpt {

namespace fs = std::filesystem;
using detail::WriterIndex;

// ---- names -------------------------------------------------------------------------------------

std::string step_dir_name(int64_t step) {
  return fmt::format("step-{:06d}", step);
}
std::string writer_file_name(int writer_index) {
  return fmt::format("rank-{:05d}.h5", writer_index);
}

DType dtype_from_name(std::string_view name) {
  for (DType t : {DType::f64, DType::f32, DType::bf16, DType::fp8_e4m3, DType::fp8_e5m2, DType::i32, DType::i64}) {
    if (dtype_name(t) == name) return t;
  }
  throw std::invalid_argument(fmt::format("unknown dtype '{}'", name));
}

int64_t TensorInfo::nbytes() const {
  return shape_numel(shape) * static_cast<int64_t>(dtype_size(dtype));
}

bool is_checkpoint_dir(const fs::path& dir) {
  return fs::is_regular_file(dir / kManifestFile);
}

namespace {

// An empty path names the working directory (so root / name has a parent to fsync).
fs::path directory_or_cwd(const fs::path& dir) {
  return dir.empty() ? fs::path(".") : dir;
}

// step-000123 -> 123; step-000123.tmp-77 / step-000123.old-77 -> temporary; anything else -> none.
struct ParsedName {
  int64_t step = -1;
  bool temporary = false;
};
std::optional<ParsedName> parse_dir_name(const std::string& name) {
  static const std::regex kPattern(R"(step-(\d{1,18})(\.(tmp|old)-.+)?)");
  std::smatch m;
  if (!std::regex_match(name, m, kPattern)) return std::nullopt;
  return ParsedName{std::stoll(m[1].str()), m[2].matched};
}

// ---- saving ------------------------------------------------------------------------------------

}  // namespace

std::string stored_dataset_name(const std::string& name, int k) {
  return k == 0 ? name : name + "@" + std::to_string(k);
}

namespace {

void check_options(const CheckpointState& state, const SaveOptions& o) {
  if (o.n_writers < 1) throw std::invalid_argument(fmt::format("checkpoint save: n_writers = {}", o.n_writers));
  if (o.writer_index < 0 || o.writer_index >= o.n_writers) {
    throw std::invalid_argument(fmt::format("checkpoint save: writer_index {} of {}", o.writer_index, o.n_writers));
  }
  if (o.n_writers > 1 && !o.barrier) {
    throw std::invalid_argument("checkpoint save: several writers need a barrier to agree on when all files exist");
  }
  if (o.keep_last < 0) throw std::invalid_argument(fmt::format("checkpoint save: keep_last = {}", o.keep_last));
  if (state.step < 0) throw std::invalid_argument(fmt::format("checkpoint save: step = {}", state.step));
  if (o.writer_index == 0 && !state.metadata.is_object()) {
    throw std::invalid_argument("checkpoint save: metadata must be a JSON object, got " +
                                std::string(state.metadata.type_name()));
  }
}

// The slice as it will be stored: offset filled in, everything checked against the global shape.
TensorSlice checked_slice(const TensorSlice& s) {
  const auto fail = [&](const std::string& what) {
    throw std::invalid_argument(fmt::format("checkpoint save: tensor '{}': {}", s.name, what));
  };
  if (s.name.empty() || s.name.find('/') != std::string::npos || s.name == "." || s.name == "..") {
    fail("not a valid tensor name (empty, '.', '..' or containing '/')");
  }
  if (!s.data.defined()) fail("data is undefined");
  if (s.data.device() != Device::cpu) fail("data must be on the CPU; copy device tensors to the host first");
  const size_t ndim = s.global_shape.size();
  if (static_cast<size_t>(s.data.ndim()) != ndim) {
    fail(fmt::format("data {} has a different rank than the global shape {}", shape_str(s.data.shape()),
                     shape_str(s.global_shape)));
  }
  TensorSlice out = s;
  if (out.offset.empty()) out.offset.assign(ndim, 0);
  if (out.offset.size() != ndim) fail(fmt::format("offset has {} entries for {} dimensions", out.offset.size(), ndim));
  for (size_t d = 0; d < ndim; ++d) {
    if (s.global_shape[d] < 0 || out.offset[d] < 0 || out.offset[d] + s.data.shape()[d] > s.global_shape[d]) {
      fail(fmt::format("slice at offset {} with extent {} does not fit in the global shape {}", shape_str(out.offset),
                       shape_str(s.data.shape()), shape_str(s.global_shape)));
    }
  }
  return out;
}

// Every slice checked (and offsets filled in) before anything touches the disk.
std::vector<TensorSlice> checked_slices(std::span<const TensorSlice> tensors, int writer_index) {
  std::vector<TensorSlice> slices;
  std::map<std::string, Shape, std::less<>> global_shapes;
  for (const TensorSlice& s : tensors) {
    slices.push_back(checked_slice(s));
    const auto [it, first] = global_shapes.emplace(s.name, s.global_shape);
    if (!first && (it->second != s.global_shape)) {
      throw std::invalid_argument(fmt::format("checkpoint save: tensor '{}' given to writer {} as {} and as {}", s.name,
                                              writer_index, shape_str(it->second), shape_str(s.global_shape)));
    }
  }
  return slices;  // overlapping parts are found when the writers' slices are merged
}

// Writes this writer's HDF5 file and its index into dir; returns the index.
WriterIndex write_writer_files(const fs::path& dir, const CheckpointState& state, std::span<const TensorSlice> slices,
                               const SaveOptions& o) {
  WriterIndex index;
  index.writer_index = o.writer_index;
  index.n_writers = o.n_writers;
  index.step = state.step;
  index.file.name = writer_file_name(o.writer_index);
  const fs::path file = dir / index.file.name;
  detail::SliceFileWriter writer(file, {o.writer_index, o.n_writers, state.step});
  std::map<std::string, size_t, std::less<>> position;  // tensor -> its entry in index.tensors
  for (const TensorSlice& s : slices) {
    const auto [it, first] = position.emplace(s.name, index.tensors.size());
    if (first) index.tensors.push_back({s.name, s.global_shape, s.data.dtype(), {}});
    TensorInfo& info = index.tensors[it->second];
    if (info.dtype != s.data.dtype()) {
      throw std::invalid_argument(fmt::format("checkpoint save: tensor '{}' given to writer {} as {} and as {}", s.name,
                                              o.writer_index, dtype_name(info.dtype), dtype_name(s.data.dtype())));
    }
    const std::string dataset = stored_dataset_name(s.name, static_cast<int>(info.slices.size()));
    writer.write(s, dataset);
    info.slices.push_back({o.writer_index, s.offset, s.data.shape(), dataset == s.name ? "" : dataset});
  }
  writer.close();
  detail::fsync_path(file);
  const detail::FileDigest digest = detail::digest_file(file);
  index.file.bytes = digest.bytes;
  index.file.crc32 = digest.crc32;
  detail::write_file_synced(dir / detail::index_file_name(o.writer_index), detail::to_json(index).dump());
  return index;
}

// Merges every writer's index into one manifest; inconsistencies between writers are caller bugs.
Manifest merge_indexes(const fs::path& dir, const CheckpointState& state, int n_writers) {
  Manifest manifest;
  manifest.step = state.step;
  manifest.metadata = state.metadata;
  manifest.recipe_yaml = state.recipe_yaml;
  std::map<std::string, size_t, std::less<>> position;
  for (int w = 0; w < n_writers; ++w) {
    const fs::path path = dir / detail::index_file_name(w);
    if (!fs::exists(path)) {
      throw std::runtime_error(
          fmt::format("checkpoint save: {} is missing after the barrier; writer {} did not "
                      "finish (or wrote into another attempt directory)",
                      path.string(), w));
    }
    WriterIndex index;
    try {
      index = detail::writer_index_from_json(nlohmann::json::parse(detail::read_file(path)));
    } catch (const std::exception& e) {
      throw std::runtime_error(fmt::format("checkpoint save: cannot read {}: {}", path.string(), e.what()));
    }
    if (index.step != state.step || index.writer_index != w || index.n_writers != n_writers) {
      throw std::invalid_argument(
          fmt::format("checkpoint save: writer {} saved step {} as writer {} of {}, writer 0 "
                      "saves step {} with {} writers",
                      w, index.step, index.writer_index, index.n_writers, state.step, n_writers));
    }
    manifest.files.push_back(index.file);
    for (const TensorInfo& t : index.tensors) {
      const auto [it, inserted] = position.emplace(t.name, manifest.tensors.size());
      if (inserted) {
        manifest.tensors.push_back(t);
        continue;
      }
      TensorInfo& merged = manifest.tensors[it->second];
      if (merged.shape != t.shape || merged.dtype != t.dtype) {
        throw std::invalid_argument(
            fmt::format("checkpoint save: tensor '{}' is {} {} on writer {} but {} {} on an earlier writer", t.name,
                        dtype_name(t.dtype), shape_str(t.shape), w, dtype_name(merged.dtype), shape_str(merged.shape)));
      }
      merged.slices.insert(merged.slices.end(), t.slices.begin(), t.slices.end());
    }
  }
  for (const TensorInfo& t : manifest.tensors) {
    try {
      detail::check_slices_tile(t);
    } catch (const std::runtime_error& e) {
      throw std::invalid_argument(std::string("checkpoint save: the writers' slices do not tile the tensor: ") +
                                  e.what());
    }
  }
  return manifest;
}

[[noreturn]] void throw_rename_error(const fs::path& from, const fs::path& to) {
  throw std::runtime_error(fmt::format("cannot rename {} to {}: {}", from.string(), to.string(), std::strerror(errno)));
}

// Moves the finished temporary directory to its final name, durably (the root is fsynced). When a checkpoint of that
// step already exists the two are swapped atomically (renameat2 RENAME_EXCHANGE) and the old one deleted; on file
// systems without exchange, the old one is first moved aside.
void publish(const fs::path& root, const fs::path& tmp, const fs::path& final_dir, const std::string& attempt) {
  if (!fs::exists(final_dir)) {
    if (std::rename(tmp.c_str(), final_dir.c_str()) != 0) throw_rename_error(tmp, final_dir);
    detail::fsync_path(root);
    return;
  }
  if (::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_dir.c_str(), RENAME_EXCHANGE) == 0) {
    detail::fsync_path(root);
    fs::remove_all(tmp);  // now holds the replaced checkpoint
    return;
  }
  const fs::path aside = root / (final_dir.filename().string() + ".old-" + attempt);
  fs::remove_all(aside);
  if (std::rename(final_dir.c_str(), aside.c_str()) != 0) throw_rename_error(final_dir, aside);
  if (std::rename(tmp.c_str(), final_dir.c_str()) != 0) throw_rename_error(tmp, final_dir);
  detail::fsync_path(root);
  fs::remove_all(aside);
}

// Deletes the oldest complete checkpoints beyond keep_last, never the one just written.
void prune(const fs::path& root, const fs::path& just_written, int keep_last) {
  if (keep_last <= 0) return;
  std::vector<CheckpointEntry> complete;
  for (CheckpointEntry& e : list_checkpoints(root)) {
    if (e.kind == EntryKind::complete && e.dir.filename() != just_written.filename()) complete.push_back(std::move(e));
  }
  std::sort(complete.begin(), complete.end(), [](const auto& a, const auto& b) { return a.step > b.step; });
  for (size_t i = static_cast<size_t>(keep_last - 1); i < complete.size(); ++i) fs::remove_all(complete[i].dir);
}

void commit(const fs::path& root, const fs::path& tmp, const CheckpointState& state, const SaveOptions& o,
            const std::string& attempt) {
  const Manifest manifest = merge_indexes(tmp, state, o.n_writers);
  detail::write_file_synced(tmp / kManifestFile, detail::to_json(manifest).dump(1));
  for (int w = 0; w < o.n_writers; ++w) fs::remove(tmp / detail::index_file_name(w));
  detail::fsync_path(tmp);
  const fs::path final_dir = root / step_dir_name(state.step);
  publish(root, tmp, final_dir, attempt);
  prune(root, final_dir, o.keep_last);
}

}  // namespace

fs::path save(const fs::path& root_arg, const CheckpointState& state, std::span<const TensorSlice> tensors,
              const SaveOptions& options) {
  check_options(state, options);
  const fs::path root = directory_or_cwd(root_arg);
  const std::string attempt = options.attempt_id.empty() ? std::to_string(::getpid()) : options.attempt_id;
  if (attempt.find('/') != std::string::npos) throw std::invalid_argument("checkpoint save: attempt_id contains '/'");
  const std::vector<TensorSlice> slices = checked_slices(tensors, options.writer_index);
  const fs::path tmp = root / (step_dir_name(state.step) + ".tmp-" + attempt);
  fs::create_directories(tmp);
  write_writer_files(tmp, state, slices, options);
  if (options.barrier) options.barrier();
  if (options.writer_index == 0) commit(root, tmp, state, options, attempt);
  if (options.barrier) options.barrier();
  return root / step_dir_name(state.step);
}

// ---- the manifest ------------------------------------------------------------------------------

Manifest read_manifest(const fs::path& dir) {
  const fs::path path = dir / kManifestFile;
  if (!fs::exists(path)) {
    throw UserError(
        fmt::format("checkpoint {}: no {}; the checkpoint is incomplete (its save did not finish) or the "
                    "directory is not a dsx checkpoint",
                    dir.string(), kManifestFile));
  }
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(detail::read_file(path));
  } catch (const nlohmann::json::parse_error& e) {
    throw UserError(fmt::format("checkpoint {}: {} is not valid JSON ({})", dir.string(), kManifestFile, e.what()));
  } catch (const std::runtime_error& e) {
    throw UserError(fmt::format("checkpoint {}: {}", dir.string(), e.what()));
  }
  try {
    return detail::manifest_from_json(json);
  } catch (const std::runtime_error& e) {
    throw UserError(fmt::format("checkpoint {}: {}: {}", dir.string(), kManifestFile, e.what()));
  }
}

// ---- loading -----------------------------------------------------------------------------------

struct CheckpointReader::Files {
  std::vector<std::unique_ptr<detail::SliceFileReader>> open;
  std::vector<bool> verified;
};

CheckpointReader::CheckpointReader(fs::path dir, ReaderOptions options)
    : dir_(std::move(dir)), options_(options), manifest_(read_manifest(dir_)), files_(std::make_unique<Files>()) {
  for (size_t i = 0; i < manifest_.tensors.size(); ++i) by_name_.emplace(manifest_.tensors[i].name, i);
  files_->open.resize(manifest_.files.size());
  files_->verified.resize(manifest_.files.size(), false);
}

CheckpointReader::~CheckpointReader() = default;
CheckpointReader::CheckpointReader(CheckpointReader&&) noexcept = default;
CheckpointReader& CheckpointReader::operator=(CheckpointReader&&) noexcept = default;

const TensorInfo* CheckpointReader::find(std::string_view name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : &manifest_.tensors[it->second];
}

namespace {

// "while reading tensor 'x'" when there is a tensor to name.
std::string tensor_context(std::string_view tensor) {
  return tensor.empty() ? std::string() : fmt::format(" (while reading tensor '{}')", tensor);
}

void verify_file(const fs::path& dir, const FileInfo& info, std::string_view tensor) {
  const fs::path path = dir / info.name;
  const auto fail = [&](const std::string& what) {
    throw UserError(fmt::format("checkpoint {}: file {} {}{}", dir.string(), info.name, what, tensor_context(tensor)));
  };
  if (!fs::exists(path)) fail("is missing");
  const uint64_t size = fs::file_size(path);
  if (size < info.bytes) fail(fmt::format("is truncated: {} bytes, the manifest says {}", size, info.bytes));
  if (size != info.bytes) fail(fmt::format("has {} bytes, the manifest says {}", size, info.bytes));
  const detail::FileDigest digest = detail::digest_file(path);
  if (digest.crc32 != info.crc32) {
    fail(fmt::format("is corrupt: its CRC-32 is {}, the manifest says {}", detail::crc_to_string(digest.crc32),
                     detail::crc_to_string(info.crc32)));
  }
}

// Where a stored slice and a requested box [offset, offset + extent) intersect: the start in the
// slice's dataset, the start in the destination, and the size. nullopt when they do not.
struct Overlap {
  Shape file_start, mem_start, count;
};
std::optional<Overlap> overlap(const StoredSlice& s, const Shape& offset, const Shape& extent) {
  const size_t ndim = offset.size();
  Overlap o{Shape(ndim), Shape(ndim), Shape(ndim)};
  for (size_t d = 0; d < ndim; ++d) {
    const int64_t lo = std::max(offset[d], s.offset[d]);
    const int64_t hi = std::min(offset[d] + extent[d], s.offset[d] + s.extent[d]);
    if (lo >= hi) return std::nullopt;
    o.file_start[d] = lo - s.offset[d];
    o.mem_start[d] = lo - offset[d];
    o.count[d] = hi - lo;
  }
  return o;
}

}  // namespace

detail::SliceFileReader& CheckpointReader::file(int index, std::string_view tensor, bool verify) {
  const size_t i = static_cast<size_t>(index);
  const FileInfo& info = manifest_.files.at(i);
  if (verify && !files_->verified[i]) {
    verify_file(dir_, info, tensor);
    files_->verified[i] = true;
  }
  std::unique_ptr<detail::SliceFileReader>& open = files_->open[i];
  if (!open) {
    const fs::path path = dir_ / info.name;
    if (!fs::exists(path)) {
      throw UserError(
          fmt::format("checkpoint {}: file {} is missing{}", dir_.string(), info.name, tensor_context(tensor)));
    }
    try {
      open = std::make_unique<detail::SliceFileReader>(path);
    } catch (const std::runtime_error& e) {
      throw UserError(fmt::format("checkpoint {}: file {}{}", dir_.string(), e.what(), tensor_context(tensor)));
    }
    if (open->identity().step != manifest_.step) {
      const int64_t file_step = open->identity().step;
      open.reset();
      throw UserError(fmt::format("checkpoint {}: file {} belongs to step {}, the manifest is for step {}{}",
                                  dir_.string(), info.name, file_step, manifest_.step, tensor_context(tensor)));
    }
  }
  return *open;
}

void CheckpointReader::read(const LoadRequest& r) {
  const TensorInfo* tensor = find(r.name);
  const auto user_error = [&](const std::string& what) {
    throw UserError(fmt::format("checkpoint {}: tensor '{}' {}", dir_.string(), r.name, what));
  };
  if (tensor == nullptr) {
    user_error(fmt::format("is not in the checkpoint ({} tensors, step {})", manifest_.tensors.size(), step()));
  }
  if (tensor->shape != r.global_shape) {
    user_error(fmt::format("has shape {} in the checkpoint, expected {}", shape_str(tensor->shape),
                           shape_str(r.global_shape)));
  }
  if (!r.dest.defined() || r.dest.device() != Device::cpu) {
    throw std::invalid_argument(fmt::format("checkpoint load: tensor '{}': destination must be a CPU tensor", r.name));
  }
  if (tensor->dtype != r.dest.dtype()) {
    user_error(fmt::format("is {} in the checkpoint, the destination is {}", dtype_name(tensor->dtype),
                           dtype_name(r.dest.dtype())));
  }
  const size_t ndim = tensor->shape.size();
  const Shape offset = r.offset.empty() ? Shape(ndim, 0) : r.offset;
  const Shape& extent = r.dest.shape();
  bool fits = offset.size() == ndim && extent.size() == ndim;
  for (size_t d = 0; fits && d < ndim; ++d) fits = offset[d] >= 0 && offset[d] + extent[d] <= tensor->shape[d];
  if (!fits) {
    throw std::invalid_argument(fmt::format("checkpoint load: tensor '{}': box at {} with extent {} is outside {}",
                                            r.name, shape_str(offset), shape_str(extent), shape_str(tensor->shape)));
  }
  // The stored slices tile the tensor (checked when the manifest was read), so copying every
  // non-empty intersection fills the requested box completely.
  for (const StoredSlice& s : tensor->slices) {
    const auto part = overlap(s, offset, extent);
    if (!part) continue;
    detail::SliceFileReader& source = file(s.file, r.name, options_.verify_checksums);
    try {
      source.read_box(s.dataset.empty() ? r.name : s.dataset, tensor->dtype, s.extent, part->file_start, part->count,
                      r.dest, part->mem_start);
    } catch (const std::runtime_error& e) {
      throw UserError(fmt::format("checkpoint {}: file {}{}", dir_.string(), e.what(), tensor_context(r.name)));
    }
  }
}

void CheckpointReader::read(std::span<const LoadRequest> requests) {
  for (const LoadRequest& r : requests) read(r);
}

Tensor CheckpointReader::read_whole(std::string_view name) {
  const TensorInfo* tensor = find(name);
  if (tensor == nullptr) {
    throw UserError(fmt::format("checkpoint {}: tensor '{}' is not in the checkpoint", dir_.string(), name));
  }
  Tensor dest = Tensor::empty(tensor->shape, tensor->dtype);
  read(LoadRequest{tensor->name, tensor->shape, {}, dest});
  return dest;
}

void CheckpointReader::verify_all() {
  for (size_t i = 0; i < manifest_.files.size(); ++i) file(static_cast<int>(i), "", /*verify=*/true);
}

CheckpointState load(const fs::path& dir, std::span<const LoadRequest> requests, ReaderOptions options) {
  CheckpointReader reader(dir, options);
  reader.read(requests);
  return CheckpointState{reader.step(), reader.metadata(), reader.recipe_yaml()};
}

// ---- finding checkpoints -----------------------------------------------------------------------

namespace {

// Why the step directory is not a complete checkpoint, or nullopt when it is.
std::optional<std::string> completeness_problem(const fs::path& dir, int64_t step) {
  try {
    const Manifest manifest = read_manifest(dir);
    if (manifest.step != step) return fmt::format("its manifest is for step {}", manifest.step);
    return std::nullopt;
  } catch (const UserError& e) {
    return std::string(e.what());
  }
}

}  // namespace

std::vector<CheckpointEntry> list_checkpoints(const fs::path& root_arg) {
  const fs::path root = directory_or_cwd(root_arg);
  std::vector<CheckpointEntry> entries;
  if (!fs::is_directory(root)) return entries;
  for (const fs::directory_entry& item : fs::directory_iterator(root)) {
    if (!item.is_directory()) continue;
    const auto parsed = parse_dir_name(item.path().filename().string());
    if (!parsed) continue;
    CheckpointEntry entry{item.path(), parsed->step, EntryKind::temporary, "an unfinished or replaced save"};
    if (!parsed->temporary) {
      const auto problem = completeness_problem(item.path(), parsed->step);
      entry.kind = problem ? EntryKind::invalid : EntryKind::complete;
      entry.problem = problem.value_or("");
    }
    entries.push_back(std::move(entry));
  }
  std::sort(entries.begin(), entries.end(), [](const auto& a, const auto& b) {
    return a.step != b.step ? a.step < b.step : a.dir.filename() < b.dir.filename();
  });
  return entries;
}

std::optional<fs::path> latest(const fs::path& root_arg, LatestOptions options) {
  const fs::path root = directory_or_cwd(root_arg);
  if (!fs::is_directory(root)) return std::nullopt;
  std::vector<std::pair<int64_t, fs::path>> candidates;
  std::vector<fs::path> stale;
  for (const fs::directory_entry& item : fs::directory_iterator(root)) {
    if (!item.is_directory()) continue;
    const auto parsed = parse_dir_name(item.path().filename().string());
    if (!parsed) continue;
    if (parsed->temporary) {
      stale.push_back(item.path());
    } else {
      candidates.emplace_back(parsed->step, item.path());
    }
  }
  if (options.remove_stale) {
    for (const fs::path& dir : stale) fs::remove_all(dir);
  }
  // Newest first; only the manifests down to the first complete checkpoint are parsed.
  std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
  for (const auto& [step, dir] : candidates) {
    if (!completeness_problem(dir, step)) return dir;
  }
  return std::nullopt;
}

}  // namespace dsx::ckpt
