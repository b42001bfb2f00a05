#include "kernels/ops/grad_norm.h"

#include <algorithm>
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"

namespace dsx::ops {
namespace {

// Sums are taken over fixed blocks of elements and the block sums added in order, so the result is
// bit-identical for any number of threads (a plain OpenMP reduction is not).
constexpr int64_t kBlock = 1 << 14;

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

template <class F>
void dispatch_grad(const Tensor& t, std::string_view op, F&& f) {
  check_cpu(t, op, "tensor");
  check(is_floating(t.dtype()), op, "tensor must be floating point, got " + t.describe());
  dispatch_any(t.dtype(), [&]<class T>() {
    if constexpr (std::is_floating_point_v<T> || !std::is_arithmetic_v<T>) f.template operator()<T>();
  });
}

template <class T>
double block_sum_of_squares(const T* x, int64_t n) {
  double s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) {
    const double v = convert_element<double>(x[i]);
    s += v * v;
  }
  return s;
}

}  // namespace

double sum_of_squares(const Tensor& t) {
  DSX_ROUTE_TO_CUDA(t, sum_of_squares(t));
  double total = 0;
  dispatch_grad(t, "sum_of_squares", [&]<class T>() {
    const T* x = t.data<T>();
    const int64_t n = t.numel();
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    std::vector<double> partial(static_cast<size_t>(blocks));
#pragma omp parallel for schedule(static) if (n > kParallelElements)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t begin = b * kBlock;
      partial[b] = block_sum_of_squares(x + begin, std::min(kBlock, n - begin));
    }
    for (double p : partial) total += p;
  });
  return total;
}

double global_norm(std::span<const Tensor> tensors) {
  DSX_ROUTE_TO_CUDA(tensors.empty() ? Tensor() : tensors.front(), global_norm(tensors));
  double total = 0;
  for (const Tensor& t : tensors) total += sum_of_squares(t);
  return std::sqrt(total);
}

double clip_grad_norm(std::span<Tensor> grads, double max_norm) {
  DSX_ROUTE_TO_CUDA(grads.empty() ? Tensor() : grads.front(), clip_grad_norm(grads, max_norm));
  const double norm = global_norm(grads);
  if (!(max_norm > 0) || !std::isfinite(norm) || norm <= max_norm) return norm;
  const double scale = max_norm / (norm + 1e-6);
  for (Tensor& g : grads) {
    dispatch_grad(g, "clip_grad_norm", [&]<class T>() {
      T* x = g.data<T>();
      const int64_t n = g.numel();
      if constexpr (std::is_floating_point_v<T>) {
        const T s = static_cast<T>(scale);
#pragma omp parallel for simd schedule(static) if (n > kParallelElements)
        for (int64_t i = 0; i < n; ++i) x[i] *= s;
      } else {  // narrow floats: scale in float, round back once
        const float s = static_cast<float>(scale);
#pragma omp parallel for schedule(static) if (n > kParallelElements)
        for (int64_t i = 0; i < n; ++i) x[i] = T(static_cast<float>(x[i]) * s);
      }
    });
  }
  return norm;
}

}  // namespace dsx::ops
