// The DeepSeek-V3 family's shape, with Hugging Face DeepseekV3Config field names.
// The recipe's `model` section maps 1:1 onto this struct (trainer/recipe).
#pragma once
#include <cstdint>
#include <string>

namespace dsx {

struct RopeScalingConfig {
  std::string type = "none";  // "none" | "yarn"
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

struct ModelConfig {
  int64_t vocab_size = 256;
  int64_t hidden_size = 64;
  int64_t intermediate_size = 128;  // dense FFN
  int64_t num_hidden_layers = 4;
  int64_t num_attention_heads = 4;
  int64_t q_lora_rank = 0;  // 0: direct query projection (V2-Lite)
  int64_t kv_lora_rank = 32;
  int64_t qk_nope_head_dim = 16;
  int64_t qk_rope_head_dim = 8;
  int64_t v_head_dim = 16;
  int64_t n_routed_experts = 8;
  int64_t n_shared_experts = 1;
  int64_t num_experts_per_tok = 2;
  int64_t moe_intermediate_size = 32;
  int64_t first_k_dense_replace = 1;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  double routed_scaling_factor = 1.0;
  std::string scoring_func = "sigmoid";  // "sigmoid" | "softmax"
  bool norm_topk_prob = true;
  int64_t num_nextn_predict_layers = 0;  // MTP depth D
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  RopeScalingConfig rope_scaling;
  int64_t max_position_embeddings = 4096;
  bool tie_word_embeddings = false;
  double initializer_range = 0.02;
  // Training-time MoE and MTP settings (not in the HF config; DeepSeek-V3 values by default)
  double bias_update_rate = 0.001;  // aux-loss-free γ
  double seq_aux_loss_alpha = 0.0;  // sequence-wise balance loss α
  double mtp_loss_weight = 0.3;     // λ

  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  // Layer `layer` (MTP blocks continue the numbering after num_hidden_layers) is an MoE layer.
  bool is_moe_layer(int64_t layer) const { return n_routed_experts > 0 && layer >= first_k_dense_replace; }
};

// Throws dsx::UserError naming the first field (as `model.<field>`) whose value is impossible
// or inconsistent with the others: non-positive sizes, odd rope dims, n_routed_experts not
// divisible by n_group, topk_group > n_group, more experts per token than the kept groups hold...
void validate_model_config(const ModelConfig& config);

}  // namespace dsx
