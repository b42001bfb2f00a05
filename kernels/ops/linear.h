#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// y = x · Wᵀ. weight [out, in] (Hugging Face layout), x [N, in] -> y [N, out].
// x and weight may be f32, f64 or bf16 (bf16 is widened to f32 for the GEMM); y is f32 or f64
// and sets the compute type. No bias: DeepSeek models have none.
// In all three functions each input is either the output's dtype or bf16 (widened exactly into
// a per-call scratch buffer before the BLAS GEMM); f32 and f64 are never mixed. All 2-D.
void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y);
// dx [N, in] = dy · W   (overwritten)
void linear_backward_input(const Tensor& dy, const Tensor& weight, Tensor& dx);
// dweight [out, in] += dyᵀ · x   (accumulates)
void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dweight);
}  // namespace dsx::ops
