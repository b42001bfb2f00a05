#include "kernels/ops/linear.h"

#include <string>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/gemm.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// The operand as the GEMM's compute dtype: t itself when it already is, otherwise a bf16 operand
// widened (exactly) into a scratch tensor that lives until the GEMM is done. OpenBLAS here has
// no bf16 GEMM, and widening costs O(elements) against the GEMM's O(elements · other dim).
Tensor as_compute(const Tensor& t, DType compute, std::string_view op, std::string_view name) {
  if (t.dtype() == compute) return t;
  check(t.dtype() == DType::bf16, op, [&] {
    return std::string(name) + " is " + t.describe() + "; expected " + std::string(dtype_name(compute)) +
           " (the output's dtype) or bf16";
  });
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

void check_compute(const Tensor& out, std::string_view op, std::string_view name) {
  check_cpu(out, op, name);
  check(out.dtype() == DType::f32 || out.dtype() == DType::f64, op,
        [&] { return std::string(name) + " must be f32 or f64 (it sets the compute dtype), got " + out.describe(); });
}

void check_2d(const Tensor& t, std::string_view op, std::string_view name, std::string_view layout) {
  check_cpu(t, op, name);
  check(t.ndim() == 2, op,
        [&] { return std::string(name) + " must be 2-D " + std::string(layout) + ", got " + shape_str(t.shape()); });
}

std::string disagree(std::string_view a_name, const Tensor& a, std::string_view b_name, const Tensor& b,
                     std::string_view what) {
  return std::string(a_name) + " " + shape_str(a.shape()) + " and " + std::string(b_name) + " " + shape_str(b.shape()) +
         " disagree on " + std::string(what);
}

}  // namespace

void linear_forward(const Tensor& x, const Tensor& weight, Tensor& y) {
  DSX_ROUTE_TO_CUDA(y, linear_forward(x, weight, y));
  constexpr std::string_view op = "linear_forward";
  check_compute(y, op, "y");
  check_2d(x, op, "x", "[N, in]");
  check_2d(weight, op, "weight", "[out, in]");
  check(x.dim(1) == weight.dim(1), op, [&] { return disagree("x", x, "weight", weight, "the input features"); });
  check_shape(y, {x.dim(0), weight.dim(0)}, op, "y");
  gemm(false, true, 1.0, as_compute(x, y.dtype(), op, "x"), as_compute(weight, y.dtype(), op, "weight"), 0.0, y);
}

void linear_backward_input(const Tensor& dy, const Tensor& weight, Tensor& dx) {
  DSX_ROUTE_TO_CUDA(dx, linear_backward_input(dy, weight, dx));
  constexpr std::string_view op = "linear_backward_input";
  check_compute(dx, op, "dx");
  check_2d(dy, op, "dy", "[N, out]");
  check_2d(weight, op, "weight", "[out, in]");
  check(dy.dim(1) == weight.dim(0), op, [&] { return disagree("dy", dy, "weight", weight, "the output features"); });
  check_shape(dx, {dy.dim(0), weight.dim(1)}, op, "dx");
  gemm(false, false, 1.0, as_compute(dy, dx.dtype(), op, "dy"), as_compute(weight, dx.dtype(), op, "weight"), 0.0, dx);
}

void linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dweight) {
  DSX_ROUTE_TO_CUDA(dweight, linear_backward_weight(dy, x, dweight));
  constexpr std::string_view op = "linear_backward_weight";
  check_compute(dweight, op, "dweight");
  check_2d(dy, op, "dy", "[N, out]");
  check_2d(x, op, "x", "[N, in]");
  check(dy.dim(0) == x.dim(0), op, [&] { return disagree("dy", dy, "x", x, "the number of rows"); });
  check_shape(dweight, {dy.dim(1), x.dim(1)}, op, "dweight");
  gemm(true, false, 1.0, as_compute(dy, dweight.dtype(), op, "dy"), as_compute(x, dweight.dtype(), op, "x"), 1.0,
       dweight);
}

}  // namespace dsx::ops
