// dsx's own causal flash-attention backward (the FlashAttention-2 scheme): f32 or bf16 inputs
// (f32 arithmetic), head dims up to 256, optional segment ids. Probabilities are recomputed from
// the saved lse: P = exp(scale·q·k − lse).
//
// Three kernels, no atomics:
// 1. delta_kernel: delta_i = Σ_c dO_ic·O_ic (f32 [B, H, S]); one warp per row.
// 2. dkdv_kernel: one block per (tile of 32 keys, head, batch) owns those keys' dK and dV rows
//    in registers and walks the query tiles of 32 that can see them (from the key tile on:
//    causality). Per query tile: S = Q·Kᵀ and dP = dO·Vᵀ (thread (ty, tx): queries ty·2, ty·2+1 ×
//    keys tx, tx+16), P and dS = P ∘ (dP − delta) written transposed to shared memory, then
//    dV += Pᵀ·dO and dK += dSᵀ·Q (thread: keys ty·2, ty·2+1 × columns tx·4 + 64t + e).
// 3. dq_kernel: one block per (tile of 32 queries, head, batch) walks the key tiles up to its
//    diagonal, recomputing S, P, dP and dS the same way, and accumulates dQ += dS·K in registers.
// The second pass recomputes two of the five products rather than adding dQ with atomics; it
// keeps the result deterministic and every output written exactly once (no zeroing pass).
#include <cmath>

#include "kernels/cuda/attention_own.h"
#include "kernels/cuda/attention_tiles.cuh"

namespace dsx::cuda::attn {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

constexpr int kRowsPerThread = 2;
constexpr int kTile = 16 * kRowsPerThread;  // 32 queries (both kernels) and 32 keys
static_assert(kTile == kKeyTile, "query and key tiles of the backward have one size");

// delta[b, h, i] = Σ_c dout[b, i, h, c] · out[b, i, h, c]; rows in [B, S, H] order, one warp each.
template <class T>
__global__ void delta_kernel(const T* __restrict__ out, const T* __restrict__ dout, Geometry g,
                             float* __restrict__ delta) {
  const int64_t rows = g.batch * g.seq * g.heads;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32; r < rows; r += warps) {
    const T* o = out + r * g.dv;
    const T* d = dout + r * g.dv;
    float sum = 0.f;
    for (int c = lane; c < g.dv; c += 32) sum += load(o[c]) * load(d[c]);
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
      const int64_t h = r % g.heads, bs = r / g.heads;  // bs = b·S + i
      const int64_t b = bs / g.seq, i = bs % g.seq;
      delta[(b * g.heads + h) * g.seq + i] = sum;
    }
  }
}

// Probability and score gradient of query row `row`, key `col` (both absolute positions):
// P = 2^(s·scale_log2 − lse2) where visible, else 0 (lse2 = lse·log2 e); dS = P·(dP − delta).
struct ProbGrad {
  float p, ds;
};
__device__ __forceinline__ ProbGrad prob_grad(float s, float dp, float scale_log2, float lse2, float delta,
                                              bool visible) {
  const float p = visible ? exp2f(s * scale_log2 - lse2) : 0.f;
  return {p, p * (dp - delta)};
}

size_t dkdv_smem_floats(int dqk, int dv) {
  // ks, vs (this block's keys), qs, dos (the current query tile), Pᵀ and dSᵀ, the query tile's
  // lse2, delta, and segment ids (int64 = 2 floats).
  return static_cast<size_t>(2 * kTile) * (tile_ld(dqk) + tile_ld(dv)) + static_cast<size_t>(2 * kTile) * kProbLd +
         4 * kTile;
}

