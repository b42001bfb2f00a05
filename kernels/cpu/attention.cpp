// Causal scaled-dot-product attention on the CPU.
//
// Work is cut into (batch, head, block of query rows). Causality means a block of rows
// [i0, i1) only sees keys [0, i1), so the score tile is rows × i1 and the upper triangle beyond
// the block is never computed. Each tile is exact (no online softmax): the row's full set of
// visible keys is in the tile, so max, log-sum-exp and probabilities come from one pass.
// QKᵀ, PV and the backward products are OpenBLAS GEMMs on strided views of the [B, S, H, D]
// tensors (row stride H·D), so no head is ever copied out.
#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/attention.h"

namespace dsx::ops {
namespace {

// Query rows per tile: large enough for efficient GEMMs (on S = 512..4096, Dqk 192, 128 rows
// measured ~10% faster than 64 and ~25% faster than 32), small enough to bound each thread's
// scratch: a 128 × S tile is 2 MiB in f32 at S = 4096 (backward holds two).
constexpr int64_t kQueryBlock = 128;

struct Dims {
  int64_t batch, seq, heads, dqk, dv;
};

void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  cblas_sgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

void gemm(CBLAS_TRANSPOSE ta, CBLAS_TRANSPOSE tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
          int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  cblas_dgemm(CblasRowMajor, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
              static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

// While several OpenMP threads each run their own GEMMs, OpenBLAS must stay single-threaded:
// the Debian build uses its own pthread pool, which would otherwise be driven from every
// thread at once and oversubscribe the cores. Restores the caller's setting on exit.
class SingleThreadedBlas {
 public:
  explicit SingleThreadedBlas(bool active) : saved_(active ? openblas_get_num_threads() : 0) {
    if (saved_ > 1) openblas_set_num_threads(1);
  }
  ~SingleThreadedBlas() {
    if (saved_ > 1) openblas_set_num_threads(saved_);
  }
  SingleThreadedBlas(const SingleThreadedBlas&) = delete;
  SingleThreadedBlas& operator=(const SingleThreadedBlas&) = delete;

 private:
  int saved_;
};

// Below this many multiply-adds a whole call takes tens of microseconds, and starting OpenMP
// threads (much more when the cores are shared with other processes) costs more than it saves.
constexpr double kParallelMultiplyAdds = 1 << 21;

// Run independent tasks on OpenMP threads (serial BLAS inside) when there is enough work and
// enough tasks to keep every thread busy; otherwise run them in order and let OpenBLAS thread
// each GEMM (it does so only for large ones).
bool run_tasks_in_parallel(int64_t tasks, const Dims& d) {
  const double causal_pairs = static_cast<double>(d.seq) * static_cast<double>(d.seq + 1) / 2;
  const double work = static_cast<double>(d.batch * d.heads) * causal_pairs * static_cast<double>(d.dqk + d.dv);
  const int threads = omp_get_max_threads();
  return threads > 1 && tasks >= threads && work >= kParallelMultiplyAdds;
}

// Which keys a query row may see: j <= i (the tile already stops at the block's end) and, with
// segment ids, only keys of the query's own segment.
class Visibility {
 public:
  Visibility(const Tensor& segment_ids, std::string_view op) {
    if (!segment_ids.defined()) return;
    segments_.resize(static_cast<size_t>(segment_ids.numel()));
    dispatch_index(segment_ids.dtype(), op, [&]<class I>() {
      const I* s = segment_ids.data<I>();
      for (size_t n = 0; n < segments_.size(); ++n) segments_[n] = static_cast<int64_t>(s[n]);
    });
  }
  // Sets every key that query i cannot see to `masked` (-inf in scores, 0 in probabilities).
  template <class T>
  void mask_row(int64_t b, int64_t seq, int64_t i, int64_t keys, T* row, T masked) const {
    for (int64_t j = i + 1; j < keys; ++j) row[j] = masked;
    if (segments_.empty()) return;
    const int64_t* seg = segments_.data() + b * seq;
    for (int64_t j = 0; j <= i; ++j) {
      if (seg[j] != seg[i]) row[j] = masked;
    }
  }

 private:
  std::vector<int64_t> segments_;  // [B, S] as int64; empty without segment masking
};

// Strided views of one (batch, head): row i of head h of batch b.
template <class T>
struct HeadView {
  T* base;
  int64_t row_stride;
  T* row(int64_t i) const { return base + i * row_stride; }
};

template <class T>
HeadView<T> head_view(const Tensor& t, const Dims& d, int64_t b, int64_t h, int64_t width) {
  T* p = t.data<T>() + (b * d.seq * d.heads + h) * width;
  return HeadView<T>{p, d.heads * width};
}

// Turns a tile of masked scaled scores into probabilities in place and writes each row's lse.
template <class T>
void softmax_rows(T* scores, int64_t rows, int64_t keys, int64_t i0, T* lse_out) {
  for (int64_t r = 0; r < rows; ++r) {
    T* row = scores + r * keys;
    const int64_t visible_end = i0 + r + 1;  // keys past the diagonal are masked anyway
    T max_score = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < visible_end; ++j) max_score = std::max(max_score, row[j]);
    double sum = 0;  // double: thousands of terms in f32 would lose ~1e-4 relative
    for (int64_t j = 0; j < visible_end; ++j) {
      row[j] = std::exp(row[j] - max_score);
      sum += static_cast<double>(row[j]);
    }
    const T inv_sum = static_cast<T>(1.0 / sum);
    for (int64_t j = 0; j < visible_end; ++j) row[j] *= inv_sum;
    for (int64_t j = visible_end; j < keys; ++j) row[j] = T(0);
    lse_out[r] = static_cast<T>(static_cast<double>(max_score) + std::log(sum));
  }
}

template <class T>
void forward_tile(const Tensor& q, const Tensor& k, const Tensor& v, T scale, const Visibility& vis, const Dims& d,
                  int64_t b, int64_t h, int64_t i0, Tensor& out, Tensor& lse, std::vector<T>& scores) {
  const int64_t i1 = std::min(d.seq, i0 + kQueryBlock), rows = i1 - i0, keys = i1;
  const auto qh = head_view<T>(q, d, b, h, d.dqk), kh = head_view<T>(k, d, b, h, d.dqk);
  const auto vh = head_view<T>(v, d, b, h, d.dv), oh = head_view<T>(out, d, b, h, d.dv);
  scores.resize(static_cast<size_t>(rows * keys));
  gemm(CblasNoTrans, CblasTrans, rows, keys, d.dqk, scale, qh.row(i0), qh.row_stride, kh.row(0), kh.row_stride, T(0),
       scores.data(), keys);
  for (int64_t r = 0; r < rows; ++r) {
    vis.mask_row(b, d.seq, i0 + r, keys, scores.data() + r * keys, -std::numeric_limits<T>::infinity());
  }
  T* lse_row = lse.data<T>() + (b * d.heads + h) * d.seq + i0;
  softmax_rows(scores.data(), rows, keys, i0, lse_row);
  gemm(CblasNoTrans, CblasNoTrans, rows, d.dv, keys, T(1), scores.data(), keys, vh.row(0), vh.row_stride, T(0),
       oh.row(i0), oh.row_stride);
}

template <class T>
void forward_impl(const Tensor& q, const Tensor& k, const Tensor& v, T scale, const Visibility& vis, const Dims& d,
                  Tensor& out, Tensor& lse) {
  const int64_t blocks = (d.seq + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = d.batch * d.heads * blocks;
  const bool parallel = run_tasks_in_parallel(tasks, d);
  SingleThreadedBlas blas_guard(parallel);
#pragma omp parallel if (parallel)
  {
    std::vector<T> scores;  // per-thread tile, reused across tasks
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      // Later blocks see more keys; dynamic scheduling and the block-major order balance them.
      const int64_t block = blocks - 1 - task / (d.batch * d.heads);
      const int64_t bh = task % (d.batch * d.heads);
      forward_tile<T>(q, k, v, scale, vis, d, bh / d.heads, bh % d.heads, block * kQueryBlock, out, lse, scores);
    }
  }
}

// Scratch of one thread in backward: probabilities and their gradient for one tile.
template <class T>
struct BackwardScratch {
  std::vector<T> probs, dprobs, delta;
};

// One query block's contribution: dQ rows of the block (written) and dK, dV rows [0, i1)
// (accumulated: every later block adds to the same keys).
template <class T>
void backward_tile(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, T scale, const Visibility& vis, const Dims& d, int64_t b, int64_t h, int64_t i0,
                   Tensor& dq, Tensor& dk, Tensor& dv, BackwardScratch<T>& s) {
  const int64_t i1 = std::min(d.seq, i0 + kQueryBlock), rows = i1 - i0, keys = i1;
  const auto qh = head_view<T>(q, d, b, h, d.dqk), kh = head_view<T>(k, d, b, h, d.dqk);
  const auto vh = head_view<T>(v, d, b, h, d.dv), oh = head_view<T>(out, d, b, h, d.dv);
  const auto doh = head_view<T>(dout, d, b, h, d.dv);
  const auto dqh = head_view<T>(dq, d, b, h, d.dqk), dkh = head_view<T>(dk, d, b, h, d.dqk);
  const auto dvh = head_view<T>(dv, d, b, h, d.dv);
  const T* lse_row = lse.data<T>() + (b * d.heads + h) * d.seq + i0;
  s.probs.resize(static_cast<size_t>(rows * keys));
  s.dprobs.resize(s.probs.size());
  s.delta.resize(static_cast<size_t>(rows));

  // P = exp(scale·QKᵀ − lse), recomputed rather than stored: S² memory is what we avoid saving.
  T* p = s.probs.data();
  gemm(CblasNoTrans, CblasTrans, rows, keys, d.dqk, scale, qh.row(i0), qh.row_stride, kh.row(0), kh.row_stride, T(0), p,
       keys);
  for (int64_t r = 0; r < rows; ++r) {
    T* row = p + r * keys;
    for (int64_t j = 0; j <= i0 + r; ++j) row[j] = std::exp(row[j] - lse_row[r]);
    vis.mask_row(b, d.seq, i0 + r, keys, row, T(0));
    // delta_i = rowsum(dO ∘ O) = Σ_j P_ij dP_ij, the softmax Jacobian's correction term.
    double delta = 0;
    for (int64_t c = 0; c < d.dv; ++c) delta += static_cast<double>(doh.row(i0 + r)[c]) * oh.row(i0 + r)[c];
    s.delta[static_cast<size_t>(r)] = static_cast<T>(delta);
  }
  // dV[0:i1] += Pᵀ dO
  gemm(CblasTrans, CblasNoTrans, keys, d.dv, rows, T(1), p, keys, doh.row(i0), doh.row_stride, T(1), dvh.row(0),
       dvh.row_stride);
  // dP = dO Vᵀ, then dS = P ∘ (dP − delta) in place
  T* ds = s.dprobs.data();
  gemm(CblasNoTrans, CblasTrans, rows, keys, d.dv, T(1), doh.row(i0), doh.row_stride, vh.row(0), vh.row_stride, T(0),
       ds, keys);
  for (int64_t r = 0; r < rows; ++r) {
    const T delta = s.delta[static_cast<size_t>(r)];
    for (int64_t j = 0; j < keys; ++j) ds[r * keys + j] = p[r * keys + j] * (ds[r * keys + j] - delta);
  }
  // dQ = scale·dS K;  dK[0:i1] += scale·dSᵀ Q
  gemm(CblasNoTrans, CblasNoTrans, rows, d.dqk, keys, scale, ds, keys, kh.row(0), kh.row_stride, T(0), dqh.row(i0),
       dqh.row_stride);
  gemm(CblasTrans, CblasNoTrans, keys, d.dqk, rows, scale, ds, keys, qh.row(i0), qh.row_stride, T(1), dkh.row(0),
       dkh.row_stride);
}

template <class T>
void backward_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                   const Tensor& dout, T scale, const Visibility& vis, const Dims& d, Tensor& dq, Tensor& dk,
                   Tensor& dv) {
  dk.zero();  // accumulated over query blocks below
  dv.zero();
  const int64_t tasks = d.batch * d.heads;  // a (b, h) owns its dK, dV rows, so blocks stay in one task
  const bool parallel = run_tasks_in_parallel(tasks, d);
  SingleThreadedBlas blas_guard(parallel);
#pragma omp parallel if (parallel)
  {
    BackwardScratch<T> scratch;
#pragma omp for schedule(dynamic)
    for (int64_t task = 0; task < tasks; ++task) {
      for (int64_t i0 = 0; i0 < d.seq; i0 += kQueryBlock) {
        backward_tile<T>(q, k, v, out, lse, dout, scale, vis, d, task / d.heads, task % d.heads, i0, dq, dk, dv,
                         scratch);
      }
    }
  }
}

Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& segment_ids, std::string_view op) {
  check_cpu(q, op, "q");
  check_cpu(k, op, "k");
  check_cpu(v, op, "v");
  check(q.ndim() == 4, op, "q must be [B, S, H, Dqk], got " + shape_str(q.shape()));
  check(v.ndim() == 4, op, "v must be [B, S, H, Dv], got " + shape_str(v.shape()));
  const Dims d{q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)};
  check_shape(k, q.shape(), op, "k");
  check_shape(v, {d.batch, d.seq, d.heads, d.dv}, op, "v");
  check(k.dtype() == q.dtype() && v.dtype() == q.dtype(), op, "q, k and v must share a dtype");
  check(d.dqk > 0 && d.dv > 0, op,
        "head dims must be positive, got Dqk " + std::to_string(d.dqk) + " and Dv " + std::to_string(d.dv));
  // cblas takes int dimensions; the largest is a row stride H·D or the sequence length.
  check(d.seq <= INT_MAX && d.heads * std::max(d.dqk, d.dv) <= INT_MAX, op, "dimensions exceed the BLAS int range");
  if (segment_ids.defined()) {
    check_cpu(segment_ids, op, "segment_ids");
    check_shape(segment_ids, {d.batch, d.seq}, op, "segment_ids");
  }
  return d;
}

