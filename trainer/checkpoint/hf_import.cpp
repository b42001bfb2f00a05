#include "trainer/checkpoint/hf_import.h"

#include <fmt/core.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <memory>
#include <vector>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/checkpoint/safetensors.h"
#include "trainer/model/parameters.h"
#include "trainer/recipe/recipe.h"

namespace dsx::ckpt {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int64_t kScaleBlock = 128;  // DeepSeek-V3's FP8 weights: one scale per 128×128 block

template <class T>
T field(const json& config, const char* name, const std::string& where, std::optional<T> fallback = {}) {
  if (!config.contains(name) || config.at(name).is_null()) {
    if (fallback) return *fallback;
    throw UserError(fmt::format("{}: config.json has no \"{}\"", where, name));
  }
  try {
    return config.at(name).get<T>();
  } catch (const json::exception&) {
    throw UserError(
        fmt::format("{}: config.json's \"{}\" is {}, not the expected type", where, name, config.at(name).dump()));
  }
}

// Which file of the directory holds each tensor.
std::map<std::string, fs::path> tensor_files(const fs::path& dir) {
  std::map<std::string, fs::path> files;
  const fs::path index = dir / "model.safetensors.index.json";
  if (fs::exists(index)) {
    std::ifstream in(index);
    json j;
    try {
      j = json::parse(in);
      for (const auto& [name, file] : j.at("weight_map").items()) files[name] = dir / file.get<std::string>();
    } catch (const json::exception& e) {
      throw UserError(fmt::format("convert from-hf: {} is not a safetensors index ({})", index.string(), e.what()));
    }
    return files;
  }
  if (!fs::exists(dir / "model.safetensors")) {
    throw UserError(fmt::format("convert from-hf: {} has neither model.safetensors nor model.safetensors.index.json",
                                dir.string()));
  }
  safetensors::Reader reader(dir / "model.safetensors");
  for (const safetensors::Entry& e : reader.entries()) files[e.name] = dir / "model.safetensors";
  return files;
}

// w = fp8 · scale_inv of its 128×128 block.
Tensor dequantize_blocks(const Tensor& fp8, const Tensor& scale_inv, const std::string& name) {
  const int64_t rows = fp8.dim(0), cols = fp8.dim(1);
  const Shape want = {(rows + kScaleBlock - 1) / kScaleBlock, (cols + kScaleBlock - 1) / kScaleBlock};
  if (scale_inv.shape() != want) {
    throw UserError(fmt::format("convert from-hf: {}_scale_inv is {}, a {} FP8 weight needs {} (128x128 blocks)", name,
                                shape_str(scale_inv.shape()), shape_str(fp8.shape()), shape_str(want)));
  }
  Tensor w = fp8.to(DType::f32);
  const Tensor scale = scale_inv.to(DType::f32);
  float* v = w.data<float>();
  const float* s = scale.data<float>();
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) v[i * cols + j] *= s[(i / kScaleBlock) * want[1] + j / kScaleBlock];
  }
  return w;
}

std::string recipe_for(const ModelConfig& config) {
  Recipe r;
  static_cast<ModelConfig&>(r.model) = config;
  r.train.seq_len = std::min(r.train.seq_len, config.max_position_embeddings);
  return to_yaml(r);
}

}  // namespace

ModelConfig config_from_hugging_face(const json& j, const std::string& where) {
  const auto model_type = field<std::string>(j, "model_type", where);
  if (model_type != "deepseek_v3") {
    throw UserError(fmt::format("{}: model_type \"{}\"; dsx imports deepseek_v3 models", where, model_type));
  }
  ModelConfig c;
  c.vocab_size = field<int64_t>(j, "vocab_size", where);
  c.hidden_size = field<int64_t>(j, "hidden_size", where);
  c.intermediate_size = field<int64_t>(j, "intermediate_size", where);
  c.num_hidden_layers = field<int64_t>(j, "num_hidden_layers", where);
  c.num_attention_heads = field<int64_t>(j, "num_attention_heads", where);
  c.q_lora_rank = field<int64_t>(j, "q_lora_rank", where, int64_t{0});  // null: a direct q_proj
  c.kv_lora_rank = field<int64_t>(j, "kv_lora_rank", where);
  c.qk_nope_head_dim = field<int64_t>(j, "qk_nope_head_dim", where);
  c.qk_rope_head_dim = field<int64_t>(j, "qk_rope_head_dim", where);
  c.v_head_dim = field<int64_t>(j, "v_head_dim", where);
  c.n_routed_experts = field<int64_t>(j, "n_routed_experts", where);
  c.n_shared_experts = field<int64_t>(j, "n_shared_experts", where);
  c.num_experts_per_tok = field<int64_t>(j, "num_experts_per_tok", where);
  c.moe_intermediate_size = field<int64_t>(j, "moe_intermediate_size", where);
  c.first_k_dense_replace = field<int64_t>(j, "first_k_dense_replace", where);
  c.n_group = field<int64_t>(j, "n_group", where);
  c.topk_group = field<int64_t>(j, "topk_group", where);
  c.routed_scaling_factor = field<double>(j, "routed_scaling_factor", where);
  c.scoring_func = field<std::string>(j, "scoring_func", where, std::string("sigmoid"));
  c.norm_topk_prob = field<bool>(j, "norm_topk_prob", where, true);
  c.num_nextn_predict_layers = field<int64_t>(j, "num_nextn_predict_layers", where, int64_t{0});
  c.rms_norm_eps = field<double>(j, "rms_norm_eps", where);
  c.rope_theta = field<double>(j, "rope_theta", where);
  c.max_position_embeddings = field<int64_t>(j, "max_position_embeddings", where);
  c.tie_word_embeddings = field<bool>(j, "tie_word_embeddings", where, false);
  c.initializer_range = field<double>(j, "initializer_range", where, 0.02);
  if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null()) {
    const json& r = j.at("rope_scaling");
    const std::string at = where + " rope_scaling";
    const auto type = field<std::string>(r, r.contains("type") ? "type" : "rope_type", at);
    if (type != "yarn") throw UserError(fmt::format("{}: type \"{}\"; dsx has yarn", at, type));
    c.rope_scaling.type = "yarn";
    c.rope_scaling.factor = field<double>(r, "factor", at);
    c.rope_scaling.original_max_position_embeddings = field<int64_t>(r, "original_max_position_embeddings", at);
    c.rope_scaling.beta_fast = field<double>(r, "beta_fast", at, 32.0);
    c.rope_scaling.beta_slow = field<double>(r, "beta_slow", at, 1.0);
    c.rope_scaling.mscale = field<double>(r, "mscale", at, 1.0);
    c.rope_scaling.mscale_all_dim = field<double>(r, "mscale_all_dim", at, 0.0);
  }
  try {
    validate_model_config(c);
  } catch (const UserError& e) {
    throw UserError(fmt::format("{}: {}", where, e.what()));
  }
  return c;
}