template <class T, int CTQK, int CTV>
__global__ void __launch_bounds__(kThreads, 2)
    dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
                const float* __restrict__ lse, const float* __restrict__ delta, const int64_t* __restrict__ segments,
                Geometry g, float scale, T* __restrict__ dk, T* __restrict__ dv) {
  constexpr int RM = kRowsPerThread;
  extern __shared__ float4 smem4[];
  const int ldq = tile_ld(g.dqk), ldv = tile_ld(g.dv);
  float* ks = reinterpret_cast<float*>(smem4);
  float* vs = ks + kTile * ldq;
  float* qs = vs + kTile * ldv;
  float* dos = qs + kTile * ldq;
  float* pt = dos + kTile * ldv;  // [key][query]
  float* dst = pt + kTile * kProbLd;
  float* lse2_s = dst + kTile * kProbLd;
  float* delta_s = lse2_s + kTile;
  int64_t* query_segments = reinterpret_cast<int64_t*>(delta_s + kTile);

  const int tid = static_cast<int>(threadIdx.x), ty = tid / 16, tx = tid % 16;
  const int64_t key_tile = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t k0 = key_tile * kTile;
  const float scale_log2 = scale * kLog2e;
  load_tile(k, g, b, h, k0, kTile, g.dqk, ks);
  load_tile(v, g, b, h, k0, kTile, g.dv, vs);
  int64_t key_segment[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int64_t col = k0 + tx + 16 * j;
    key_segment[j] = segments != nullptr && col < g.seq ? segments[b * g.seq + col] : 0;
  }

  float dk_acc[RM][CTQK][4] = {}, dv_acc[RM][CTV][4] = {};
  const int dqk4 = (g.dqk + 3) / 4 * 4, dv4 = (g.dv + 3) / 4 * 4;
  const float* lse_bh = lse + (b * g.heads + h) * g.seq;
  const float* delta_bh = delta + (b * g.heads + h) * g.seq;
  for (int64_t q0 = k0; q0 < g.seq; q0 += kTile) {  // queries before k0 cannot see these keys
    __syncthreads();                                // the previous query tile is no longer read
    load_tile(q, g, b, h, q0, kTile, g.dqk, qs);
    load_tile(dout, g, b, h, q0, kTile, g.dv, dos);
    if (tid < kTile) {
      const int64_t row = q0 + tid;
      const bool valid = row < g.seq;
      // A row past the end gets lse = +inf, so its probabilities are 0.
      lse2_s[tid] = valid ? lse_bh[row] * kLog2e : INFINITY;
      delta_s[tid] = valid ? delta_bh[row] : 0.f;
      if (segments != nullptr) query_segments[tid] = valid ? segments[b * g.seq + row] : -1;
    }
    __syncthreads();

    float s[RM][2] = {}, dp[RM][2] = {};
    gemm_nt<RM>(qs, ldq, ks, ldq, dqk4, ty, tx, s);
    gemm_nt<RM>(dos, ldv, vs, ldv, dv4, ty, tx, dp);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int r = ty * RM + i;
      const int64_t row = q0 + r;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tx + 16 * j;
        const bool visible =
            k0 + c <= row && row < g.seq && (segments == nullptr || query_segments[r] == key_segment[j]);
        const ProbGrad pg = prob_grad(s[i][j], dp[i][j], scale_log2, lse2_s[r], delta_s[r], visible);
        pt[c * kProbLd + r] = pg.p;
        dst[c * kProbLd + r] = pg.ds;
      }
    }
    __syncthreads();
    gemm_nn<RM, CTV>(pt, kProbLd, dos, ldv, kTile, ty, tx, dv_acc);   // dV += Pᵀ·dO
    gemm_nn<RM, CTQK>(dst, kProbLd, qs, ldq, kTile, ty, tx, dk_acc);  // dK += dSᵀ·Q
  }
  const float one[RM] = {1.f, 1.f}, scales[RM] = {scale, scale};
  store_rows<T, RM, CTV>(dv, g, b, h, k0, g.dv, ty, tx, dv_acc, one);
  store_rows<T, RM, CTQK>(dk, g, b, h, k0, g.dqk, ty, tx, dk_acc, scales);
}

size_t dq_smem_floats(int dqk, int dv) {
  // qs, dos (this block's queries), ks, vs (the current key tile), dS, key segment ids.
  return static_cast<size_t>(2 * kTile) * (tile_ld(dqk) + tile_ld(dv)) + static_cast<size_t>(kTile) * kProbLd +
         2 * kTile;
}

