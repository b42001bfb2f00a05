#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// c = alpha · op(a) · op(b) + beta · c on 2-D tensors of one float dtype (f32|f64) through BLAS;
// op(x) = xᵀ when the matching trans flag is set. Shapes are checked.
// beta = 0 overwrites c (NaN in c does not survive); an empty inner dimension gives beta · c.
void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta, Tensor& c);
}  // namespace dsx::ops
