#pragma once
#include <cstdint>
#include <vector>

#include "trainer/model/config.h"

namespace dsx {

// Parameter counts derived from the model's parameter specs (no memory is allocated).
// DeepSeek-V3 reports 671B total / 37B active for the main model and 11.5B more for MTP.
struct ParameterCounts {
  int64_t total = 0;   // main model: embedding, layers, final norm, head (head counted once if tied)
  int64_t active = 0;  // per token: total minus the routed experts a token does not use
  // active minus the embedding table (a token reads one row of it; every other counted weight
  // takes part in the token's matrix products). DeepSeek's "37B activated" for V3 and "2.4B" for
  // V2-Lite are closest to this convention; see tests/trainer/test_param_count.cpp.
  int64_t active_non_embedding = 0;
  int64_t mtp = 0;  // the MTP modules' own parameters (embedding and head are shared)
};
ParameterCounts count_parameters(const ModelConfig& config);

// Model FLOPs per token of one training step (forward + backward) at sequence length seq_len:
// 6 per matmul weight element a token passes (routed experts scaled by top_k / n_routed_experts,
// the embedding lookup free, the output head once per prediction depth: main + MTP modules)
// plus causal attention, 3 · H · (qk_head_dim + v_head_dim) · (seq_len + 1) per layer
// (MTP blocks included): QKᵀ and PV, 2 FLOPs per multiply-add, (seq_len + 1) / 2 keys on
// average per query, backward twice the forward.
double model_flops_per_token(const ModelConfig& config, int64_t seq_len);

// model_flops_per_token by module, what a pipeline split weighs: each decoder layer's matmuls
// and attention, the main output head (final norm and lm_head), and the MTP modules (each a
// decoder block, its projection and the shared head once more). The embedding lookup is free.
// Their sum is model_flops_per_token.
struct ModuleFlops {
  std::vector<double> layers;  // [num_hidden_layers]
  double head = 0;
  double mtp = 0;  // all MTP modules together

  double total() const;  // = model_flops_per_token
};
ModuleFlops module_flops_per_token(const ModelConfig& config, int64_t seq_len);

}  // namespace dsx
