// What `dsx checkpoint inspect` shows, as JSON (for --json and for tests) and as text.
#pragma once
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

#include "trainer/checkpoint/checkpoint.h"

namespace dsx::ckpt {

// One checkpoint: step, files (bytes, CRC-32), every tensor (name, global shape, dtype, bytes,
// slices with the file holding each), totals, the metadata's top-level keys and the recipe.
nlohmann::json describe_checkpoint(const CheckpointReader& reader);

// A checkpoint root: every step-* directory with its state, and the description of the newest
// complete checkpoint under "latest" (null when there is none).
nlohmann::json describe_root(const std::filesystem::path& root);

// Describes dir, which is either one checkpoint (it has a manifest.json) or a root holding several.
// With verify, every file of the described checkpoint is checked against its size and CRC-32
// (dsx::UserError on a mismatch). Throws dsx::UserError when dir does not exist.
nlohmann::json describe(const std::filesystem::path& dir, bool verify);

// Human-readable forms of describe()'s output.
std::string format_description(const nlohmann::json& description);

}  // namespace dsx::ckpt
