// FP8 E4M3 quantization on the GPU (kernels/ops/fp8.h, docs/FP8.md): 1×128 tiles, 128×128
// blocks, transposed 1×128 tiles, dequantization and the block transpose of a quantized weight.
//
// dtypes: x f32 or bf16 (quantize), f32 (dequantize output); data fp8_e4m3, scales f32.
// Every scalar step (amax, scale, code) is a function of kernels/fp8_quant_rules.h, the CPU's;
// amax_combine is commutative and associative, so the tree reductions below give the CPU's amax,
// and the results equal the CPU's bit for bit (data and scales).
//
// Thread mapping:
//  - tile_1x128: one warp per tile (lane l holds elements l, l+32, l+64, l+96: coalesced),
//    amax by warp shuffles, grid-stride over the rows × tiles.
//  - block_128x128: one 256-thread block per 128×128 block: a pass for the amax (block
//    reduction), a second pass for the codes (re-read, from L2).
//  - transposed: one 256-thread block per (128-row band, 32 columns): the 128×32 piece of x in
//    shared memory (loaded along rows: coalesced), one warp per column for its amax, then the
//    codes written along qt's rows (the band's 128 consecutive bytes per column).
//  - dequantize: one element per thread, grid-stride.
//  - transpose_blocks: 32×32 byte tiles through shared memory; the scale grid by one thread
//    per scale.
#include <string>

#include "kernels/cuda/device_checks.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_fp8.h"
#include "kernels/fp8_quant_rules.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {
namespace {

using fp8::kTile;
using fp8::tile_count;

constexpr int kQuantBlock = 256;
constexpr int kBandColumns = 32;  // columns of x per block of the transposed quantization
constexpr int kTransposeTile = 32;

// ============================================================================================
// kernels
// ============================================================================================

__device__ __forceinline__ float warp_amax(float amax) {
  for (int offset = 16; offset > 0; offset /= 2)
    amax = fp8::amax_combine(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  return amax;
}

template <class T>
__global__ void quantize_tiles_kernel(const T* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                                      bool power_of_two) {
  const int lane = threadIdx.x % 32;
  const int64_t tiles = tile_count(cols);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; w < rows * tiles;
       w += warps) {
    const int64_t r = w / tiles, t = w % tiles;
    const int64_t n = fp8::tile_extent(cols, t);
    const int64_t offset = r * cols + t * kTile;
    float v[kTile / 32];
    float amax = 0.0f;
#pragma unroll
    for (int j = 0; j < kTile / 32; ++j) {
      const int c = lane + 32 * j;
      v[j] = c < n ? load(x[offset + c]) : 0.0f;
      if (c < n) amax = fp8::amax_combine(amax, v[j]);
    }
    const fp8::TileScale s = fp8::scale_from_amax(warp_amax(amax), power_of_two);
#pragma unroll
    for (int j = 0; j < kTile / 32; ++j) {
      const int c = lane + 32 * j;
      if (c < n) q[offset + c] = fp8::quantize_element(v[j], s);
    }
    if (lane == 0) scales[r * tiles + t] = s.scale;
  }
}

template <class T>
__global__ void quantize_blocks_kernel(const T* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                                       bool power_of_two) {
  __shared__ float warp_amaxes[kQuantBlock / 32];
  const int64_t block_cols = tile_count(cols);
  const int64_t br = blockIdx.x / block_cols, bc = blockIdx.x % block_cols;
  const int64_t r0 = br * kTile, c0 = bc * kTile;
  const int64_t nr = fp8::tile_extent(rows, br), nc = fp8::tile_extent(cols, bc);
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < nr * kTile; i += blockDim.x) {
    const int64_t r = i / kTile, c = i % kTile;
    if (c < nc) amax = fp8::amax_combine(amax, load(x[(r0 + r) * cols + c0 + c]));
  }
  amax = warp_amax(amax);
  if (threadIdx.x % 32 == 0) warp_amaxes[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = 0.0f;
  for (int w = 0; w < kQuantBlock / 32; ++w) amax = fp8::amax_combine(amax, warp_amaxes[w]);
  const fp8::TileScale s = fp8::scale_from_amax(amax, power_of_two);
  for (int64_t i = threadIdx.x; i < nr * kTile; i += blockDim.x) {
    const int64_t r = i / kTile, c = i % kTile;
    if (c < nc) {
      const int64_t at = (r0 + r) * cols + c0 + c;
      q[at] = fp8::quantize_element(load(x[at]), s);
    }
  }
  if (threadIdx.x == 0) scales[blockIdx.x] = s.scale;  // blockIdx.x = br · block_cols + bc
}

// Block (band, column chunk): x rows [128·band, +128) × columns [32·chunk, +32) -> qt rows
// (those columns), 1×128 tile `band` of each.
template <class T>
__global__ void quantize_transposed_kernel(const T* x, int64_t rows, int64_t cols, uint8_t* qt, float* scales,
                                           bool power_of_two) {
  __shared__ float piece[kTile][kBandColumns + 1];  // +1: column reads hit distinct banks
  __shared__ fp8::TileScale column_scale[kBandColumns];
  const int64_t bands = tile_count(rows);
  const int64_t band = blockIdx.x;
  const int64_t r0 = band * kTile, c0 = static_cast<int64_t>(blockIdx.y) * kBandColumns;
  const int64_t nr = fp8::tile_extent(rows, band);
  const int64_t nc = cols - c0 < kBandColumns ? cols - c0 : kBandColumns;
  for (int i = threadIdx.x; i < kTile * kBandColumns; i += blockDim.x) {
    const int r = i / kBandColumns, c = i % kBandColumns;
    if (r < nr && c < nc) piece[r][c] = load(x[(r0 + r) * cols + c0 + c]);
  }
  __syncthreads();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int c = warp; c < nc; c += blockDim.x / 32) {
    float amax = 0.0f;
    for (int r = lane; r < nr; r += 32) amax = fp8::amax_combine(amax, piece[r][c]);
    const fp8::TileScale s = fp8::scale_from_amax(warp_amax(amax), power_of_two);
    if (lane == 0) {
      column_scale[c] = s;
      scales[(c0 + c) * bands + band] = s.scale;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kBandColumns * kTile; i += blockDim.x) {
    const int c = i / kTile, r = i % kTile;
    if (c < nc && r < nr) qt[(c0 + c) * rows + r0 + r] = fp8::quantize_element(piece[r][c], column_scale[c]);
  }
}

__global__ void dequantize_kernel(const uint8_t* q, const float* scales, float* x, int64_t rows, int64_t cols,
                                  bool tiles) {
  DSX_GRID_STRIDE_LOOP(i, rows * cols) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t s = tiles ? fp8::tile_scale_index(r, c, cols) : fp8::block_scale_index(r, c, cols);
    x[i] = fp8::dequantize_element(q[i], scales[s]);
  }
}

