// add_, scale_, copy_columns and set_columns for device tensors (kernels/ops/elementwise.h).
//
// dtypes: as the CPU ops: add_, scale_ and accumulating set_columns take f32|f64;
// copy_columns and copying set_columns move any dtype as raw elements of its byte size.
// Thread mapping: one thread per element, grid-stride loops (kBlock threads per block);
// column copies index element e of the [rows, width] window as (e / width, e % width), so
// consecutive threads touch consecutive columns of one row (coalesced).
#include <algorithm>
#include <string>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

template <class T>
__global__ void add_kernel(T* y, const T* x, T alpha, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) y[i] += alpha * x[i];
}

template <class T>
__global__ void scale_kernel(T* y, T alpha, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) y[i] *= alpha;
}

// A [rows, width] window of columns: dst[r, dst_begin + c] (op)= src[r, src_begin + c] with
// rows of src_stride and dst_stride elements. W is an unsigned word of the element's size for
// plain copies, or the float type itself when accumulating.
struct ColumnWindow {
  int64_t rows;
  int64_t width;
  int64_t src_stride;
  int64_t src_begin;
  int64_t dst_stride;
  int64_t dst_begin;
};

template <class W, bool kAccumulate>
__global__ void columns_kernel(const W* src, W* dst, ColumnWindow w) {
  DSX_GRID_STRIDE_LOOP(e, w.rows * w.width) {
    const int64_t r = e / w.width, c = e - r * w.width;
    const W v = src[r * w.src_stride + w.src_begin + c];
    W& out = dst[r * w.dst_stride + w.dst_begin + c];
    if constexpr (kAccumulate) {
      out += v;
    } else {
      out = v;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

using Rows = ops::checks::ColumnRows;

// The CPU op's check_columns with every tensor on the GPU.
Rows check_columns(std::string_view op, const Tensor& wide, std::string_view wide_name, const Tensor& narrow,
                   std::string_view narrow_name, int64_t begin) {
  return ops::checks::columns(op, Device::cuda, wide, wide_name, narrow, narrow_name, begin);
}

template <class W, bool kAccumulate>
void launch_columns(const void* src, void* dst, const ColumnWindow& w) {
  const int64_t n = w.rows * w.width;
  if (n == 0) return;
  columns_kernel<W, kAccumulate>
      <<<grid_for(n), kBlock, 0, current_stream()>>>(static_cast<const W*>(src), static_cast<W*>(dst), w);
  DSX_CUDA_CHECK_LAUNCH("columns_kernel");
}

// Plain copies move elements as unsigned words of their size (the bytes, whatever the dtype).
void copy_window(DType dtype, const void* src, void* dst, const ColumnWindow& w) {
  switch (dtype_size(dtype)) {
    case 1:
      return launch_columns<uint8_t, false>(src, dst, w);
    case 2:
      return launch_columns<uint16_t, false>(src, dst, w);
    case 4:
      return launch_columns<uint32_t, false>(src, dst, w);
    case 8:
      return launch_columns<uint64_t, false>(src, dst, w);
    default:
      unsupported_dtype("copy_columns", dtype);
  }
}

}  // namespace

void add_(Tensor& y, const Tensor& x, double alpha) {
  constexpr std::string_view op = "add_";
  check_on_gpu(y, op, "y");
  check_on_gpu(x, op, "x");
  check_shape(x, y.shape(), op, "x");
  check(x.dtype() == y.dtype(), op, [&] { return "x " + x.describe() + " and y " + y.describe() + " dtypes differ"; });
  dispatch_float(y.dtype(), op, [&]<class T>() {
    const int64_t n = y.numel();
    if (n == 0) return;
    add_kernel<T><<<grid_for(n), kBlock, 0, current_stream()>>>(y.data<T>(), x.data<T>(), static_cast<T>(alpha), n);
    DSX_CUDA_CHECK_LAUNCH("add_kernel");
  });
}

void scale_(Tensor& y, double alpha) {
  constexpr std::string_view op = "scale_";
  check_on_gpu(y, op, "y");
  dispatch_float(y.dtype(), op, [&]<class T>() {
    // Scaling by zero writes zeros, whatever y held (as on the CPU: NaN · 0 does not survive).
    if (alpha == 0.0) {
      y.zero();
      return;
    }
    const int64_t n = y.numel();
    if (n == 0) return;
    scale_kernel<T><<<grid_for(n), kBlock, 0, current_stream()>>>(y.data<T>(), static_cast<T>(alpha), n);
    DSX_CUDA_CHECK_LAUNCH("scale_kernel");
  });
}

void copy_columns(const Tensor& x, int64_t begin, Tensor& out) {
  const Rows r = check_columns("copy_columns", x, "x", out, "out", begin);
  copy_window(x.dtype(), x.raw(), out.raw(), {r.count, r.narrow_width, r.wide_width, begin, r.narrow_width, 0});
}

void set_columns(Tensor& dst, int64_t begin, const Tensor& src, bool accumulate) {
  constexpr std::string_view op = "set_columns";
  const Rows r = check_columns(op, dst, "dst", src, "src", begin);
  if (r.narrow_width == 0) return;
  const ColumnWindow w{r.count, r.narrow_width, r.narrow_width, 0, r.wide_width, begin};
  if (!accumulate) {
    copy_window(dst.dtype(), src.raw(), dst.raw(), w);
    return;
  }
  dispatch_float(dst.dtype(), op, [&]<class T>() { launch_columns<T, true>(src.raw(), dst.raw(), w); });
}

}  // namespace dsx::cuda