void check_same(const Tensor& t, const Shape& shape, DType dtype, std::string_view op, std::string_view name) {
  check_cpu(t, op, name);
  check_shape(t, shape, op, name);
  check(t.dtype() == dtype, op, std::string(name) + " must have dtype " + std::string(dtype_name(dtype)));
}

// lse: q's dtype, or f32 with bf16 inputs (a bf16 lse would be off by up to ~0.03 at |lse| ~ 8,
// which the backward turns into ~3% errors in the recomputed probabilities).
void check_lse(const Tensor& lse, const Dims& d, DType dtype, std::string_view op) {
  check_cpu(lse, op, "lse");
  check_shape(lse, {d.batch, d.heads, d.seq}, op, "lse");
  const DType want = dtype == DType::bf16 ? DType::f32 : dtype;
  check(lse.dtype() == want, op, "lse must have dtype " + std::string(dtype_name(want)));
}

// bf16 calls run the f32 kernels on widened copies of the inputs and round the outputs once:
// the inputs are exact in f32, so the result is the f32 op's on the bf16 values.
Tensor widened(const Tensor& t) {
  return t.dtype() == DType::bf16 ? t.to(DType::f32) : t;
}
Tensor f32_output_for(const Tensor& t) {
  return t.dtype() == DType::bf16 ? Tensor::empty(t.shape(), DType::f32) : t;
}
void store_rounded(Tensor& t, const Tensor& computed) {
  if (t.dtype() == DType::bf16) t.copy_from(computed);
}

}  // namespace

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& segment_ids,
                       Tensor& out, Tensor& lse) {
  DSX_ROUTE_TO_CUDA(q, attention_forward(q, k, v, scale, segment_ids, out, lse));
  constexpr std::string_view op = "attention_forward";
  const Dims d = check_inputs(q, k, v, segment_ids, op);
  check_same(out, v.shape(), q.dtype(), op, "out");
  check_lse(lse, d, q.dtype(), op);
  const Visibility vis(segment_ids, op);
  if (lse.numel() == 0) return;  // no query rows
  const Tensor q_c = widened(q), k_c = widened(k), v_c = widened(v);
  Tensor out_c = f32_output_for(out);
  dispatch_float(q_c.dtype(), op,
                 [&]<class T>() { forward_impl<T>(q_c, k_c, v_c, static_cast<T>(scale), vis, d, out_c, lse); });
  store_rounded(out, out_c);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, double scale, const Tensor& segment_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv) {
  DSX_ROUTE_TO_CUDA(q, attention_backward(q, k, v, out, lse, dout, scale, segment_ids, dq, dk, dv));
  constexpr std::string_view op = "attention_backward";
  const Dims d = check_inputs(q, k, v, segment_ids, op);
  check_same(out, v.shape(), q.dtype(), op, "out");
  check_lse(lse, d, q.dtype(), op);
  check_same(dout, v.shape(), q.dtype(), op, "dout");
  check_same(dq, q.shape(), q.dtype(), op, "dq");
  check_same(dk, k.shape(), q.dtype(), op, "dk");
  check_same(dv, v.shape(), q.dtype(), op, "dv");
  const Visibility vis(segment_ids, op);
  if (lse.numel() == 0) return;  // no query rows, so dq, dk, dv are empty too
  const Tensor q_c = widened(q), k_c = widened(k), v_c = widened(v), out_c = widened(out), dout_c = widened(dout);
  Tensor dq_c = f32_output_for(dq), dk_c = f32_output_for(dk), dv_c = f32_output_for(dv);
  dispatch_float(q_c.dtype(), op, [&]<class T>() {
    backward_impl<T>(q_c, k_c, v_c, out_c, lse, dout_c, static_cast<T>(scale), vis, d, dq_c, dk_c, dv_c);
  });
  store_rounded(dq, dq_c);
  store_rounded(dk, dk_c);
  store_rounded(dv, dv_c);
}

}  // namespace dsx::ops
