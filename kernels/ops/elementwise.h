#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// y += alpha · x (same shape and dtype)
void add_(Tensor& y, const Tensor& x, double alpha = 1.0);
// y *= alpha; alpha = 0 writes zeros (NaN/inf in y do not survive).
void scale_(Tensor& y, double alpha);
// For x viewed as rows of its last dimension D: out[..., j] = x[..., begin + j], j < out.dim(-1).
// x and out have the same leading dimensions and dtype (any dtype: elements are copied as bytes).
void copy_columns(const Tensor& x, int64_t begin, Tensor& out);
// dst[..., begin + j] = src[..., j]  (or += when accumulate), j < src.dim(-1). Same leading
// dimensions and dtype; any dtype when copying, f32|f64 when accumulating.
void set_columns(Tensor& dst, int64_t begin, const Tensor& src, bool accumulate = false);
}  // namespace dsx::ops
