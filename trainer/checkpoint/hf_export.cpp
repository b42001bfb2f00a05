#include "trainer/checkpoint/hf_export.h"

#include <fmt/core.h>
#include <unistd.h>

#include <fstream>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "trainer/checkpoint/safetensors.h"
#include "trainer/model/parameters.h"

namespace dsx::ckpt {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The dtype a parameter is exported in.
DType export_dtype(const ParamSpec& spec, DType dtype) {
  return spec.name.ends_with("e_score_correction_bias") ? DType::f32 : dtype;
}

// Shards of consecutive parameters, each at most max_bytes of data (a larger tensor alone).
std::vector<std::vector<const ParamSpec*>> plan_shards(const std::vector<ParamSpec>& specs, DType dtype,
                                                       int64_t max_bytes) {
  std::vector<std::vector<const ParamSpec*>> shards(1);
  int64_t in_shard = 0;
  for (const ParamSpec& s : specs) {
    const int64_t bytes = s.numel() * static_cast<int64_t>(dtype_size(export_dtype(s, dtype)));
    if (!shards.back().empty() && in_shard + bytes > max_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(&s);
    in_shard += bytes;
  }
  return shards;
}

std::string shard_name(size_t k, size_t n) {
  return n == 1 ? "model.safetensors" : fmt::format("model-{:05}-of-{:05}.safetensors", k + 1, n);
}

// The model directory's files, written into tmp.
HfExportResult write_model_directory(CheckpointReader& reader, const ModelConfig& config,
                                     const std::vector<ParamSpec>& specs, const fs::path& tmp,
                                     const HfExportOptions& options,
                                     const std::function<void(int64_t, int64_t)>& progress);

void write_json(const fs::path& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2) << '\n';
  if (!out) throw UserError(fmt::format("convert: cannot write {}", path.string()));
}

}  // namespace

json hugging_face_config(const ModelConfig& c, DType dtype) {
  json rope_scaling = nullptr;
  if (c.rope_scaling.type == "yarn") {
    const RopeScalingConfig& r = c.rope_scaling;
    rope_scaling = {
        {"type", "yarn"},           {"rope_type", "yarn"},
        {"factor", r.factor},       {"original_max_position_embeddings", r.original_max_position_embeddings},
        {"beta_fast", r.beta_fast}, {"beta_slow", r.beta_slow},
        {"mscale", r.mscale},       {"mscale_all_dim", r.mscale_all_dim}};
  }
  return {{"architectures", {"DeepseekV3ForCausalLM"}},
          {"model_type", "deepseek_v3"},
          {"vocab_size", c.vocab_size},
          {"hidden_size", c.hidden_size},
          {"intermediate_size", c.intermediate_size},
          {"moe_intermediate_size", c.moe_intermediate_size},
          {"num_hidden_layers", c.num_hidden_layers},
          {"num_nextn_predict_layers", c.num_nextn_predict_layers},
          {"num_attention_heads", c.num_attention_heads},
          {"num_key_value_heads", c.num_attention_heads},
          {"n_shared_experts", c.n_shared_experts},
          {"n_routed_experts", c.n_routed_experts},
          {"routed_scaling_factor", c.routed_scaling_factor},
          {"kv_lora_rank", c.kv_lora_rank},
          {"q_lora_rank", c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr)},
          {"qk_rope_head_dim", c.qk_rope_head_dim},
          {"v_head_dim", c.v_head_dim},
          {"qk_nope_head_dim", c.qk_nope_head_dim},
          {"topk_method", "noaux_tc"},
          {"n_group", c.n_group},
          {"topk_group", c.topk_group},
          {"num_experts_per_tok", c.num_experts_per_tok},
          {"first_k_dense_replace", c.first_k_dense_replace},
          {"moe_layer_freq", 1},
          {"norm_topk_prob", c.norm_topk_prob},
          {"scoring_func", c.scoring_func},
          {"hidden_act", "silu"},
          {"max_position_embeddings", c.max_position_embeddings},
          {"initializer_range", c.initializer_range},
          {"rms_norm_eps", c.rms_norm_eps},
          {"rope_theta", c.rope_theta},
          {"rope_scaling", rope_scaling},
          {"attention_bias", false},
          {"attention_dropout", 0.0},
          {"tie_word_embeddings", c.tie_word_embeddings},
          {"use_cache", true},
          {"torch_dtype", dtype == DType::bf16 ? "bfloat16" : "float32"}};
}

HfExportResult export_hugging_face(CheckpointReader& reader, const ModelConfig& config, const fs::path& out_dir,
                                   const HfExportOptions& options,
                                   const std::function<void(int64_t, int64_t)>& progress) {
  if (options.dtype != DType::bf16 && options.dtype != DType::f32) {
    throw UserError("convert: --dtype must be bf16 or f32, got " + std::string(dtype_name(options.dtype)));
  }
  if (options.max_shard_bytes <= 0) throw UserError("convert: the shard size must be > 0");
  if (fs::exists(out_dir) && !(fs::is_directory(out_dir) && fs::is_empty(out_dir))) {
    throw UserError(
        fmt::format("convert: {} exists and is not an empty directory; choose a new one", out_dir.string()));
  }
  const std::vector<ParamSpec> specs = model_param_specs(config);
  const fs::path tmp = fs::path(out_dir.string() + fmt::format(".tmp-{}", ::getpid()));
  fs::remove_all(tmp);
  fs::create_directories(tmp);

  try {
    HfExportResult result = write_model_directory(reader, config, specs, tmp, options, progress);
    if (fs::exists(out_dir)) fs::remove(out_dir);  // the empty directory checked above
    fs::rename(tmp, out_dir);
    return result;
  } catch (...) {
    fs::remove_all(tmp);  // nothing half-written stays behind
    throw;
  }
}

namespace {

HfExportResult write_model_directory(CheckpointReader& reader, const ModelConfig& config,
                                     const std::vector<ParamSpec>& specs, const fs::path& tmp,
                                     const HfExportOptions& options,
                                     const std::function<void(int64_t, int64_t)>& progress) {
  const auto shards = plan_shards(specs, options.dtype, options.max_shard_bytes);
  HfExportResult result;
  result.shards = static_cast<int>(shards.size());
  json weight_map = json::object();
  const auto total = static_cast<int64_t>(specs.size());
  for (size_t k = 0; k < shards.size(); ++k) {
    std::vector<safetensors::NamedTensor> tensors;
    for (const ParamSpec* spec : shards[k]) {
      const Tensor stored = reader.read_whole(options.source_prefix + spec->name);
      if (stored.shape() != spec->shape) {
        throw UserError(fmt::format("convert: checkpoint tensor {} is {}, the model's config says {}", spec->name,
                                    stored.describe(), shape_str(spec->shape)));
      }
      const DType dtype = export_dtype(*spec, options.dtype);
      tensors.push_back({spec->name, stored.dtype() == dtype ? stored : stored.to(dtype)});
      weight_map[spec->name] = shard_name(k, shards.size());
      ++result.tensors;
      result.parameters += spec->numel();
      if (progress) progress(result.tensors, total);
    }
    result.bytes += safetensors::data_bytes(tensors);
    safetensors::write(tmp / shard_name(k, shards.size()), tensors, {{"format", "pt"}});
  }
  if (shards.size() > 1) {
    write_json(tmp / "model.safetensors.index.json",
               {{"metadata", {{"total_size", result.bytes}}}, {"weight_map", weight_map}});
  }
  write_json(tmp / "config.json", hugging_face_config(config, options.dtype));
  return result;
}

}  // namespace

}  // namespace dsx::ckpt
