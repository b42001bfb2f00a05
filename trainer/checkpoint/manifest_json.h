// JSON forms of the manifest and of the per-writer index files that writer 0 merges into it.
// Internal to trainer/checkpoint. Parse errors throw std::runtime_error with a message that names the
// offending JSON path (e.g. "tensors[3].slices[0].extent: ..."); callers add the file and directory.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "trainer/checkpoint/checkpoint.h"

namespace dsx::ckpt::detail {

// What one writer wrote: its file's digest and its slices (StoredSlice::file is its writer index).
struct WriterIndex {
  int writer_index = 0;
  int n_writers = 1;
  int64_t step = 0;
  FileInfo file;
  std::vector<TensorInfo> tensors;  // one slice each; a tensor with several slices appears once per slice
};

std::string index_file_name(int writer_index);  // "rank-00000.index.json"

nlohmann::json to_json(const Manifest& manifest);
Manifest manifest_from_json(const nlohmann::json& json);

nlohmann::json to_json(const WriterIndex& index);
WriterIndex writer_index_from_json(const nlohmann::json& json);

// Checks that the slices of one tensor lie inside its global shape, do not overlap and together
// cover it exactly. Throws std::runtime_error describing the first problem.
void check_slices_tile(const TensorInfo& tensor);

}  // namespace dsx::ckpt::detail
