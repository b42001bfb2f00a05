#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// y += alpha · x (same shape and dtype)
void add_(Tensor& y, const Tensor& x, double alpha = 1.0);
// y *= alpha
void scale_(Tensor& y, double alpha);
// For x viewed as rows of its last dimension D: out[..., j] = x[..., begin + j], j < out.dim(-1).
void copy_columns(const Tensor& x, int64_t begin, Tensor& out);
// dst[..., begin + j] = src[..., j]  (or += when accumulate), j < src.dim(-1).
void set_columns(Tensor& dst, int64_t begin, const Tensor& src, bool accumulate = false);
}  // namespace dsx::ops
