// CUDA GEMMs of kernels/ops/gemm.h, linear.h and bf16_gemm.h, through cuBLASLt
// (kernels/cuda/cublaslt.h: cached plans, row-major tensors as transposed column-major ones).
//
// dtypes:
//   gemm          f32: f32 A/B/C, CUBLAS_COMPUTE_32F (true fp32 FMAs, no TF32: matches the CPU
//                 sgemm up to the order of the sums); f64: CUBLAS_COMPUTE_64F.
//   linear_*      bf16 inputs with an f32 output: bf16 A/B, f32 C/D, CUBLAS_COMPUTE_32F — the
//                 tensor-core path the model runs; a bf16 product is exact in fp32, so this equals
//                 the CPU's f32 GEMM of the widened values up to the order of the sums. Every
//                 other accepted mix (f32/f64 output, f32 or f64 inputs, at most one bf16 input)
//                 widens its bf16 inputs exactly into f32/f64 scratch, as the CPU does.
//                 linear_backward_weight accumulates (beta = 1).
//   bf16_gemm     bf16 A/B (f32 operands rounded to nearest even on the device by Tensor::to,
//                 the codec the CPU uses), f32 or bf16 C/D, CUBLAS_COMPUTE_32F, beta = accumulate.
// Work mapping: cuBLASLt's kernels do the products. The one kernel here scales the output for
// an empty inner dimension (K = 0): grid-stride, one element per thread.
#include <cublasLt.h>

#include <string>

#include "kernels/cuda/cublaslt.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/gemm_internal.h"
#include "kernels/cuda/ops_gemm.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {

// ============================================ kernels ============================================
namespace {

template <class T>
__global__ void scale_kernel(T* c, T beta, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) c[i] = beta * c[i];
}

}  // namespace

// =========================================== launchers ===========================================
namespace gemm_detail {

cudaDataType_t cuda_type(DType t) {
  switch (t) {
    case DType::f32:
      return CUDA_R_32F;
    case DType::f64:
      return CUDA_R_64F;
    case DType::bf16:
      return CUDA_R_16BF;
    case DType::fp8_e4m3:
      return CUDA_R_8F_E4M3;
    default:
      unsupported_dtype("cuBLASLt GEMM", t);
  }
}

void scale_output(Tensor& c, double beta) {
  const int64_t n = c.numel();
  dispatch_float(c.dtype(), "gemm", [&]<class T>() {
    const T b = static_cast<T>(beta);  // as the CPU: a beta that rounds to 0 in f32 is 0
    if (b == T(1) || n == 0) return;
    if (b == T(0)) {  // overwrite without reading: NaN in c does not survive
      c.zero();
      return;
    }
    scale_kernel<T><<<grid_for(n), kBlock, 0, current_stream()>>>(c.data<T>(), b, n);
    DSX_CUDA_CHECK_LAUNCH("scale_kernel");
  });
}

void row_major_gemm(bool trans_a, const Tensor& a, bool trans_b, const Tensor& b, Tensor& c,
                    cublasComputeType_t compute, double alpha, double beta) {
  // The scalars must match the descriptor's scale type (CUDA_R_64F for COMPUTE_64F).
  const float alpha32 = static_cast<float>(alpha), beta32 = static_cast<float>(beta);
  const bool wide = compute == CUBLAS_COMPUTE_64F;
  const void* alpha_ptr = wide ? static_cast<const void*>(&alpha) : static_cast<const void*>(&alpha32);
  const void* beta_ptr = wide ? static_cast<const void*>(&beta) : static_cast<const void*>(&beta32);
  const auto args_of = [&](const Tensor& x, const Tensor& y, Tensor& out) {
    const blas::RowMajor mx{x.raw(), cuda_type(x.dtype()), x.dim(0), x.dim(1)};
    const blas::RowMajor my{y.raw(), cuda_type(y.dtype()), y.dim(0), y.dim(1)};
    return blas::row_major(trans_a, mx, trans_b, my, out.raw(), cuda_type(out.dtype()), compute, alpha_ptr, beta_ptr);
  };
  if (blas::try_matmul(args_of(a, b, c))) return;
  const auto aligned = [](const Tensor& t) { return reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0; };
  if (aligned(a) && aligned(b) && aligned(c)) {
    blas::matmul(args_of(a, b, c));  // no algorithm at all: throws, naming the problem
    return;
  }
  // No kernel for operands this poorly aligned (an offset view such as a slice of a bf16
  // tensor): run on fresh (256-byte aligned) copies.
  const Tensor a_copy = aligned(a) ? a : a.clone(), b_copy = aligned(b) ? b : b.clone();
  Tensor c_copy = aligned(c) ? c : c.clone();
  blas::matmul(args_of(a_copy, b_copy, c_copy));
  if (c_copy.raw() != c.raw()) c.copy_from(c_copy);
}

}  // namespace gemm_detail