// dst [cols, rows] = src [rows, cols]ᵀ, one 32×32 tile per block of 32×8 threads.
__global__ void transpose_bytes_kernel(const uint8_t* src, uint8_t* dst, int64_t rows, int64_t cols) {
  __shared__ uint8_t tile[kTransposeTile][kTransposeTile + 1];
  const int64_t tiles_x = (cols + kTransposeTile - 1) / kTransposeTile;
  const int64_t r0 = (blockIdx.x / tiles_x) * kTransposeTile, c0 = (blockIdx.x % tiles_x) * kTransposeTile;
  for (int i = threadIdx.y; i < kTransposeTile; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = src[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTransposeTile; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;  // dst row c, column r
    if (r < rows && c < cols) dst[c * rows + r] = tile[threadIdx.x][i];
  }
}

__global__ void transpose_scales_kernel(const float* s, float* st, int64_t block_rows, int64_t block_cols) {
  DSX_GRID_STRIDE_LOOP(i, block_rows * block_cols) {
    const int64_t br = i / block_cols, bc = i % block_cols;
    st[bc * block_rows + br] = s[i];
  }
}

// ============================================================================================
// launchers
// ============================================================================================

void check_fp8_matrix(const Fp8Matrix& q, int64_t rows, int64_t cols, std::string_view op, std::string_view name) {
  ops::checks::fp8_matrix(Device::cuda, q, rows, cols, op, name);
}

void check_source(const Tensor& x, std::string_view op) {
  ops::checks::fp8_source(Device::cuda, x, op);
}

uint8_t* codes_of(const Fp8Matrix& q) {
  return reinterpret_cast<uint8_t*>(q.data.data<fp8_e4m3>());
}

}  // namespace

void fp8_quantize(const Tensor& x, Fp8Matrix& q, const Fp8QuantOptions& options) {
  constexpr std::string_view op = "fp8_quantize";
  check_source(x, op);
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check_fp8_matrix(q, rows, cols, op, "q");
  if (rows == 0 || cols == 0) return;
  const bool pow2 = options.power_of_two_scales;
  ops::checks::dispatch_fp8_source(x, [&]<class T>() {
    if (q.scaling == Fp8Scaling::tile_1x128) {
      const int64_t warps = rows * tile_count(cols);
      quantize_tiles_kernel<T><<<grid_for(warps * 32, kQuantBlock), kQuantBlock, 0, current_stream()>>>(
          x.data<T>(), rows, cols, codes_of(q), q.scales.data<float>(), pow2);
      DSX_CUDA_CHECK_LAUNCH("quantize_tiles_kernel");
    } else {
      const int64_t blocks = tile_count(rows) * tile_count(cols);
      check(blocks <= 0x7fffffff, op, "too many 128x128 blocks for one launch");
      quantize_blocks_kernel<T><<<static_cast<unsigned>(blocks), kQuantBlock, 0, current_stream()>>>(
          x.data<T>(), rows, cols, codes_of(q), q.scales.data<float>(), pow2);
      DSX_CUDA_CHECK_LAUNCH("quantize_blocks_kernel");
    }
  });
}

