// Checkpoints: named tensors (each stored as slices of a global tensor) plus training metadata,
// written atomically as one HDF5 file per writing rank and a manifest. docs/CHECKPOINT_FORMAT.md
// describes the files on disk.
//
// Layout under a checkpoint root (e.g. `<run>/checkpoints`):
//   step-000123/manifest.json       every tensor's global shape, dtype and which file holds which slice;
//                                   step, metadata JSON, resolved recipe, per-file size and CRC-32
//   step-000123/rank-00000.h5       the slices writer 0 holds, one dataset per tensor
//   step-000123/rank-00001.h5       ...
//   step-000124.tmp-<attempt>/      a save in progress (or killed): never read, removed on request
//
// Saving (every writer calls save() with the same root, state.step and attempt id):
//   1. each writer writes its rank-NNNNN.h5 (and a small index file) into the temporary directory
//      and fsyncs them;
//   2. barrier();
//   3. writer 0 merges the indexes into manifest.json, fsyncs, renames the temporary directory to
//      step-NNNNNN, fsyncs the root, then deletes checkpoints beyond keep_last;
//   4. barrier(); so save() returns on every writer only once the checkpoint is complete.
// A process killed at any point leaves the previous complete checkpoints untouched; latest() only
// ever returns a directory whose manifest was written, and the manifest is written last.
//
// Loading is by request: "give me tensor NAME's box [offset, offset + dest.shape()) into dest".
// The reader copies the overlapping parts of every stored slice, so a tensor saved as 2 slices
// (EP2) loads as 4 slices, as 1 whole tensor, or as any other box. Files are checked (size,
// CRC-32, HDF5 header, format attributes) on first use; any mismatch throws dsx::UserError naming
// the checkpoint directory, the file and the tensor.
//
// Use (single process; a multi-rank run passes writer_index = rank among writers, n_writers,
// a communicator barrier and rank 0's pid as attempt_id):
//
//   std::vector<ckpt::TensorSlice> slices;
//   for (auto& p : params) slices.push_back({p.name, p.global_shape, p.offset, p.value});
//   ckpt::save(run_dir / "checkpoints", {step, {{"lr_schedule", ...}, {"rng", ...}}, recipe_text}, slices,
//              {.keep_last = 3});
//   ...
//   if (auto dir = ckpt::latest(run_dir / "checkpoints", {.remove_stale = true})) {
//     ckpt::CheckpointReader reader(*dir);
//     for (auto& p : params) reader.read({p.name, p.global_shape, p.offset, p.value});
//     step = reader.step(); restore(reader.metadata());
//   }
//
// Failure modes: a writer that dies leaves the others waiting in the barrier, so the barrier must
// time out (the multi-rank communicator's does). A failed save leaves its .tmp directory behind for
// latest({.remove_stale = true}). A CheckpointReader is not thread-safe; use one per thread.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "kernels/tensor.h"