namespace {

using gemm_detail::row_major_gemm;

struct Dims {
  int64_t m, n, k;
};

std::string operands(const Tensor& a, const Tensor& b, const Tensor& c) {
  return "a " + a.describe() + ", b " + b.describe() + ", c " + c.describe();
}

// op(a) [M, K] · op(b) [K, N] into c [M, N]: the inner dimensions agree and c has the shape.
Dims check_dims(bool trans_a, bool trans_b, const Tensor& a, const Tensor& b, const Tensor& c, std::string_view op) {
  const Dims d{trans_a ? a.dim(1) : a.dim(0), trans_b ? b.dim(0) : b.dim(1), trans_a ? a.dim(0) : a.dim(1)};
  const int64_t k_b = trans_b ? b.dim(1) : b.dim(0);
  check(d.k == k_b, op, [&] {
    return "inner dimensions differ: op(a) is [" + std::to_string(d.m) + ", " + std::to_string(d.k) + "], op(b) is [" +
           std::to_string(k_b) + ", " + std::to_string(d.n) + "]";
  });
  check_shape(c, {d.m, d.n}, op, "c");
  return d;
}

cublasComputeType_t compute_of(DType out) {
  return out == DType::f64 ? CUBLAS_COMPUTE_64F : CUBLAS_COMPUTE_32F;
}

// ---- linear -------------------------------------------------------------------------------------

// out = op(p) · op(q) (+ out when accumulate), shapes checked. Two bf16 inputs into an f32
// output take the tensor cores directly; otherwise bf16 inputs are widened to out's dtype.
void linear_gemm(bool trans_p, const Tensor& p, bool trans_q, const Tensor& q, Tensor& out, bool accumulate) {
  const int64_t k = trans_p ? p.dim(0) : p.dim(1);
  if (out.numel() == 0) return;
  if (k == 0) {  // the empty sum: 0, or out unchanged when accumulating
    if (!accumulate) out.zero();
    return;
  }
  const double beta = accumulate ? 1.0 : 0.0;
  if (out.dtype() == DType::f32 && p.dtype() == DType::bf16 && q.dtype() == DType::bf16) {
    row_major_gemm(trans_p, p, trans_q, q, out, CUBLAS_COMPUTE_32F, 1.0, beta);
    return;
  }
  const Tensor wide_p = p.dtype() == out.dtype() ? p : p.to(out.dtype());  // exact: bf16 ⊂ f32 ⊂ f64
  const Tensor wide_q = q.dtype() == out.dtype() ? q : q.to(out.dtype());
  row_major_gemm(trans_p, wide_p, trans_q, wide_q, out, compute_of(out.dtype()), 1.0, beta);
}

// ---- bf16_gemm ----------------------------------------------------------------------------------

constexpr std::string_view kBf16Op = "bf16_gemm";

void check_bf16_operand(const Tensor& x, std::string_view name) {
  check_on_gpu(x, kBf16Op, name);
  check(x.ndim() == 2 && (x.dtype() == DType::f32 || x.dtype() == DType::bf16), kBf16Op,
        [&] { return std::string(name) + " must be a 2-D f32 or bf16 tensor, got " + x.describe(); });
}

// x as bf16: rounded to nearest even on the device when f32, as it is when bf16.
Tensor as_bf16(const Tensor& x) {
  return x.dtype() == DType::bf16 ? x : x.to(DType::bf16);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta, Tensor& c) {
  constexpr std::string_view op = "gemm";
  check_on_gpu(a, op, "a");
  check_on_gpu(b, op, "b");
  check_on_gpu(c, op, "c");
  check(a.ndim() == 2 && b.ndim() == 2 && c.ndim() == 2, op,
        [&] { return "a, b and c must be 2-D, got " + operands(a, b, c); });
  check(a.dtype() == c.dtype() && b.dtype() == c.dtype(), op,
        [&] { return "a, b and c must share one dtype, got " + operands(a, b, c); });
  const Dims d = check_dims(trans_a, trans_b, a, b, c, op);
  if (c.dtype() != DType::f32 && c.dtype() != DType::f64) unsupported_dtype(op, c.dtype());
  if (d.m == 0 || d.n == 0) return;
  if (d.k == 0) {  // op(a)·op(b) is an empty sum: c = beta · c
    gemm_detail::scale_output(c, beta);
    return;
  }
  row_major_gemm(trans_a, a, trans_b, b, c, compute_of(c.dtype()), alpha, beta);
}

void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y) {
  ops::checks::linear_forward(Device::cuda, x, weight, y);
  linear_gemm(false, x, true, weight, y, false);  // y = x · Wᵀ
}

void linear_backward_input(const Tensor& dy, const Tensor& weight, Tensor& dx) {
  ops::checks::linear_backward_input(Device::cuda, dy, weight, dx);
  linear_gemm(false, dy, false, weight, dx, false);  // dx = dy · W
}

void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dweight) {
  ops::checks::linear_backward_weight(Device::cuda, dy, x, dweight);
  linear_gemm(true, dy, false, x, dweight, true);  // dW += dyᵀ · x
}

void bf16_gemm(bool trans_a, bool trans_b, const Tensor& a, const Tensor& b, Tensor& c, bool accumulate) {
  check_on_gpu(c, kBf16Op, "c");
  check(c.dtype() == DType::f32 || c.dtype() == DType::bf16, kBf16Op,
        [&] { return "c must be f32 or bf16, got " + c.describe(); });
  check_bf16_operand(a, "a");
  check_bf16_operand(b, "b");
  check(c.ndim() == 2, kBf16Op, [&] { return "c must be 2-D, got " + c.describe(); });
  const Dims d = check_dims(trans_a, trans_b, a, b, c, kBf16Op);
  if (d.m == 0 || d.n == 0) return;
  if (d.k == 0) {  // the empty sum: 0, or c unchanged when accumulating
    if (!accumulate) c.zero();
    return;
  }
  const Tensor a16 = as_bf16(a), b16 = as_bf16(b);
  row_major_gemm(trans_a, a16, trans_b, b16, c, CUBLAS_COMPUTE_32F, 1.0, accumulate ? 1.0 : 0.0);
}

}  // namespace dsx::cuda
