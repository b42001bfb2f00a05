// dsx's own causal flash-attention forward: f32 or bf16 q/k/v (f32 arithmetic), head dims up
// to 256 (Dqk ≠ Dv allowed), optional segment ids.
//
// Work mapping: one block of 256 threads per (tile of 64 query rows, head, batch); the grid's x
// runs over query tiles from the last (the longest rows under causality) to the first, so the
// heavy blocks start first. The query tile stays in shared memory; keys and values stream
// through it in tiles of 32 (only tiles up to the tile's last row: causality). Per key tile,
// thread (ty, tx) computes scores of rows ty·4..ty·4+3 against keys tx and tx + 16
// (attention_tiles.cuh), keeps the online-softmax state of its 4 rows (the running max m in
// log2 units, identical across the row's 16 threads, and its own partial sum l of the
// exponentials), writes the probabilities to shared memory and accumulates O = P·V for its 4
// rows and columns tx·4 + 64t + e. At the end the 16 partial sums of a row are added by
// shuffles, O is divided by the sum and lse = (m + log2 l)·ln 2 is written.
#include <cmath>

#include "kernels/cuda/attention_own.h"
#include "kernels/cuda/attention_tiles.cuh"

namespace dsx::cuda::attn {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

constexpr int kRowsPerThread = 4;
constexpr int kQueryTile = 16 * kRowsPerThread;  // 64

// Shared-memory floats of the forward kernel: query tile, key tile, value tile, probability tile
// and the key tile's segment ids (kKeyTile int64 = 2·kKeyTile floats).
size_t forward_smem_floats(int dqk, int dv) {
  return static_cast<size_t>(kQueryTile + kKeyTile) * tile_ld(dqk) + static_cast<size_t>(kKeyTile) * tile_ld(dv) +
         static_cast<size_t>(kQueryTile) * kProbLd + 2 * kKeyTile;
}

template <class T, int CTV>
__global__ void __launch_bounds__(kThreads, CTV <= 2 ? 2 : 1)
    attention_forward_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                             const int64_t* __restrict__ segments, Geometry g, float scale_log2, T* __restrict__ out,
                             float* __restrict__ lse) {
  constexpr int RM = kRowsPerThread;
  extern __shared__ float4 smem4[];  // float4: 16-byte alignment for the vector reads
  const int ldq = tile_ld(g.dqk), ldv = tile_ld(g.dv);
  float* qs = reinterpret_cast<float*>(smem4);
  float* ks = qs + kQueryTile * ldq;
  float* vs = ks + kKeyTile * ldq;
  float* ps = vs + kKeyTile * ldv;
  int64_t* key_segments = reinterpret_cast<int64_t*>(ps + kQueryTile * kProbLd);

  const int tid = static_cast<int>(threadIdx.x), ty = tid / 16, tx = tid % 16;
  const int64_t q0 = static_cast<int64_t>(gridDim.x - 1 - blockIdx.x) * kQueryTile;
  const int64_t h = blockIdx.y, b = blockIdx.z;

  load_tile(q, g, b, h, q0, kQueryTile, g.dqk, qs);
  int64_t row_segment[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const int64_t row = q0 + ty * RM + i;
    row_segment[i] = segments != nullptr && row < g.seq ? segments[b * g.seq + row] : 0;
  }

  float m[RM], l[RM], o[RM][CTV][4];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
#pragma unroll
    for (int t = 0; t < CTV; ++t) o[i][t][0] = o[i][t][1] = o[i][t][2] = o[i][t][3] = 0.f;
  }

  const int64_t last_row = min(g.seq, q0 + kQueryTile) - 1;
  const int64_t key_tiles = last_row / kKeyTile + 1;
  const int d4 = (g.dqk + 3) / 4 * 4;
  for (int64_t kt = 0; kt < key_tiles; ++kt) {
    const int64_t k0 = kt * kKeyTile;
    __syncthreads();  // the previous tile's ks, vs, ps are no longer read
    load_tile(k, g, b, h, k0, kKeyTile, g.dqk, ks);
    load_tile(v, g, b, h, k0, kKeyTile, g.dv, vs);
    if (segments != nullptr && tid < kKeyTile) {
      key_segments[tid] = k0 + tid < g.seq ? segments[b * g.seq + k0 + tid] : -1;
    }
    __syncthreads();

    float s[RM][2] = {};
    gemm_nt<RM>(qs, ldq, ks, ldq, d4, ty, tx, s);
    // Masking is needed where the tile reaches past the tile's first row (the diagonal) or
    // segments apply; elsewhere every key is visible.
    const bool mask = segments != nullptr || k0 + kKeyTile - 1 > q0;
#pragma unroll
    for (int i = 0; i < RM; ++i) {
      const int64_t row = q0 + ty * RM + i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c = tx + 16 * j;
        const int64_t col = k0 + c;
        float x = s[i][j] * scale_log2;
        if (mask && (col > row || (segments != nullptr && key_segments[c] != row_segment[i]))) x = -INFINITY;
        s[i][j] = x;
      }
      // Online softmax: rescale the running sum and output by 2^(m_old - m_new). A row that has
      // seen only masked keys keeps m = -inf; the shift then uses 0 so no inf - inf appears.
      const float m_new = fmaxf(m[i], row_max16(fmaxf(s[i][0], s[i][1])));
      const float shift = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2f(m[i] - shift);
      m[i] = m_new;
      const float p0 = exp2f(s[i][0] - shift), p1 = exp2f(s[i][1] - shift);
      l[i] = l[i] * alpha + p0 + p1;
#pragma unroll
      for (int t = 0; t < CTV; ++t) {
        o[i][t][0] *= alpha;
        o[i][t][1] *= alpha;
        o[i][t][2] *= alpha;
        o[i][t][3] *= alpha;
      }
      ps[(ty * RM + i) * kProbLd + tx] = p0;
      ps[(ty * RM + i) * kProbLd + tx + 16] = p1;
    }
    __syncthreads();
    gemm_nn<RM, CTV>(ps, kProbLd, vs, ldv, kKeyTile, ty, tx, o);
  }

  float inv_sum[RM];