template <class T, int CTQK>
__global__ void __launch_bounds__(kThreads, 2)
    dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
              const float* __restrict__ lse, const float* __restrict__ delta, const int64_t* __restrict__ segments,
              Geometry g, float scale, T* __restrict__ dq) {
  constexpr int RM = kRowsPerThread;
  extern __shared__ float4 smem4[];
  const int ldq = tile_ld(g.dqk), ldv = tile_ld(g.dv);
  float* qs = reinterpret_cast<float*>(smem4);
  float* dos = qs + kTile * ldq;
  float* ks = dos + kTile * ldv;
  float* vs = ks + kTile * ldq;
  float* dss = vs + kTile * ldv;  // [query][key]
  int64_t* key_segments = reinterpret_cast<int64_t*>(dss + kTile * kProbLd);

  const int tid = static_cast<int>(threadIdx.x), ty = tid / 16, tx = tid % 16;
  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kTile;  // longest rows first
  const int64_t h = blockIdx.y, b = blockIdx.z;
  const float scale_log2 = scale * kLog2e;
  load_tile(q, g, b, h, q0, kTile, g.dqk, qs);
  load_tile(dout, g, b, h, q0, kTile, g.dv, dos);
  float lse2[RM], row_delta[RM];
  int64_t row_segment[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = q0 + ty * RM + i;
    const bool valid = row < g.seq;
    lse2[i] = valid ? lse[(b * g.heads + h) * g.seq + row] * kLog2e : INFINITY;
    row_delta[i] = valid ? delta[(b * g.heads + h) * g.seq + row] : 0.f;
    row_segment[i] = segments != nullptr && valid ? segments[b * g.seq + row] : 0;
  }

  float dq_acc[RM][CTQK][4] = {};
  const int dqk4 = (g.dqk + 3) / 4 * 4, dv4 = (g.dv + 3) / 4 * 4;
  const int64_t last_row = min(g.seq, q0 + kTile) - 1;
  for (int64_t k0 = 0; k0 <= last_row; k0 += kTile) {
    __syncthreads();  // the previous key tile and dS are no longer read
    load_tile(k, g, b, h, k0, kTile, g.dqk, ks);
    load_tile(v, g, b, h, k0, kTile, g.dv, vs);
    if (segments != nullptr && tid < kTile) {
      key_segments[tid] = k0 + tid < g.seq ? segments[b * g.seq + k0 + tid] : -1;
    }
    __syncthreads();

    float s[RM][2] = {}, dp[RM][2] = {};
    gemm_nt<RM>(qs, ldq, ks, ldq, dqk4, ty, tx, s);
    gemm_nt<RM>(dos, ldv, vs, ldv, dv4, ty, tx, dp);
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int r = ty * RM + i;
      const int64_t row = q0 + r;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tx + 16 * j;
        const bool visible = k0 + c <= row && row < g.seq && (segments == nullptr || key_segments[c] == row_segment[i]);
        dss[r * kProbLd + c] = prob_grad(s[i][j], dp[i][j], scale_log2, lse2[i], row_delta[i], visible).ds;
      }
    }
    __syncthreads();
    gemm_nn<RM, CTQK>(dss, kProbLd, ks, ldq, kTile, ty, tx, dq_acc);  // dQ += dS·K
  }
  const float scales[RM] = {scale, scale};
  store_rows<T, RM, CTQK>(dq, g, b, h, q0, g.dqk, ty, tx, dq_acc, scales);
}

// ---------------------------------------------------------------------------------------------
// launchers

template <class Kernel>
void allow_smem(Kernel kernel, size_t bytes) {
  DSX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <class T, int CTQK, int CTV>
void launch_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                     const Tensor& dout, float scale, const int64_t* segments, const Geometry& g, Tensor& dq,
                     Tensor& dk, Tensor& dv) {
  const cudaStream_t stream = current_stream();
  Tensor delta = Tensor::empty({g.batch, g.heads, g.seq}, DType::f32, Device::cuda);
  const int64_t rows = g.batch * g.seq * g.heads;
  delta_kernel<T><<<grid_for(rows * 32), kBlock, 0, stream>>>(out.data<T>(), dout.data<T>(), g, delta.data<float>());
  DSX_CUDA_CHECK_LAUNCH("attention delta_kernel");

  const unsigned tiles = static_cast<unsigned>((g.seq + kTile - 1) / kTile);
  const dim3 grid(tiles, static_cast<unsigned>(g.heads), static_cast<unsigned>(g.batch));
  const size_t dkdv_smem = dkdv_smem_floats(g.dqk, g.dv) * sizeof(float);
  allow_smem(dkdv_kernel<T, CTQK, CTV>, dkdv_smem);
  dkdv_kernel<T, CTQK, CTV>
      <<<grid, kThreads, dkdv_smem, stream>>>(q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(), lse.data<float>(),
                                              delta.data<float>(), segments, g, scale, dk.data<T>(), dv.data<T>());
  DSX_CUDA_CHECK_LAUNCH("attention dkdv_kernel");

  const size_t dq_smem = dq_smem_floats(g.dqk, g.dv) * sizeof(float);
  allow_smem(dq_kernel<T, CTQK>, dq_smem);
  dq_kernel<T, CTQK><<<grid, kThreads, dq_smem, stream>>>(q.data<T>(), k.data<T>(), v.data<T>(), dout.data<T>(),
                                                          lse.data<float>(), delta.data<float>(), segments, g, scale,
                                                          dq.data<T>());
  DSX_CUDA_CHECK_LAUNCH("attention dq_kernel");
}

}  // namespace

void own_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                  const Tensor& dout, double scale, const Tensor& segment_ids, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Geometry g{q.dim(0), q.dim(1), q.dim(2), static_cast<int>(q.dim(3)), static_cast<int>(v.dim(3))};
  const int64_t* segments = segment_ids.defined() ? segment_ids.data<int64_t>() : nullptr;
  const float s = static_cast<float>(scale);
  with_col_tiles(g.dqk, [&]<int CTQK>() {
    with_col_tiles(g.dv, [&]<int CTV>() {
      if (q.dtype() == DType::bf16) {
        launch_backward<bf16, CTQK, CTV>(q, k, v, out, lse, dout, s, segments, g, dq, dk, dv);
      } else {
        launch_backward<float, CTQK, CTV>(q, k, v, out, lse, dout, s, segments, g, dq, dk, dv);
      }
    });
  });
}

}  // namespace dsx::cuda::attn
