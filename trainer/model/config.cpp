#include "trainer/model/config.h"

#include <string>

#include "kernels/error.h"

namespace dsx {
namespace {

void require(bool ok, const std::string& field, const std::string& why) {
  if (!ok) throw UserError("model." + field + ": " + why);
}

void require_positive(int64_t value, const std::string& field) {
  require(value > 0, field, "must be > 0, got " + std::to_string(value));
}

void validate_moe(const ModelConfig& c) {
  require(c.n_routed_experts >= 0, "n_routed_experts", "must be >= 0");
  if (c.n_routed_experts == 0) return;
  require_positive(c.moe_intermediate_size, "moe_intermediate_size");
  require(c.n_shared_experts >= 0, "n_shared_experts", "must be >= 0");
  require_positive(c.n_group, "n_group");
  require(c.n_routed_experts % c.n_group == 0, "n_group",
          "n_routed_experts (" + std::to_string(c.n_routed_experts) + ") must be divisible by n_group (" +
              std::to_string(c.n_group) + ")");
  require(c.topk_group >= 1 && c.topk_group <= c.n_group, "topk_group",
          "must be in [1, n_group = " + std::to_string(c.n_group) + "], got " + std::to_string(c.topk_group));
  const int64_t selectable = c.topk_group * (c.n_routed_experts / c.n_group);
  require(c.num_experts_per_tok >= 1 && c.num_experts_per_tok <= selectable, "num_experts_per_tok",
          "must be in [1, " + std::to_string(selectable) + "] (topk_group · experts per group), got " +
              std::to_string(c.num_experts_per_tok));
  require(c.scoring_func == "sigmoid" || c.scoring_func == "softmax", "scoring_func",
          "must be \"sigmoid\" or \"softmax\", got \"" + c.scoring_func + "\"");
  require(c.routed_scaling_factor > 0, "routed_scaling_factor", "must be > 0");
  require(c.bias_update_rate >= 0, "bias_update_rate", "must be >= 0");
  require(c.seq_aux_loss_alpha >= 0, "seq_aux_loss_alpha", "must be >= 0");
  require(c.first_k_dense_replace >= 0, "first_k_dense_replace", "must be >= 0");
}

void validate_attention(const ModelConfig& c) {
  require_positive(c.num_attention_heads, "num_attention_heads");
  require(c.q_lora_rank >= 0, "q_lora_rank", "must be >= 0 (0: direct query projection)");
  require_positive(c.kv_lora_rank, "kv_lora_rank");
  require_positive(c.qk_nope_head_dim, "qk_nope_head_dim");
  require(c.qk_rope_head_dim > 0 && c.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
          "must be positive and even (RoPE rotates pairs), got " + std::to_string(c.qk_rope_head_dim));
  require_positive(c.v_head_dim, "v_head_dim");
  require(c.rope_theta > 1, "rope_theta", "must be > 1");
  require_positive(c.max_position_embeddings, "max_position_embeddings");
  const RopeScalingConfig& r = c.rope_scaling;
  require(r.type == "none" || r.type == "yarn", "rope_scaling.type",
          "must be \"none\" or \"yarn\", got \"" + r.type + "\"");
  if (r.type == "yarn") {
    require(r.factor >= 1, "rope_scaling.factor", "must be >= 1");
    require_positive(r.original_max_position_embeddings, "rope_scaling.original_max_position_embeddings");
    require(r.beta_fast > 0 && r.beta_slow > 0, "rope_scaling.beta_fast", "beta_fast and beta_slow must be > 0");
  }
}

}  // namespace

void validate_model_config(const ModelConfig& c) {
  require_positive(c.vocab_size, "vocab_size");
  require_positive(c.hidden_size, "hidden_size");
  require_positive(c.num_hidden_layers, "num_hidden_layers");
  const bool has_dense_layers = c.n_routed_experts == 0 || c.first_k_dense_replace > 0;
  require(!has_dense_layers || c.intermediate_size > 0, "intermediate_size", "must be > 0 when there are dense layers");
  require(c.rms_norm_eps > 0, "rms_norm_eps", "must be > 0");
  require(c.initializer_range > 0, "initializer_range", "must be > 0");
  require(c.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0");
  require(c.mtp_loss_weight >= 0, "mtp_loss_weight", "must be >= 0");
  validate_attention(c);
  validate_moe(c);
}

}  // namespace dsx
