// Shared-memory tiles and register micro-GEMMs of dsx's own flash-attention kernels
// (attention_forward.cu, attention_backward.cu). f32 arithmetic on CUDA cores, no tensor cores.
//
// Thread mapping, common to every kernel: a block has 256 threads seen as a 16 × 16 grid,
// ty = tid / 16 (row group) and tx = tid % 16 (column group). Lanes 0-15 of a warp share one
// ty and lanes 16-31 the next, so the 16 threads that hold one row are half a warp and row
// reductions are four __shfl_xor_sync steps (8, 4, 2, 1).
// - Score tiles S[rows][32 keys] ("NT" product: both operands are row tiles, dot over d):
//   thread (ty, tx) holds rows ty·RM + i (i < RM) and key columns tx and tx + 16.
// - Row-times-matrix products C[rows][width] += A[rows][k] · B[k][width] ("NN": P·V, dS·K,
//   Pᵀ·dO, dSᵀ·Q): thread (ty, tx) holds rows ty·RM + i and columns tx·4 + 64·t + e (t < CT,
//   e < 4), CT = ceil(width / 64), so a warp's 16 threads read 64 consecutive floats of B.
//
// Tiles hold f32 whatever the input dtype (converted once when loaded). Each tile row has
// col_tiles(d)·64 columns (zero beyond d, so products may run over whole float4 groups and
// 64-column tiles) plus 4 floats of padding: a row stride ≡ 4 (mod 32) banks makes the NT reads
// of rows tx and tx + 1 (float4 each) fall in different banks.
#pragma once
#include <cstdint>

#include "kernels/cuda/elements.cuh"

namespace dsx::cuda::attn {

constexpr int kThreads = 256;
constexpr int kKeyTile = 32;      // keys per tile: columns tx and tx + 16
constexpr int kPad = 4;           // floats of padding per tile row
constexpr int kMaxHeadDim = 256;  // 4 column tiles of 64
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ constexpr int col_tiles(int d) {
  return (d + 63) / 64;
}
// Floats per shared-memory row of a tile of head dim d.
__host__ __device__ constexpr int tile_ld(int d) {
  return col_tiles(d) * 64 + kPad;
}
// Floats per row of a probability tile [rows][kKeyTile] (or its transpose, [keys][32 rows]).
constexpr int kProbLd = kKeyTile + kPad;

// The problem: [B, S, H, D] tensors, head dims dqk (q, k) and dv (v, out).
struct Geometry {
  int64_t batch, seq, heads;
  int dqk, dv;
};

// Row `row` of head h of batch b in a [B, S, H, width] tensor.
template <class T>
__device__ __forceinline__ const T* head_row(const T* base, const Geometry& g, int64_t b, int64_t h, int64_t row,
                                             int width) {
  return base + ((b * g.seq + row) * g.heads + h) * width;
}

// Loads rows [first_row, first_row + rows) of head (b, h) of a [B, S, H, d] tensor into a tile
// [rows][tile_ld(d)] as f32: rows past the sequence end and columns past d are zero.
// Consecutive threads take consecutive columns, so each row is read coalesced.
template <class T>
__device__ void load_tile(const T* __restrict__ src, const Geometry& g, int64_t b, int64_t h, int64_t first_row,
                          int rows, int d, float* __restrict__ tile) {
  const int width = col_tiles(d) * 64, ld = tile_ld(d);
  const int64_t row_stride = g.heads * d;
  const T* head = src + (b * g.seq * g.heads + h) * d;
  for (int idx = threadIdx.x; idx < rows * width; idx += kThreads) {
    const int r = idx / width, c = idx - r * width;
    const int64_t row = first_row + r;
    float x = 0.f;
    if (c < d && row < g.seq) x = load(head[row * row_stride + c]);
    tile[r * ld + c] = x;
  }
}

// acc[i][j] += Σ_c A[ty·RM + i][c] · B[tx + 16j][c] over c < d4 (a multiple of 4 covering d;
// columns past d are zero in both tiles). A and B have row stride ld_a, ld_b.
template <int RM>
__device__ __forceinline__ void gemm_nt(const float* __restrict__ a, int ld_a, const float* __restrict__ b, int ld_b,
                                        int d4, int ty, int tx, float (&acc)[RM][2]) {
#pragma unroll 2
  for (int c = 0; c < d4; c += 4) {
    float4 av[RM], bv[2];
#pragma unroll
    for (int i = 0; i < RM; ++i) av[i] = *reinterpret_cast<const float4*>(a + (ty * RM + i) * ld_a + c);
#pragma unroll
    for (int j = 0; j < 2; ++j) bv[j] = *reinterpret_cast<const float4*>(b + (tx + 16 * j) * ld_b + c);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        acc[i][j] = fmaf(av[i].x, bv[j].x, acc[i][j]);
        acc[i][j] = fmaf(av[i].y, bv[j].y, acc[i][j]);
        acc[i][j] = fmaf(av[i].z, bv[j].z, acc[i][j]);
        acc[i][j] = fmaf(av[i].w, bv[j].w, acc[i][j]);
      }
    }
  }
}

