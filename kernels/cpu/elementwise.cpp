#include "kernels/ops/elementwise.h"

#include <cblas.h>

#include <algorithm>
#include <climits>
#include <cstring>
#include <string>
#include <type_traits>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// BLAS level-1 takes 32-bit counts; longer vectors go through in INT_MAX-sized pieces.
template <class F>
void in_blas_chunks(int64_t n, F&& f) {
  for (int64_t begin = 0; begin < n; begin += INT_MAX) {
    f(begin, static_cast<blasint>(std::min<int64_t>(INT_MAX, n - begin)));
  }
}

using Rows = checks::ColumnRows;

// x and out (or src and dst) are [..., D] and [..., W] with identical leading dimensions,
// and columns [begin, begin + W) must lie inside D.
Rows check_columns(std::string_view op, const Tensor& wide, std::string_view wide_name, const Tensor& narrow,
                   std::string_view narrow_name, int64_t begin) {
  return checks::columns(op, Device::cpu, wide, wide_name, narrow, narrow_name, begin);
}

}  // namespace

void add_(Tensor& y, const Tensor& x, double alpha) {
  DSX_ROUTE_TO_CUDA(y, add_(y, x, alpha));
  constexpr std::string_view op = "add_";
  check_cpu(y, op, "y");
  check_cpu(x, op, "x");
  check_shape(x, y.shape(), op, "x");
  check(x.dtype() == y.dtype(), op, [&] { return "x " + x.describe() + " and y " + y.describe() + " dtypes differ"; });
  dispatch_float(y.dtype(), op, [&]<class T>() {
    const T* xs = x.data<T>();
    T* ys = y.data<T>();
    in_blas_chunks(y.numel(), [&](int64_t begin, blasint n) {
      if constexpr (std::is_same_v<T, float>) {
        cblas_saxpy(n, static_cast<float>(alpha), xs + begin, 1, ys + begin, 1);
      } else {
        cblas_daxpy(n, alpha, xs + begin, 1, ys + begin, 1);
      }
    });
  });
}

void scale_(Tensor& y, double alpha) {
  DSX_ROUTE_TO_CUDA(y, scale_(y, alpha));
  constexpr std::string_view op = "scale_";
  check_cpu(y, op, "y");
  dispatch_float(y.dtype(), op, [&]<class T>() {
    // Scaling by zero writes zeros, whatever y held (OpenBLAS versions differ on NaN · 0).
    if (alpha == 0.0) {
      y.zero();
      return;
    }
    T* ys = y.data<T>();
    in_blas_chunks(y.numel(), [&](int64_t begin, blasint n) {
      if constexpr (std::is_same_v<T, float>) {
        cblas_sscal(n, static_cast<float>(alpha), ys + begin, 1);
      } else {
        cblas_dscal(n, alpha, ys + begin, 1);
      }
    });
  });
}

void copy_columns(const Tensor& x, int64_t begin, Tensor& out) {
  DSX_ROUTE_TO_CUDA(x, copy_columns(x, begin, out));
  const Rows rows = check_columns("copy_columns", x, "x", out, "out", begin);
  const size_t elem = dtype_size(x.dtype());
  const auto* src = static_cast<const char*>(x.raw());
  auto* dst = static_cast<char*>(out.raw());
  const size_t row_bytes = static_cast<size_t>(rows.narrow_width) * elem;
  if (row_bytes == 0) return;
#pragma omp parallel for schedule(static) if (rows.count * rows.narrow_width > kParallelElements)
  for (int64_t i = 0; i < rows.count; ++i) {
    std::memcpy(dst + i * row_bytes, src + (i * rows.wide_width + begin) * static_cast<int64_t>(elem), row_bytes);
  }
}

void set_columns(Tensor& dst, int64_t begin, const Tensor& src, bool accumulate) {
  DSX_ROUTE_TO_CUDA(dst, set_columns(dst, begin, src, accumulate));
  constexpr std::string_view op = "set_columns";
  const Rows rows = check_columns(op, dst, "dst", src, "src", begin);
  if (rows.narrow_width == 0) return;
  if (!accumulate) {
    const size_t elem = dtype_size(dst.dtype());
    const size_t row_bytes = static_cast<size_t>(rows.narrow_width) * elem;
    const auto* s = static_cast<const char*>(src.raw());
    auto* d = static_cast<char*>(dst.raw());
#pragma omp parallel for schedule(static) if (rows.count * rows.narrow_width > kParallelElements)
    for (int64_t i = 0; i < rows.count; ++i) {
      std::memcpy(d + (i * rows.wide_width + begin) * static_cast<int64_t>(elem), s + i * row_bytes, row_bytes);
    }
    return;
  }
  dispatch_float(dst.dtype(), op, [&]<class T>() {
    const T* s = src.data<T>();
    T* d = dst.data<T>();
    const int64_t w = rows.narrow_width;
#pragma omp parallel for schedule(static) if (rows.count * w > kParallelElements)
    for (int64_t i = 0; i < rows.count; ++i) {
      T* out = d + i * rows.wide_width + begin;
      const T* in = s + i * w;
#pragma omp simd
      for (int64_t j = 0; j < w; ++j) out[j] += in[j];
    }
  });
}

}  // namespace dsx::ops
