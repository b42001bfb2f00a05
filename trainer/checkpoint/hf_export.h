// A dsx checkpoint's model as a Hugging Face DeepseekV3 model directory, for transformers, vLLM
// and SGLang: config.json (DeepseekV3Config fields) and the weights as safetensors under their
// Hugging Face names (which are dsx's parameter names), sharded like transformers'
// save_pretrained (model.safetensors, or model-0000k-of-0000n.safetensors + an index).
//
// Every parameter of model_param_specs(config) is written whole (a checkpoint saved by any
// layout reads back whole), MTP modules included as the released DeepSeek-V3 weights carry them
// (layers num_hidden_layers ...; transformers skips them, vLLM/SGLang load them for MTP). Values
// are rounded to the chosen dtype (bf16 by default, round to nearest even), except the routers'
// e_score_correction_bias, kept f32 as in the released weights. Optimizer state is not exported.
// The directory is written under <out>.tmp-<pid> and renamed when complete.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/config.h"

namespace dsx::ckpt {

struct HfExportOptions {
  DType dtype = DType::bf16;                // bf16 or f32
  int64_t max_shard_bytes = 5'000'000'000;  // transformers' default max_shard_size ("5GB")
  std::string source_prefix;                // read the checkpoint tensors prefix + name ("ema.": the weight EMA)
};

struct HfExportResult {
  int64_t tensors = 0;
  int64_t parameters = 0;  // elements over all tensors
  int64_t bytes = 0;       // tensor data written
  int shards = 0;
};

// config.json's contents for `config` with weights in `dtype`.
nlohmann::json hugging_face_config(const ModelConfig& config, DType dtype);

// Writes out_dir (which must not exist, or be an empty directory) from the checkpoint read by
// `reader`, whose model is `config`. progress(done, total) after each tensor. Throws
// dsx::UserError for a missing tensor, a tensor of another shape, or an unwritable directory.
HfExportResult export_hugging_face(CheckpointReader& reader, const ModelConfig& config,
                                   const std::filesystem::path& out_dir, const HfExportOptions& options = {},
                                   const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace dsx::ckpt
