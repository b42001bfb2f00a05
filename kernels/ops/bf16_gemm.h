// The bf16 GEMM of a GPU's tensor cores (cuBLAS with bf16 A and B, fp32 compute), emulated on
// the CPU: what `precision.gemm: bf16` runs (docs/FP8.md §8).
#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {

// c [M, N] = op(a) [M, K] · op(b) [K, N]  (+ c when accumulate), op(x) = xᵀ when the matching
// trans flag is set.
//   - a and b: f32 (rounded to bf16 here, round-to-nearest-even as kernels/codecs.h and CUDA's
//     __float2bfloat16_rn) or bf16 (used as is). The caller's tensors are not modified.
//   - Every product of two bf16 values is exact in fp32 (8 + 8 significand bits), so the only
//     other rounding is the fp32 accumulation (BLAS sgemm on the widened bf16 values; the
//     summation order is BLAS's, as on the GPU it is the tensor core's).
//   - c: f32 (the fp32 sum, plus the old c in fp32 when accumulating) or bf16 (that fp32 result
//     rounded to nearest even).
// Error against float64 of the unrounded operands, per element (tests/kernels/test_bf16_gemm.cpp):
//   |c - Σ a·b| ≤ (2·2^-8 + 2^-16)·Σ|a·b| + (K + 2)·2^-24·(Σ|a'·b'| + |c_old|)  [+ 2^-8·|c| for bf16 c]
// with a' = bf16(a), b' = bf16(b) (operand rounding, then fp32 summation, then output rounding).
void bf16_gemm(bool trans_a, bool trans_b, const Tensor& a, const Tensor& b, Tensor& c, bool accumulate = false);

}  // namespace dsx::ops