void fp8_quantize_transposed(const Tensor& x, Fp8Matrix& qt, const Fp8QuantOptions& options) {
  constexpr std::string_view op = "fp8_quantize_transposed";
  check_source(x, op);
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check(qt.scaling == Fp8Scaling::tile_1x128, op,
        [&] { return std::string("qt must use tile_1x128 scaling, got ") + ops::checks::scaling_name(qt.scaling); });
  check_fp8_matrix(qt, cols, rows, op, "qt");
  if (rows == 0 || cols == 0) return;
  const int64_t chunks = (cols + kBandColumns - 1) / kBandColumns;
  check(chunks <= 65535 && tile_count(rows) <= 0x7fffffff, op,
        [&] { return "x " + x.describe() + " is too large for one launch"; });
  const dim3 grid(static_cast<unsigned>(tile_count(rows)), static_cast<unsigned>(chunks));
  ops::checks::dispatch_fp8_source(x, [&]<class T>() {
    quantize_transposed_kernel<T><<<grid, kQuantBlock, 0, current_stream()>>>(
        x.data<T>(), rows, cols, codes_of(qt), qt.scales.data<float>(), options.power_of_two_scales);
    DSX_CUDA_CHECK_LAUNCH("quantize_transposed_kernel");
  });
}

void fp8_dequantize(const Fp8Matrix& q, Tensor& x) {
  constexpr std::string_view op = "fp8_dequantize";
  check_on_gpu(q.data, op, "q.data");
  check(q.data.ndim() == 2, op, [&] { return "q.data must be 2-D, got " + q.data.describe(); });
  const int64_t rows = q.data.dim(0), cols = q.data.dim(1);
  check_fp8_matrix(q, rows, cols, op, "q");
  check_on_gpu(x, op, "x");
  check(x.dtype() == DType::f32, op, [&] { return "x must be f32, got " + x.describe(); });
  check_shape(x, {rows, cols}, op, "x");
  if (rows == 0 || cols == 0) return;
  dequantize_kernel<<<grid_for(rows * cols), kBlock, 0, current_stream()>>>(
      codes_of(q), q.scales.data<float>(), x.data<float>(), rows, cols, q.scaling == Fp8Scaling::tile_1x128);
  DSX_CUDA_CHECK_LAUNCH("dequantize_kernel");
}

Fp8Matrix fp8_transpose_blocks(const Fp8Matrix& w) {
  constexpr std::string_view op = "fp8_transpose_blocks";
  check(w.scaling == Fp8Scaling::block_128x128, op,
        [&] { return std::string("w must use block_128x128 scaling, got ") + ops::checks::scaling_name(w.scaling); });
  check_on_gpu(w.data, op, "w.data");
  check(w.data.ndim() == 2, op, [&] { return "w.data must be 2-D, got " + w.data.describe(); });
  const int64_t rows = w.data.dim(0), cols = w.data.dim(1);
  check_fp8_matrix(w, rows, cols, op, "w");
  Fp8Matrix wt = Fp8Matrix::empty(cols, rows, Fp8Scaling::block_128x128, Device::cuda);
  if (rows == 0 || cols == 0) return wt;
  const int64_t tiles = ((rows + kTransposeTile - 1) / kTransposeTile) * ((cols + kTransposeTile - 1) / kTransposeTile);
  check(tiles <= 0x7fffffff, op, "too many tiles for one launch");
  transpose_bytes_kernel<<<static_cast<unsigned>(tiles), dim3(kTransposeTile, 8), 0, current_stream()>>>(
      codes_of(w), codes_of(wt), rows, cols);
  DSX_CUDA_CHECK_LAUNCH("transpose_bytes_kernel");
  const int64_t block_rows = tile_count(rows), block_cols = tile_count(cols);
  transpose_scales_kernel<<<grid_for(block_rows * block_cols), kBlock, 0, current_stream()>>>(
      w.scales.data<float>(), wt.scales.data<float>(), block_rows, block_cols);
  DSX_CUDA_CHECK_LAUNCH("transpose_scales_kernel");
  return wt;
}

}  // namespace dsx::cuda
