#pragma once
#include <span>

#include "kernels/tensor.h"

namespace dsx::ops {
// Σ x² accumulated in double, for any floating dtype (f64, f32, bf16, fp8). The sum is taken over
// fixed blocks added in order, so it is bit-identical for any number of threads.
double sum_of_squares(const Tensor& t);
// sqrt(Σ over all tensors of Σ x²).
double global_norm(std::span<const Tensor> tensors);
// Scales every tensor by max_norm / (norm + 1e-6) when norm > max_norm; returns the norm
// before clipping. max_norm <= 0 disables clipping. A non-finite norm (inf/NaN gradients) leaves
// the gradients untouched and is returned as is, so the caller can skip the step.
double clip_grad_norm(std::span<Tensor> grads, double max_norm);
}  // namespace dsx::ops