HfImportResult import_hugging_face(const fs::path& hf_dir, const fs::path& checkpoint_root,
                                   const std::function<void(int64_t, int64_t)>& progress) {
  const fs::path config_path = hf_dir / "config.json";
  std::ifstream in(config_path);
  if (!in) throw UserError(fmt::format("convert from-hf: {}: no such file", config_path.string()));
  json config_json;
  try {
    config_json = json::parse(in);
  } catch (const json::exception& e) {
    throw UserError(fmt::format("convert from-hf: {} is not JSON ({})", config_path.string(), e.what()));
  }
  const ModelConfig config = config_from_hugging_face(config_json, config_path.string());
  if (latest(checkpoint_root)) {
    throw UserError(fmt::format("convert from-hf: {} already holds a checkpoint; choose a new directory",
                                checkpoint_root.string()));
  }
  const std::map<std::string, fs::path> files = tensor_files(hf_dir);
  std::map<fs::path, std::unique_ptr<safetensors::Reader>> readers;
  const auto reader_of = [&](const std::string& name) -> safetensors::Reader& {
    const auto it = files.find(name);
    if (it == files.end()) {
      throw UserError(fmt::format("convert from-hf: {} has no tensor {} (the config says the model has it)",
                                  hf_dir.string(), name));
    }
    auto& r = readers[it->second];
    if (!r) r = std::make_unique<safetensors::Reader>(it->second);
    return *r;
  };

  // The parameters by the file that holds them, files in name order. Each file's parameters are
  // read, converted and written as one writer of the checkpoint before the next file is read, so
  // the import holds one file's tensors at a time (DeepSeek-V3: 163 files of ~4.3 GB in FP8, ~17
  // GB each in f32) instead of the whole model (2.7 TB in f32). Writer 0 commits the checkpoint,
  // so its file goes last.
  const std::vector<ParamSpec> specs = model_param_specs(config);
  std::map<fs::path, std::vector<const ParamSpec*>> by_file;
  for (const ParamSpec& spec : specs) {
    const auto it = files.find(spec.name);
    if (it == files.end()) reader_of(spec.name);  // throws, naming the missing tensor
    by_file[it->second].push_back(&spec);
  }
  std::vector<std::vector<const ParamSpec*>> parts;
  for (auto& [file, part] : by_file) parts.push_back(std::move(part));
  std::rotate(parts.begin(), parts.begin() + 1, parts.end());  // the first file's writer (0) last

  HfImportResult result;
  CheckpointState state;
  state.step = 0;
  state.metadata = {{"imported_from", fs::absolute(hf_dir).string()}};
  state.recipe_yaml = recipe_for(config);
  SaveOptions save_options;
  save_options.n_writers = static_cast<int>(parts.size());
  save_options.barrier = [] {};  // the writers run one after another in this process
  for (size_t k = 0; k < parts.size(); ++k) {
    std::vector<TensorSlice> slices;
    for (const ParamSpec* spec : parts[k]) {
      Tensor value = reader_of(spec->name).read(spec->name);
      const std::string scale_name = spec->name + "_scale_inv";
      if (value.dtype() == DType::fp8_e4m3 && files.count(scale_name)) {
        value = dequantize_blocks(value, reader_of(scale_name).read(scale_name), spec->name);
        ++result.dequantized;
      } else if (value.dtype() != DType::f32) {
        value = value.to(DType::f32);
      }
      if (value.shape() != spec->shape) {
        throw UserError(fmt::format("convert from-hf: {} is {} in {}, config.json implies {}", spec->name,
                                    shape_str(value.shape()), hf_dir.string(), shape_str(spec->shape)));
      }
      result.parameters += value.numel();
      slices.push_back({spec->name, spec->shape, {}, std::move(value)});
      ++result.tensors;
      if (progress) progress(result.tensors, static_cast<int64_t>(specs.size()));
    }
    save_options.writer_index = (static_cast<int>(k) + 1) % save_options.n_writers;
    result.checkpoint = save(checkpoint_root, state, slices, save_options);
  }
  result.skipped = static_cast<int64_t>(files.size()) - result.tensors - result.dequantized;
  return result;
}

}  // namespace dsx::ckpt
