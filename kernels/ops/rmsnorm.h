#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// y = x * rstd * weight with rstd = 1 / sqrt(mean(x^2) + eps), per row.
// x [N, D], weight [D] -> y [N, D], rstd [N] (saved for backward).
void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd);
// dx [N, D] (overwritten)
void rmsnorm_backward_input(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dx);
// dweight [D] += sum_n dy * x * rstd
void rmsnorm_backward_weight(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dweight);
}  // namespace dsx::ops
