// RMSNorm forward and backward for device tensors (kernels/ops/rmsnorm.h).
//
// dtypes: as the CPU op: x, weight, y, rstd, dy, dx, dweight all f32 or all f64, computed in that
// type (sums of squares and dot products reduce in T like the CPU's, in a different order).
//
// Thread mapping:
//  - forward and backward_input: one block per row (rows::threads_for_row(D) threads, about 4
//    columns each); threads stride over the row's columns (coalesced), the row's sum is a
//    warp-shuffle block reduction (block_sum), then the same threads write the row.
//  - backward_weight: a deterministic two-pass column reduction, no atomics. Pass 1: block
//    (32 columns × 8 row lanes) of tile (x = column tile, y = chunk of 256 rows);
//    warps read 32 consecutive columns of a row (coalesced), each thread sums its lane's rows
//    in order, the 8 lanes are added in fixed order through shared memory and written to
//    partial[chunk, column]. Pass 2: one thread per column adds the chunks in order and
//    accumulates into dweight. The order depends only on (N, D), never on scheduling.
#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_norm.h"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {
namespace {

constexpr int kTileColumns = 32;        // pass 1: columns per block (one warp wide)
constexpr int kRowLanes = 8;            // pass 1: rows read in parallel per block
constexpr int64_t kRowsPerChunk = 256;  // pass 1: rows per block (32 per thread), unless N > 65535·256

// ---------------------------------------------------------------------------------------------
// kernels

template <class T>
__global__ void rmsnorm_forward_kernel(const T* x, const T* weight, T* y, T* rstd, int64_t d, T eps) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  T s = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
  s = block_sum(s);
  const T mean_square = s / static_cast<T>(d);
  const T inv = T(1) / sqrt(mean_square + eps);
  if (threadIdx.x == 0) rstd[row] = inv;
  T* yr = y + row * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] * inv * weight[j];
}

// dx_k = r w_k dy_k - (r³ / D) x_k Σ_j dy_j w_j x_j
template <class T>
__global__ void rmsnorm_backward_input_kernel(const T* x, const T* weight, const T* rstd, const T* dy, T* dx,
                                              int64_t d) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  const T* g = dy + row * d;
  T s = 0;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) s += g[j] * weight[j] * xr[j];
  s = block_sum(s);
  const T inv = rstd[row];
  const T coeff = inv * inv * inv * s / static_cast<T>(d);
  T* out = dx + row * d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[j] = inv * weight[j] * g[j] - coeff * xr[j];
}

// Pass 1 of dweight: partial[chunk, j] = Σ_{rows n of the chunk} dy[n, j] x[n, j] rstd[n].
template <class T>
__global__ void rmsnorm_dweight_partial_kernel(const T* x, const T* rstd, const T* dy, T* partial, int64_t rows,
                                               int64_t d, int64_t rows_per_chunk) {
  __shared__ T lanes[kRowLanes][kTileColumns + 1];
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTileColumns + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * rows_per_chunk;
  const int64_t end = min(rows, begin + rows_per_chunk);
  T acc = 0;
  if (col < d) {
    for (int64_t r = begin + threadIdx.y; r < end; r += kRowLanes) acc += dy[r * d + col] * x[r * d + col] * rstd[r];
  }
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || col >= d) return;
  T sum = 0;
  for (int lane = 0; lane < kRowLanes; ++lane) sum += lanes[lane][threadIdx.x];
  partial[chunk * d + col] = sum;
}