#pragma unroll
  for (int i = 0; i < RM; ++i) {
    const float sum = row_sum16(l[i]);  // every valid row sees its own key: sum >= 1
    inv_sum[i] = 1.f / sum;
    const int64_t row = q0 + ty * RM + i;
    if (tx == 0 && row < g.seq) lse[(b * g.heads + h) * g.seq + row] = (m[i] + log2f(sum)) * kLn2;
  }
  store_rows<T, RM, CTV>(out, g, b, h, q0, g.dv, ty, tx, o, inv_sum);
}

// ---------------------------------------------------------------------------------------------
// launchers

template <class T, int CTV>
void launch_forward(const Tensor& q, const Tensor& k, const Tensor& v, float scale_log2, const int64_t* segments,
                    const Geometry& g, Tensor& out, Tensor& lse) {
  const size_t smem = forward_smem_floats(g.dqk, g.dv) * sizeof(float);
  auto kernel = attention_forward_kernel<T, CTV>;
  DSX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>((g.seq + kQueryTile - 1) / kQueryTile), static_cast<unsigned>(g.heads),
                  static_cast<unsigned>(g.batch));
  kernel<<<grid, kThreads, smem, current_stream()>>>(q.data<T>(), k.data<T>(), v.data<T>(), segments, g, scale_log2,
                                                     out.data<T>(), lse.data<float>());
  DSX_CUDA_CHECK_LAUNCH("attention_forward_kernel");
}

}  // namespace

void own_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& segment_ids,
                 Tensor& out, Tensor& lse) {
  const Geometry g{q.dim(0), q.dim(1), q.dim(2), static_cast<int>(q.dim(3)), static_cast<int>(v.dim(3))};
  const int64_t* segments = segment_ids.defined() ? segment_ids.data<int64_t>() : nullptr;
  const float scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  with_col_tiles(g.dv, [&]<int CTV>() {
    if (q.dtype() == DType::bf16) {
      launch_forward<bf16, CTV>(q, k, v, scale_log2, segments, g, out, lse);
    } else {
      launch_forward<float, CTV>(q, k, v, scale_log2, segments, g, out, lse);
    }
  });
}

}  // namespace dsx::cuda::attn
