// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
// rmsnorm.h (rmsnorm.cu).
#pragma once
#include "kernels/tensor.h"

namespace dsx::cuda {

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd);
void rmsnorm_backward_input(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dx);
void rmsnorm_backward_weight(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dweight);

}  // namespace dsx::cuda
