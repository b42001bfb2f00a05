#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace dsx::ops {

struct CrossEntropyResult {
  double loss_sum = 0;  // sum over counted rows of -log softmax(logits)[target]
  int64_t count = 0;    // rows whose target != ignore_index
};

// logits [N, V], targets [N] (i32|i64; ignore_index or in [0, V)) -> result, lse [N] saved
// (log-sum-exp of every row, ignored rows included). lse may be f32 or f64 whatever the logits'
// dtype: backward computes softmax as exp(logit - lse), so an f32 lse carries a relative error
// of ~6e-8·|lse| into every probability; f64 keeps rows with |logits| >> 1 exact.
CrossEntropyResult cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                                         Tensor& lse);
// dlogits [N, V] (overwritten) = scale · (softmax(logits) - onehot(target)) on counted rows, 0 on
// ignored ones. For the mean loss, scale = upstream_grad / count.
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                            double scale, Tensor& dlogits);

// Per-token policy terms for RL (kernels/cpu/cross_entropy_weighted.cpp), from the logits and
// the lse saved by cross_entropy_forward:
//   logp [N] (overwritten)    = logits[n, target] - lse[n] = log softmax(logits)[target], 0 on ignored rows
//   entropy [N] (overwritten) = lse[n] - Σ_j softmax_j · logits[n, j], 0 on ignored rows; may be undefined
// logp and entropy are f32 or f64 whatever the logits' dtype.
void token_logprobs(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index, Tensor& logp,
                    Tensor& entropy);
// The cross-entropy backward with one scale per row: dlogits [N, V] (overwritten) =
// row_scale[n] · (softmax(logits) - onehot(target)) on counted rows, 0 on ignored ones.
// row_scale is [N], f32 or f64. With row_scale = -g, dlogits is the gradient of Σ_n g_n · logp_n.
void cross_entropy_backward_weighted(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int64_t ignore_index, const Tensor& row_scale, Tensor& dlogits);

}  // namespace dsx::ops
