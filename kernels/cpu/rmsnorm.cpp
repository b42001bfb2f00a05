#include "kernels/ops/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

using checks::Named;

// x [N, D] and rstd [N] on the CPU; every tensor in `same` shares x's dtype.
checks::RmsnormDims check_rmsnorm(std::string_view op, const Tensor& x, const Tensor& rstd,
                                  std::initializer_list<Named> same) {
  return checks::rmsnorm(op, Device::cpu, x, rstd, same);
}

template <class T>
T sum_of_products(const T* a, const T* b, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd) {
  DSX_ROUTE_TO_CUDA(x, rmsnorm_forward(x, weight, eps, y, rstd));
  constexpr std::string_view op = "rmsnorm_forward";
  const checks::RmsnormDims dims = check_rmsnorm(op, x, rstd, {{&rstd, "rstd"}, {&weight, "weight"}, {&y, "y"}});
  check_shape(weight, {dims.cols}, op, "weight");
  check_shape(y, x.shape(), op, "y");
  check(std::isfinite(eps) && eps >= 0, op, [&] { return "eps must be finite and >= 0, got " + std::to_string(eps); });
  dispatch_float(x.dtype(), op, [&]<class T>() {
    const T* xs = x.data<T>();
    const T* w = weight.data<T>();
    T* ys = y.data<T>();
    T* r = rstd.data<T>();
    const int64_t d = dims.cols;
#pragma omp parallel for schedule(static) if (dims.rows * d > kParallelElements)
    for (int64_t i = 0; i < dims.rows; ++i) {
      const T* row = xs + i * d;
      const T mean_square = sum_of_products(row, row, d) / static_cast<T>(d);
      const T inv = T(1) / std::sqrt(mean_square + static_cast<T>(eps));
      r[i] = inv;
      T* out = ys + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) out[j] = row[j] * inv * w[j];
    }
  });
}

// With r = (mean(x²) + eps)^(-1/2) and y_j = x_j r w_j:
//   dx_k = r w_k dy_k - (r³ / D) x_k Σ_j dy_j w_j x_j
void rmsnorm_backward_input(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dx) {
  DSX_ROUTE_TO_CUDA(x, rmsnorm_backward_input(x, weight, rstd, dy, dx));
  constexpr std::string_view op = "rmsnorm_backward_input";
  const checks::RmsnormDims dims =
      check_rmsnorm(op, x, rstd, {{&rstd, "rstd"}, {&weight, "weight"}, {&dy, "dy"}, {&dx, "dx"}});
  check_shape(weight, {dims.cols}, op, "weight");
  check_shape(dy, x.shape(), op, "dy");
  check_shape(dx, x.shape(), op, "dx");
  dispatch_float(x.dtype(), op, [&]<class T>() {
    const T* xs = x.data<T>();
    const T* w = weight.data<T>();
    const T* r = rstd.data<T>();
    const T* dys = dy.data<T>();
    T* dxs = dx.data<T>();
    const int64_t d = dims.cols;
#pragma omp parallel for schedule(static) if (dims.rows * d > kParallelElements)
    for (int64_t i = 0; i < dims.rows; ++i) {
      const T* xr = xs + i * d;
      const T* g = dys + i * d;
      T s = 0;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < d; ++j) s += g[j] * w[j] * xr[j];
      const T inv = r[i];
      const T coeff = inv * inv * inv * s / static_cast<T>(d);
      T* out = dxs + i * d;
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) out[j] = inv * w[j] * g[j] - coeff * xr[j];
    }
  });
}

void rmsnorm_backward_weight(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dweight) {
  DSX_ROUTE_TO_CUDA(x, rmsnorm_backward_weight(x, rstd, dy, dweight));
  constexpr std::string_view op = "rmsnorm_backward_weight";
  const checks::RmsnormDims dims = check_rmsnorm(op, x, rstd, {{&rstd, "rstd"}, {&dy, "dy"}, {&dweight, "dweight"}});
  check_shape(dy, x.shape(), op, "dy");
  check_shape(dweight, {dims.cols}, op, "dweight");
  dispatch_float(x.dtype(), op, [&]<class T>() {
    const T* xs = x.data<T>();
    const T* r = rstd.data<T>();
    const T* dys = dy.data<T>();
    T* dw = dweight.data<T>();
    const int64_t d = dims.cols;
    // Threads split the columns and each sums its rows in row order: no reduction buffers,
    // and the result does not depend on the thread count.
    constexpr int64_t kBlock = 256;
    const int64_t blocks = (d + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (dims.rows * d > kParallelElements)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock, width = std::min(d, begin + kBlock) - begin;
      T acc[kBlock] = {};
      for (int64_t i = 0; i < dims.rows; ++i) {
        const T* xr = xs + i * d + begin;
        const T* g = dys + i * d + begin;
        const T inv = r[i];
#pragma omp simd
        for (int64_t j = 0; j < width; ++j) acc[j] += g[j] * xr[j] * inv;
      }
      for (int64_t j = 0; j < width; ++j) dw[begin + j] += acc[j];
    }
  });
}

}  // namespace dsx::ops