// Pass 2 of dweight: dweight[j] += Σ_chunks partial[chunk, j], chunks in order.
template <class T>
__global__ void rmsnorm_dweight_finish_kernel(const T* partial, T* dweight, int64_t chunks, int64_t d) {
  DSX_GRID_STRIDE_LOOP(j, d) {
    T sum = 0;
    for (int64_t c = 0; c < chunks; ++c) sum += partial[c * d + j];
    dweight[j] += sum;
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

using ops::checks::Named;
using Dims = ops::checks::RmsnormDims;

// The CPU op's checks with every tensor on the GPU.
Dims check_rmsnorm(std::string_view op, const Tensor& x, const Tensor& rstd, std::initializer_list<Named> same) {
  return ops::checks::rmsnorm(op, Device::cuda, x, rstd, same);
}

// Grid of one block per row; rows is below 2^31 (gridDim.x's limit) for any tensor that fits.
unsigned row_grid(int64_t rows, std::string_view op) {
  check(rows <= 0x7fffffff, op, [&] { return "at most 2^31 - 1 rows on the GPU, got " + std::to_string(rows); });
  return static_cast<unsigned>(rows);
}

}  // namespace

void rmsnorm_forward(const Tensor& x, const Tensor& weight, double eps, Tensor& y, Tensor& rstd) {
  constexpr std::string_view op = "rmsnorm_forward";
  const Dims dims = check_rmsnorm(op, x, rstd, {{&rstd, "rstd"}, {&weight, "weight"}, {&y, "y"}});
  check_shape(weight, {dims.cols}, op, "weight");
  check_shape(y, x.shape(), op, "y");
  check(std::isfinite(eps) && eps >= 0, op, [&] { return "eps must be finite and >= 0, got " + std::to_string(eps); });
  dispatch_float(x.dtype(), op, [&]<class T>() {
    if (dims.rows == 0) return;
    // D = 0 gives rstd = 1/sqrt(0/0 + eps) = NaN, as on the CPU.
    rmsnorm_forward_kernel<T><<<row_grid(dims.rows, op), rows::threads_for_row(dims.cols), 0, current_stream()>>>(
        x.data<T>(), weight.data<T>(), y.data<T>(), rstd.data<T>(), dims.cols, static_cast<T>(eps));
    DSX_CUDA_CHECK_LAUNCH("rmsnorm_forward_kernel");
  });
}

void rmsnorm_backward_input(const Tensor& x, const Tensor& weight, const Tensor& rstd, const Tensor& dy, Tensor& dx) {
  constexpr std::string_view op = "rmsnorm_backward_input";
  const Dims dims = check_rmsnorm(op, x, rstd, {{&rstd, "rstd"}, {&weight, "weight"}, {&dy, "dy"}, {&dx, "dx"}});
  check_shape(weight, {dims.cols}, op, "weight");
  check_shape(dy, x.shape(), op, "dy");
  check_shape(dx, x.shape(), op, "dx");
  dispatch_float(x.dtype(), op, [&]<class T>() {
    if (dims.rows == 0) return;
    rmsnorm_backward_input_kernel<T>
        <<<row_grid(dims.rows, op), rows::threads_for_row(dims.cols), 0, current_stream()>>>(
            x.data<T>(), weight.data<T>(), rstd.data<T>(), dy.data<T>(), dx.data<T>(), dims.cols);
    DSX_CUDA_CHECK_LAUNCH("rmsnorm_backward_input_kernel");
  });
}

void rmsnorm_backward_weight(const Tensor& x, const Tensor& rstd, const Tensor& dy, Tensor& dweight) {
  constexpr std::string_view op = "rmsnorm_backward_weight";
  const Dims dims = check_rmsnorm(op, x, rstd, {{&rstd, "rstd"}, {&dy, "dy"}, {&dweight, "dweight"}});
  check_shape(dy, x.shape(), op, "dy");
  check_shape(dweight, {dims.cols}, op, "dweight");
  dispatch_float(x.dtype(), op, [&]<class T>() {
    if (dims.rows == 0 || dims.cols == 0) return;
    // gridDim.y is at most 65535: beyond 65535 chunks of 256 rows, chunks grow instead.
    const int64_t rows_per_chunk = std::max(kRowsPerChunk, (dims.rows + 65534) / 65535);
    const int64_t chunks = (dims.rows + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t tiles = (dims.cols + kTileColumns - 1) / kTileColumns;
    check(tiles <= 0x7fffffff, op, [&] { return "x " + x.describe() + " has too many columns for the GPU"; });
    Tensor partial = Tensor::empty({chunks, dims.cols}, x.dtype(), Device::cuda);
    const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(chunks));
    const dim3 block(kTileColumns, kRowLanes);
    rmsnorm_dweight_partial_kernel<T><<<grid, block, 0, current_stream()>>>(
        x.data<T>(), rstd.data<T>(), dy.data<T>(), partial.data<T>(), dims.rows, dims.cols, rows_per_chunk);
    DSX_CUDA_CHECK_LAUNCH("rmsnorm_dweight_partial_kernel");
    rmsnorm_dweight_finish_kernel<T>
        <<<grid_for(dims.cols), kBlock, 0, current_stream()>>>(partial.data<T>(), dweight.data<T>(), chunks, dims.cols);
    DSX_CUDA_CHECK_LAUNCH("rmsnorm_dweight_finish_kernel");
  });
}

}  // namespace dsx::cuda
