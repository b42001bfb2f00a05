#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace dsx::ops {

// The DeepSeek MoE router (DEEPSEEK_FACTS.md "Router"):
//  1. scores = sigmoid(logits) or softmax(logits) over experts (logits = x · W_gateᵀ, fp32+).
//  2. selection uses scores + bias (bias may be undefined = 0): group score = sum of the top-2
//     biased scores in each of n_group groups (top-1 when a group has one expert); keep the
//     best topk_group groups; choose the top_k experts among them. Ties go to the lower index.
//  3. weights = unbiased scores of the chosen experts, divided by (their sum + 1e-20, as the
//     Hugging Face DeepSeek-V3 gate does, so all-underflowed scores give 0, not NaN) when norm_topk_prob,
//     then times routed_scaling_factor. The division applies for top_k = 1 too (as DeepSeek's own
//     reference model does; the Hugging Face port skips it there).
// Every function taking a RouterConfig checks it and throws std::invalid_argument unless n_experts % n_group == 0,
// 1 <= topk_group <= n_group and 1 <= top_k <= topk_group · n_experts / n_group. Scores, weights and
// gradients share the logits' dtype (f32|f64); expert ids are i32. A NaN score ranks below every finite one.
struct RouterConfig {
  enum class Scoring { sigmoid, softmax };
  int64_t n_experts = 8;
  int64_t top_k = 2;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  Scoring scoring = Scoring::sigmoid;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
};

// logits [T, E], bias [E] (f32|f64 or undefined) -> scores [T, E] (saved), expert_ids [T, K] i32
// (in order of decreasing biased score), weights [T, K].
void router_forward(const RouterConfig& config, const Tensor& logits, const Tensor& bias, Tensor& scores,
                    Tensor& expert_ids, Tensor& weights);
// dweights [T, K] -> dlogits [T, E] (overwritten); selection is piecewise constant, so the
// gradient flows only through the chosen unbiased scores and their normalisation.
void router_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, const Tensor& dweights,
                     Tensor& dlogits);

// counts [E] i64 (overwritten) of tokens routed to each expert; expert_ids i32|i64 of any shape,
// an id outside [0, n_experts) throws.
void expert_counts(const Tensor& expert_ids, int64_t n_experts, Tensor& counts);
// Aux-loss-free balancing: bias[i] -= gamma if counts[i] > mean count, += gamma if below, unchanged
// when equal. counts i64|i32 (over the whole batch, i.e. already summed over ranks), bias f32|f64.
void router_update_bias(const Tensor& counts, double gamma, Tensor& bias);

// Sequence-wise balance loss alpha · Σ_i f_i · P_i per sequence, averaged over the sequences,
// with tokens laid out as [n_seq, T / n_seq]: f_i = E / (K · S) · (tokens of the sequence routed
// to i), P_i = mean over the sequence of scores normalised to sum to 1 per token. T % n_seq must be 0.
double balance_loss_forward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                            double alpha);
// dlogits += dloss · ∂loss/∂logits (accumulates; f is treated as a constant).
void balance_loss_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                           double alpha, double dloss, Tensor& dlogits);

}  // namespace dsx::ops