__device__ __forceinline__ float component(const float4& v, int e) {
  return e == 0 ? v.x : e == 1 ? v.y : e == 2 ? v.z : v.w;
}

// acc[i][t][e] += Σ_k A[ty·RM + i][k] · B[k][tx·4 + 64t + e] over k < kdim (a multiple of 4).
template <int RM, int CT>
__device__ __forceinline__ void gemm_nn(const float* __restrict__ a, int ld_a, const float* __restrict__ b, int ld_b,
                                        int kdim, int ty, int tx, float (&acc)[RM][CT][4]) {
  for (int k = 0; k < kdim; k += 4) {
    float4 av[RM];
#pragma unroll
    for (int i = 0; i < RM; ++i) av[i] = *reinterpret_cast<const float4*>(a + (ty * RM + i) * ld_a + k);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      float4 bv[CT];
#pragma unroll
      for (int t = 0; t < CT; ++t) bv[t] = *reinterpret_cast<const float4*>(b + (k + kk) * ld_b + tx * 4 + 64 * t);
#pragma unroll
      for (int i = 0; i < RM; ++i) {
        const float x = component(av[i], kk);
#pragma unroll
        for (int t = 0; t < CT; ++t) {
          acc[i][t][0] = fmaf(x, bv[t].x, acc[i][t][0]);
          acc[i][t][1] = fmaf(x, bv[t].y, acc[i][t][1]);
          acc[i][t][2] = fmaf(x, bv[t].z, acc[i][t][2]);
          acc[i][t][3] = fmaf(x, bv[t].w, acc[i][t][3]);
        }
      }
    }
  }
}

// Writes rows of an NN accumulator (times `factor`) to head (b, h) of a [B, S, H, d] tensor:
// row ty·RM + i of the tile is sequence position first_row + ty·RM + i; rows past the sequence
// end and columns past d are dropped.
template <class T, int RM, int CT>
__device__ __forceinline__ void store_rows(T* __restrict__ dst, const Geometry& g, int64_t b, int64_t h,
                                           int64_t first_row, int d, int ty, int tx, const float (&acc)[RM][CT][4],
                                           const float (&factor)[RM]) {
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = first_row + ty * RM + i;
    if (row >= g.seq) continue;
    T* out = dst + ((b * g.seq + row) * g.heads + h) * d;
#pragma unroll
    for (int t = 0; t < CT; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int c = tx * 4 + 64 * t + e;
        if (c < d) out[c] = store<T>(acc[i][t][e] * factor[i]);
      }
    }
  }
}

// Sum / max over the 16 threads of a row (lanes differing in bits 0-3).
__device__ __forceinline__ float row_sum16(float x) {
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}
__device__ __forceinline__ float row_max16(float x) {
#pragma unroll
  for (int offset = 8; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

// Calls f.template operator()<CT>() with CT = col_tiles(d) as a compile-time constant (d ≤ 256).
template <class F>
void with_col_tiles(int d, F&& f) {
  switch (col_tiles(d)) {
    case 1:
      f.template operator()<1>();
      break;
    case 2:
      f.template operator()<2>();
      break;
    case 3:
      f.template operator()<3>();
      break;
    default:
      f.template operator()<4>();
      break;
  }
}

}  // namespace dsx::cuda::attn
