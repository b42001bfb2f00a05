#pragma once
#include <span>

#include "kernels/tensor.h"

namespace dsx::ops {
// Σ x² accumulated in double.
double sum_of_squares(const Tensor& t);
// sqrt(Σ over all tensors of Σ x²).
double global_norm(std::span<const Tensor> tensors);
// Scales every tensor by max_norm / (norm + 1e-6) when norm > max_norm; returns the norm
// before clipping. max_norm <= 0 disables clipping.
double clip_grad_norm(std::span<Tensor> grads, double max_norm);
}  // namespace dsx::ops
