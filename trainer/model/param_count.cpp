#include "trainer/model/param_count.h"

#include <stdexcept>
#include <string>

#include "trainer/model/parameters.h"

namespace dsx {

// Counted from the very spec list the model registers, so the count cannot drift from the model.
// Active parameters: a token passes through every parameter except the routed experts it is not
// sent to, i.e. it uses num_experts_per_tok / n_routed_experts of each MoE layer's routed experts.
// The router's e_score_correction_bias buffer is counted (it is part of the state dict).
ParameterCounts count_parameters(const ModelConfig& config) {
  ParameterCounts counts;
  int64_t routed = 0;
  for (const ParamSpec& spec : model_param_specs(config)) {
    if (spec.mtp) {
      counts.mtp += spec.numel();
      continue;
    }
    counts.total += spec.numel();
    if (spec.routed_expert) routed += spec.numel();
  }
  // routed = (MoE layers) · n_routed_experts · (one expert's size), so this division is exact.
  const int64_t active_routed =
      config.n_routed_experts > 0 ? routed / config.n_routed_experts * config.num_experts_per_tok : 0;
  counts.active = counts.total - routed + active_routed;
  // With tied embeddings the table is also the output head, so every element takes part.
  counts.active_non_embedding =
      config.tie_word_embeddings ? counts.active : counts.active - config.vocab_size * config.hidden_size;
  return counts;
}

ModuleFlops module_flops_per_token(const ModelConfig& config, int64_t seq_len) {
  const double routed_fraction = config.n_routed_experts > 0 ? static_cast<double>(config.num_experts_per_tok) /
                                                                   static_cast<double>(config.n_routed_experts)
                                                             : 0.0;
  const int64_t L = config.num_hidden_layers;
  ModuleFlops out;
  out.layers.assign(static_cast<size_t>(L), 0.0);
  // 6 FLOPs per weight element a token passes, by module
  const std::string layer_prefix = "model.layers.";
  for (const ParamSpec& spec : model_param_specs(config)) {
    if (spec.shape.size() != 2 || spec.name == "model.embed_tokens.weight" || spec.name == "lm_head.weight") {
      continue;  // norms and the router bias, the embedding lookup, and the head (counted below)
    }
    const double flops = 6.0 * static_cast<double>(spec.numel()) * (spec.routed_expert ? routed_fraction : 1.0);
    if (!spec.name.starts_with(layer_prefix)) {
      throw std::logic_error("module_flops_per_token: " + spec.name + " belongs to no module it knows");
    }
    const auto layer = static_cast<int64_t>(std::stoul(spec.name.substr(layer_prefix.size())));
    (layer < L ? out.layers[static_cast<size_t>(layer)] : out.mtp) += flops;
  }
  const double head = 6.0 * static_cast<double>(config.vocab_size) * static_cast<double>(config.hidden_size);
  out.head = head;
  out.mtp += static_cast<double>(config.num_nextn_predict_layers) * head;
  // causal attention per decoder block (MTP blocks included)
  const double attention = seq_len > 0 ? 3.0 * static_cast<double>(config.num_attention_heads) *
                                             static_cast<double>(config.qk_head_dim() + config.v_head_dim) *
                                             static_cast<double>(seq_len + 1)
                                       : 0.0;
  for (double& layer : out.layers) layer += attention;
  out.mtp += static_cast<double>(config.num_nextn_predict_layers) * attention;
  return out;
}

double ModuleFlops::total() const {
  double sum = head + mtp;
  for (double layer : layers) sum += layer;
  return sum;
}

double model_flops_per_token(const ModelConfig& config, int64_t seq_len) {
  return module_flops_per_token(config, seq_len).total();
}

}  // namespace dsx
