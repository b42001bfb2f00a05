// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
#pragma once
#include <span>

#include "kernels/ops/adamw.h"
#include "kernels/ops/grad_norm.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

using ops::AdamWConfig;

void adamw_step(const AdamWConfig& config, int64_t step, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v);

// Deterministic: a fixed partition of the elements (it depends on numel only), partial sums in
// double reduced in a fixed order. Each synchronises once (the result is a host value).
double sum_of_squares(const Tensor& t);
double global_norm(std::span<const Tensor> tensors);
double clip_grad_norm(std::span<Tensor> grads, double max_norm);

}  // namespace dsx::cuda
