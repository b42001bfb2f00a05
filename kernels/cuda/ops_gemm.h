// CUDA ops of this group: declarations with the same signatures as kernels/ops/gemm.h,
// linear.h, bf16_gemm.h and fp8.h (fp8_gemm). All GEMMs run through cuBLASLt
// (kernels/cuda/cublaslt.h: cached plans, the row-major mapping); kernels/cuda/gemm.cu and
// gemm_fp8.cu say per op which cuBLASLt types they use.
#pragma once
#include <cstdint>

#include "kernels/ops/fp8.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

// f32 (CUBLAS_COMPUTE_32F, no TF32) or f64 (CUBLAS_COMPUTE_64F).
void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta, Tensor& c);

// Two bf16 inputs with an f32 output run the bf16 tensor-core GEMM with fp32 accumulation —
// exactly what the CPU computes (bf16 products are exact in fp32), up to the order of the sums.
// Other combinations widen bf16 inputs (exactly) to the output's dtype first.
void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y);
void linear_backward_input(const Tensor& dy, const Tensor& weight, Tensor& dx);
void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dweight);

// bf16 A/B (f32 operands rounded to nearest even on the device first), f32 or bf16 c.
void bf16_gemm(bool trans_a, bool trans_b, const Tensor& a, const Tensor& b, Tensor& c, bool accumulate = false);

// cuBLASLt's block-scaled FP8 GEMM (1×128 tiles × 128×128 blocks or 1×128 tiles, fp32
// promotion) where it has an algorithm; otherwise both operands are dequantized to f32 and
// multiplied by the f32 GEMM. gemm_fp8.cu explains when and how.
void fp8_gemm(const ops::Fp8Matrix& a, const ops::Fp8Matrix& b, Tensor& d, bool accumulate = false);

// Not an op: whether fp8_gemm takes cuBLASLt's block-scaled path for d [m, n] = a [m, k] ·
// b [n, k]ᵀ with b scaled as b_scaling and d of d_dtype (f32|bf16), for freshly allocated
// (256-byte aligned) tensors on the current device. Tests pick their tolerance with it;
// benchmarks report it.
bool fp8_gemm_uses_block_scaling(int64_t m, int64_t n, int64_t k, ops::Fp8Scaling b_scaling, DType d_dtype);

}  // namespace dsx::cuda
