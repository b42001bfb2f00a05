// The CPU bf16 GEMM: both operands rounded to bf16 into f32 scratch (exact: a bf16 value is an
// f32 value), then one sgemm. Products of two bf16 values are exact in fp32, so the sgemm's
// fp32 accumulation is the only rounding between the operands and the output, as in a tensor
// core's bf16 MMA with fp32 accumulation. Rounding costs O(M·K + K·N) against the GEMM's O(M·K·N).
#include "kernels/ops/bf16_gemm.h"

#include <string>

#include "kernels/codecs.h"
#include "kernels/cuda/route.h"
#include "kernels/ops/gemm.h"

namespace dsx::ops {
namespace {

constexpr std::string_view kOp = "bf16_gemm";

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// x (2-D, f32 or bf16) as an f32 tensor holding bf16 values: f32 is rounded to nearest even,
// bf16 is widened.
Tensor bf16_values(const Tensor& x, std::string_view name) {
  check_cpu(x, kOp, name);
  check(x.ndim() == 2 && (x.dtype() == DType::f32 || x.dtype() == DType::bf16), kOp,
        [&] { return std::string(name) + " must be a 2-D f32 or bf16 tensor, got " + x.describe(); });
  Tensor out = Tensor::empty(x.shape(), DType::f32);
  float* dst = out.data<float>();
  const int64_t n = x.numel();
  if (x.dtype() == DType::f32) {
    const float* src = x.data<float>();
#pragma omp parallel for schedule(static) if (n > kParallelElements)
    for (int64_t i = 0; i < n; ++i) dst[i] = codec::bf16_to_float(codec::float_to_bf16(src[i]));
  } else {
    const bf16* src = x.data<bf16>();
#pragma omp parallel for schedule(static) if (n > kParallelElements)
    for (int64_t i = 0; i < n; ++i) dst[i] = codec::bf16_to_float(src[i].bits);
  }
  return out;
}

// c (bf16) = bf16(sum + c) when accumulating, else bf16(sum); the addition in fp32.
void store_bf16(const Tensor& sum, bool accumulate, Tensor& c) {
  const float* s = sum.data<float>();
  bf16* out = c.data<bf16>();
  const int64_t n = c.numel();
#pragma omp parallel for schedule(static) if (n > kParallelElements)
  for (int64_t i = 0; i < n; ++i) {
    const float v = accumulate ? s[i] + static_cast<float>(out[i]) : s[i];
    out[i].bits = codec::float_to_bf16(v);
  }
}

}  // namespace

void bf16_gemm(bool trans_a, bool trans_b, const Tensor& a, const Tensor& b, Tensor& c, bool accumulate) {
  DSX_ROUTE_TO_CUDA(c, bf16_gemm(trans_a, trans_b, a, b, c, accumulate));
  check_cpu(c, kOp, "c");
  check(c.dtype() == DType::f32 || c.dtype() == DType::bf16, kOp,
        [&] { return "c must be f32 or bf16, got " + c.describe(); });
  const Tensor a_values = bf16_values(a, "a"), b_values = bf16_values(b, "b");
  if (c.dtype() == DType::f32) {
    gemm(trans_a, trans_b, 1.0, a_values, b_values, accumulate ? 1.0 : 0.0, c);  // checks the shapes
    return;
  }
  check(c.ndim() == 2, kOp, [&] { return "c must be 2-D, got " + c.describe(); });
  Tensor sum = Tensor::empty(c.shape(), DType::f32);
  gemm(trans_a, trans_b, 1.0, a_values, b_values, 0.0, sum);
  store_bf16(sum, accumulate, c);
}

}  // namespace dsx::ops