namespace dsx::ckpt {

namespace detail {
class SliceFileReader;
}

// The manifest format this build writes; it reads this version and older ones. Version 2: a slice
// may name its dataset (a writer's several boxes of one tensor), which version-1 readers would
// misread.
inline constexpr int kFormatVersion = 2;
inline constexpr std::string_view kFormatName = "dsx-checkpoint";
inline constexpr std::string_view kManifestFile = "manifest.json";

// ---- saving ------------------------------------------------------------------------------------

// One writer's part of a tensor (a writer may give several disjoint parts of one tensor). data holds the box [offset,
// offset + data.shape()) of the global tensor; data.dtype() is the tensor's dtype. An empty offset means all zeros (the
// writer holds the box starting at the origin, e.g. the whole tensor).
struct TensorSlice {
  std::string name;  // Hugging Face name, or e.g. "optim.exp_avg.<param name>"; no '/'
  Shape global_shape;
  Shape offset;
  Tensor data;  // CPU, contiguous
};

// Everything besides tensors that a checkpoint carries. Only writer 0's metadata and recipe are
// stored; all writers must agree on the step.
struct CheckpointState {
  int64_t step = 0;
  // LR-schedule state, data-loader position, RNG state, ... Must be a JSON object.
  nlohmann::json metadata = nlohmann::json::object();
  std::string recipe_yaml;  // the resolved recipe
};

struct SaveOptions {
  int writer_index = 0;  // this writer's file is rank-<writer_index>.h5
  int n_writers = 1;
  // Synchronises the writers (an MPI barrier in multi-rank runs). Called twice by every writer:
  // after its own file is written, and after writer 0 has committed the checkpoint. Required when
  // n_writers > 1; optional with one writer (then it serves as a hook, e.g. for tests).
  std::function<void()> barrier{};
  // After a successful save, writer 0 deletes older complete checkpoints so that at most keep_last
  // remain, counting the one just written, which is never deleted. 0 keeps everything.
  int keep_last = 0;
  // Suffix of the temporary directory step-NNNNNN.tmp-<attempt_id>. Every writer of one save must
  // pass the same value (multi-rank: broadcast rank 0's); empty means this process's pid.
  std::string attempt_id{};
};

// Writes this writer's slices and, on writer 0, commits the checkpoint. Returns the final directory
// <root>/step-NNNNNN. Throws std::invalid_argument for inconsistent slices (a caller bug) and
// std::runtime_error for I/O failures; the temporary directory is then left for cleanup. If a
// complete checkpoint of the same step exists it is replaced (the old one is moved aside first, so
// a crash in between still leaves a complete checkpoint).
std::filesystem::path save(const std::filesystem::path& root, const CheckpointState& state,
                           std::span<const TensorSlice> tensors, const SaveOptions& options = {});

// ---- the manifest ------------------------------------------------------------------------------

struct StoredSlice {
  int file = 0;  // index into Manifest::files
  Shape offset;
  Shape extent;
  // The slice's dataset in its file: empty for the tensor's name; a writer's second, third, ...
  // slice of one tensor is "<name>@1", "<name>@2", ... (stored_dataset_name).
  std::string dataset;
};

// The name of a writer's k-th (from 0) slice of tensor `name` in its file.
std::string stored_dataset_name(const std::string& name, int k);

struct TensorInfo {
  std::string name;
  Shape shape;  // global
  DType dtype = DType::f32;
  std::vector<StoredSlice> slices;  // disjoint, together exactly the whole tensor
  int64_t nbytes() const;
};

struct FileInfo {
  std::string name;  // rank-NNNNN.h5, relative to the checkpoint directory
  uint64_t bytes = 0;
  uint32_t crc32 = 0;  // zlib CRC-32 of the whole file
};

struct Manifest {
  int version = kFormatVersion;
  int64_t step = 0;
  std::vector<FileInfo> files;
  std::vector<TensorInfo> tensors;  // in the order the writers listed them
  nlohmann::json metadata = nlohmann::json::object();
  std::string recipe_yaml;
};

// Parses and validates <dir>/manifest.json (format name, version, slices in bounds, disjoint and
// covering). Throws dsx::UserError naming the directory and what is wrong.
Manifest read_manifest(const std::filesystem::path& dir);

// ---- loading -----------------------------------------------------------------------------------

// Fill dest with the box [offset, offset + dest.shape()) of tensor `name`. global_shape is what the
// caller expects the whole tensor to be: a checkpoint of another model size fails loudly even when
// the requested box happens to fit. dest's dtype must equal the stored dtype. Empty offset = zeros.
struct LoadRequest {
  std::string name;
  Shape global_shape;
  Shape offset;
  Tensor dest;  // CPU, contiguous; written in place
};

struct ReaderOptions {
  // Check each file's size and CRC-32 against the manifest the first time it is used. Costs one
  // sequential read of every file touched; turn off only for inspection tools.
  bool verify_checksums = true;
};

// An open checkpoint. Files are opened (and verified) lazily, at most once each.
class CheckpointReader {
 public:
  explicit CheckpointReader(std::filesystem::path dir, ReaderOptions options = {});
  ~CheckpointReader();
  CheckpointReader(CheckpointReader&&) noexcept;
  CheckpointReader& operator=(CheckpointReader&&) noexcept;

  const std::filesystem::path& dir() const { return dir_; }
  const Manifest& manifest() const { return manifest_; }
  int64_t step() const { return manifest_.step; }
  const nlohmann::json& metadata() const { return manifest_.metadata; }
  const std::string& recipe_yaml() const { return manifest_.recipe_yaml; }
  const TensorInfo* find(std::string_view name) const;  // nullptr when absent

  void read(const LoadRequest& request);
  void read(std::span<const LoadRequest> requests);
  Tensor read_whole(std::string_view name);  // the whole tensor, in its stored dtype
  // Verifies every file's size and checksum (and opens it), e.g. for `dsx checkpoint inspect --verify`.
  void verify_all();

 private:
  struct Files;  // open HDF5 handles, defined in checkpoint.cpp
  // The open file `index`, opened (and verified when `verify`) on first use; tensor names the
  // tensor being read, for error messages.
  detail::SliceFileReader& file(int index, std::string_view tensor, bool verify);
  std::filesystem::path dir_;
  ReaderOptions options_;
  Manifest manifest_;
  std::map<std::string, size_t, std::less<>> by_name_;
  std::unique_ptr<Files> files_;
};

// Opens dir and serves every request; returns the checkpoint's step, metadata and recipe.
CheckpointState load(const std::filesystem::path& dir, std::span<const LoadRequest> requests,
                     ReaderOptions options = {});

// ---- finding checkpoints -----------------------------------------------------------------------

std::string step_dir_name(int64_t step);         // "step-000123"
std::string writer_file_name(int writer_index);  // "rank-00000.h5"

enum class EntryKind { complete, invalid, temporary };

struct CheckpointEntry {
  std::filesystem::path dir;
  int64_t step = -1;
  EntryKind kind = EntryKind::invalid;
  std::string problem;  // why it is not complete (empty for complete ones)
};

// Every step-* directory under root, sorted by step then name; complete ones have a valid
// manifest for the step in their name. A missing root gives an empty list.
std::vector<CheckpointEntry> list_checkpoints(const std::filesystem::path& root);

struct LatestOptions {
  // Also delete step-*.tmp-* and step-*.old-* directories left by killed saves. Only safe when no
  // save into this root is in progress (e.g. once, at startup, on one rank).
  bool remove_stale = false;
};

// The newest complete checkpoint under root (highest step with a valid manifest), or nullopt.
std::optional<std::filesystem::path> latest(const std::filesystem::path& root, LatestOptions options = {});

// True when dir itself looks like one checkpoint (has a manifest.json), as opposed to a root.
bool is_checkpoint_dir(const std::filesystem::path& dir);

DType dtype_from_name(std::string_view name);  // inverse of dtype_name; throws std::invalid_argument

}  // namespace dsx::ckpt
