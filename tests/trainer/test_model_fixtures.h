// Tiny DeepSeek-V3-shaped configs and batches for the model tests.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

#include "trainer/model/config.h"
#include "trainer/model/model.h"

namespace dsx::test {

// Every parameter kind: query compression, YaRN, 1 dense + 2 MoE layers (8 experts in 4 groups,
// top-2 of the best 2 groups, a shared expert), sigmoid router, balance loss, MTP depth 1.
inline ModelConfig tiny_config() {
  ModelConfig c;
  c.vocab_size = 24;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 3;
  c.num_attention_heads = 2;
  c.q_lora_rank = 8;
  c.kv_lora_rank = 8;
  c.qk_nope_head_dim = 4;
  c.qk_rope_head_dim = 4;
  c.v_head_dim = 6;
  c.n_routed_experts = 8;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 2;
  c.moe_intermediate_size = 6;
  c.first_k_dense_replace = 1;
  c.n_group = 4;
  c.topk_group = 2;
  c.routed_scaling_factor = 2.5;
  c.scoring_func = "sigmoid";
  c.norm_topk_prob = true;
  c.num_nextn_predict_layers = 1;
  // YaRN with an original context shorter than the batch, so the blended frequencies and the
  // softmax-scale correction mscale(4, 1)² ≈ 1.30 are both exercised.
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 4;
  c.rope_scaling.original_max_position_embeddings = 4;
  c.rope_scaling.beta_fast = 4;
  c.rope_scaling.beta_slow = 1;
  c.rope_scaling.mscale = 1;
  c.rope_scaling.mscale_all_dim = 1;
  c.max_position_embeddings = 16;
  c.tie_word_embeddings = false;
  c.initializer_range = 0.2;  // larger than 0.02 so every gradient is well above finite-difference noise
  c.seq_aux_loss_alpha = 0.01;
  c.mtp_loss_weight = 0.3;
  return c;
}

// The other branches: direct query projection, softmax router without normalisation, 2 shared
// experts, tied embeddings, MTP depth 2 (module 2 reads module 1's output).
inline ModelConfig tiny_config_direct_q() {
  ModelConfig c = tiny_config();
  c.q_lora_rank = 0;
  c.scoring_func = "softmax";
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 1.0;
  c.n_shared_experts = 2;
  c.n_group = 2;
  c.topk_group = 1;
  c.tie_word_embeddings = true;
  c.num_nextn_predict_layers = 2;
  return c;
}

// [B, S] batch: random tokens, targets = the next input (a random token at the end of a row),
// a few targets ignored (-100), and two documents packed in the first row when `segments`.
inline Batch make_batch(const ModelConfig& c, int64_t B, int64_t S, uint64_t seed, bool segments = true) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(c.vocab_size - 1));
  std::vector<int32_t> inputs(static_cast<size_t>(B * S)), targets(inputs.size()), segment(inputs.size(), 0);
  for (auto& t : inputs) t = token(gen);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t s = 0; s < S; ++s) {
      const size_t i = static_cast<size_t>(b * S + s);
      targets[i] = s + 1 < S ? inputs[i + 1] : token(gen);
      if (b == 0 && s >= S / 2) segment[i] = 1;
    }
  }
  targets[1] = -100;
  targets[static_cast<size_t>(B * S - 2)] = -100;
  Batch batch;
  batch.inputs = Tensor::from<int32_t>(std::span<const int32_t>(inputs), {B, S});
  batch.targets = Tensor::from<int32_t>(std::span<const int32_t>(targets), {B, S});
  if (segments) batch.segment_ids = Tensor::from<int32_t>(std::span<const int32_t>(segment), {B, S});
  return batch;
}

}  // namespace dsx::test
