// A Hugging Face DeepseekV3 model directory (config.json + safetensors, e.g. the released
// DeepSeek-V3 weights or a `dsx convert to-hf` export) as a dsx checkpoint holding the model's
// tensors only, which `dsx train` starts from with checkpoint.init_from and `dsx generate` reads.
//
// Every parameter of model_param_specs(config) must be present with its shape; it is stored f32.
// FP8 weights in DeepSeek's released format (F8_E4M3 `X.weight` with an F32 `X.weight_scale_inv`
// of one scale per 128×128 block, the last blocks partial) are dequantized: w = fp8 · scale of its
// block. Tensors that are not parameters (the scales, other models' extras) are counted and
// skipped. The checkpoint is step 0 with metadata {"imported_from": dir} and a recipe whose model
// section is the config. The model is held in host memory (f32) while the checkpoint is written:
// models that fit there (DeepSeek-V3's 671B would need a streaming writer, not built).
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>

#include "trainer/model/config.h"

namespace dsx::ckpt {

// The DeepseekV3Config fields of config.json as a ModelConfig (HF's defaults where a field is
// absent, as transformers' config class has them). Throws dsx::UserError naming `where` and the
// field for a wrong type or a model_type other than deepseek_v3/deepseek_v2.
ModelConfig config_from_hugging_face(const nlohmann::json& config, const std::string& where);

struct HfImportResult {
  int64_t tensors = 0;      // parameters written
  int64_t parameters = 0;   // their elements
  int64_t dequantized = 0;  // of them, FP8 weights with block scales
  int64_t skipped = 0;      // tensors of the directory that are not parameters
  std::filesystem::path checkpoint;
};

// Reads hf_dir and writes checkpoint_root/step-000000 (checkpoint_root must hold no checkpoint),
// one safetensors file at a time: each file's parameters become one file of the checkpoint, so
// memory holds one file's tensors (in f32), not the model.
HfImportResult import_hugging_face(const std::filesystem::path& hf_dir, const std::filesystem::path& checkpoint_root,
                                   const std::function<void(int64_t, int64_t)>& progress = {});

}  // namespace dsx::ckpt
