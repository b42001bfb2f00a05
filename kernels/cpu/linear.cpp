#include "kernels/ops/linear.h"

#include <string>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"
#include "kernels/ops/gemm.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// The operand as the GEMM's compute dtype: t itself when it already is, otherwise a bf16 operand
// widened (exactly) into a scratch tensor that lives until the GEMM is done. OpenBLAS here has
// no bf16 GEMM, and widening costs O(elements) against the GEMM's O(elements · other dim).
// t is compute or bf16 (checks::linear_* said so).
Tensor as_compute(const Tensor& t, DType compute, std::string_view op) {
  if (t.dtype() == compute) return t;
  Tensor wide = Tensor::empty(t.shape(), compute);
  dispatch_float(compute, op, [&]<class T>() {
    const bf16* src = t.data<bf16>();
    T* dst = wide.data<T>();
    const int64_t n = t.numel();
#pragma omp parallel for simd schedule(static) if (n > kParallelElements)
    for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(static_cast<float>(src[i]));
  });
  return wide;
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y) {
  DSX_ROUTE_TO_CUDA(y, linear_forward(x, weight, y));
  constexpr std::string_view op = "linear_forward";
  checks::linear_forward(Device::cpu, x, weight, y);
  gemm(false, true, 1.0, as_compute(x, y.dtype(), op), as_compute(weight, y.dtype(), op), 0.0, y);
}

void linear_backward_input(const Tensor& dy, const Tensor& weight, Tensor& dx) {
  DSX_ROUTE_TO_CUDA(dx, linear_backward_input(dy, weight, dx));
  constexpr std::string_view op = "linear_backward_input";
  checks::linear_backward_input(Device::cpu, dy, weight, dx);
  gemm(false, false, 1.0, as_compute(dy, dx.dtype(), op), as_compute(weight, dx.dtype(), op), 0.0, dx);
}

void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dweight) {
  DSX_ROUTE_TO_CUDA(dweight, linear_backward_weight(dy, x, dweight));
  constexpr std::string_view op = "linear_backward_weight";
  checks::linear_backward_weight(Device::cpu, dy, x, dweight);
  gemm(true, false, 1.0, as_compute(dy, dweight.dtype(), op), as_compute(x, dweight.dtype(), op), 1.0, dweight);
}

}  // namespace dsx::ops
