// Softmax cross-entropy over vocabulary rows for device tensors (kernels/ops/cross_entropy.h):
// cross_entropy_forward/backward, token_logprobs and cross_entropy_backward_weighted.
//
// dtypes: as the CPU ops: logits/dlogits f32|f64 (the exponentials run in that type, sums in
// double); lse, logp, entropy and row_scale each f32|f64 independently; targets i32|i64.
// Targets: rows::first_bad_index checks every target (ignore_index or in [0, V)) BEFORE any
// kernel writes (one small kernel and an 8-byte device-to-host copy, which synchronises), so a
// bad target throws the CPU's message with nothing written and kernels never index out of a row.
//
// Thread mapping: one block per row (rows::threads_for_row(V) threads: 1024 for a 129280-entry
// vocabulary, ~126 logits each), threads striding over the row's columns (coalesced).
//  - forward: each thread keeps an online (max m, Σ exp(x - m)) pair, the max in the logits'
//    type and the sum in double; pairs are merged by warp shuffles and then across warps in
//    shared memory (a fixed tree: deterministic). Thread 0 writes lse and the row's loss and
//    "counted" flag into a [2N] f64 buffer; the host copies it back once and sums the counted
//    rows in row order in double, exactly like the CPU.
//  - backward (uniform or per-row scale): elementwise over the row, no reduction.
//  - token_logprobs: thread 0 writes logp; with entropy, Σ p_j x_j is a double block_sum.
#include <cmath>
#include <string>
#include <vector>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_loss.h"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"

namespace dsx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

// A per-row f32|f64 vector read or written as double (lse, logp, entropy, row_scale).
struct RowValues {
  void* data;
  bool f64;
  __device__ double get(int64_t n) const {
    return f64 ? static_cast<const double*>(data)[n] : static_cast<double>(static_cast<const float*>(data)[n]);
  }
  __device__ void set(int64_t n, double v) const {
    if (f64) {
      static_cast<double*>(data)[n] = v;
    } else {
      static_cast<float*>(data)[n] = static_cast<float>(v);
    }
  }
};

// Running softmax denominator: max m of the values seen and s = Σ exp(x - m) over them.
template <class C>
struct MaxSum {
  C m;
  double s;
};

template <class C>
__device__ __forceinline__ MaxSum<C> max_sum_identity() {
  return {-INFINITY, 0.0};
}

// Merges two partial pairs. The products and the sum are rounded explicitly (no FMA
// contraction), so merge(a, b) == merge(b, a) bit for bit and every lane of a butterfly
// reduction holds the same value.
template <class C>
__device__ __forceinline__ MaxSum<C> merge(MaxSum<C> a, MaxSum<C> b) {
  const C m = max(a.m, b.m);
  if (m == -INFINITY) return {m, __dadd_rn(a.s, b.s)};  // both empty (or only -inf logits)
  const double ea = exp(static_cast<double>(a.m) - static_cast<double>(m));
  const double eb = exp(static_cast<double>(b.m) - static_cast<double>(m));
  return {m, __dadd_rn(__dmul_rn(a.s, ea), __dmul_rn(b.s, eb))};
}

// Adds one logit. -inf contributes exactly 0 (and must not meet m = -inf: exp(-inf + inf) is
// NaN); a NaN logit makes s NaN, as on the CPU.
template <class C>
__device__ __forceinline__ void accumulate(MaxSum<C>& acc, C v) {
  if (v > acc.m) {
    acc.s = acc.s * exp(static_cast<double>(acc.m) - static_cast<double>(v)) + 1.0;
    acc.m = v;
  } else if (v != -INFINITY) {
    acc.s += static_cast<double>(exp(v - acc.m));
  }
}

// The block's merged pair, in every thread (blockDim.x a multiple of 32, at most 1024).
template <class C>
__device__ MaxSum<C> block_max_sum(MaxSum<C> v) {
  __shared__ C warp_m[32];
  __shared__ double warp_s[32];
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum<C> other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, other);
  }
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (lane == 0) {
    warp_m[warp] = v.m;
    warp_s[warp] = v.s;
  }
  __syncthreads();
  v = lane < warps ? MaxSum<C>{warp_m[lane], warp_s[lane]} : max_sum_identity<C>();
  for (int offset = 16; offset > 0; offset /= 2) {
    const MaxSum<C> other{__shfl_xor_sync(0xffffffffu, v.m, offset), __shfl_xor_sync(0xffffffffu, v.s, offset)};
    v = merge(v, other);
  }
  return v;
}

// One block per row: lse[n], stats[n] = loss of the row (0 when ignored), stats[N + n] = 1 when
// counted, else 0.
template <class T, class Index>
__global__ void cross_entropy_forward_kernel(const T* logits, const Index* targets, int64_t rows, int64_t vocab,
                                             int64_t ignore_index, RowValues lse, double* stats) {
  using C = compute_t<T>;
  const int64_t n = blockIdx.x;
  const T* row = logits + n * vocab;
  MaxSum<C> acc = max_sum_identity<C>();
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) accumulate(acc, static_cast<C>(row[j]));
  acc = block_max_sum(acc);
  if (threadIdx.x != 0) return;
  // An infinite max means an all -inf row or a +inf logit: the CPU's exp(inf - inf) gives NaN.
  const double row_lse = isfinite(static_cast<double>(acc.m)) ? static_cast<double>(acc.m) + log(acc.s) : NAN;
  lse.set(n, row_lse);
  const int64_t target = static_cast<int64_t>(targets[n]);
  const bool counted = target != ignore_index;
  stats[n] = counted ? row_lse - static_cast<double>(row[target]) : 0.0;
  stats[rows + n] = counted ? 1.0 : 0.0;
}

// dlogits[n, :] = s · (softmax - onehot(target)) with s = row_scale[n] (when given) or scale;
// 0 on ignored rows. The same roundings as the CPU: the shift in double, exp in T.
template <class T, class Index>
__global__ void cross_entropy_backward_kernel(const T* logits, const Index* targets, int64_t vocab,
                                              int64_t ignore_index, RowValues lse, RowValues row_scale, double scale,
                                              T* dlogits) {
  const int64_t n = blockIdx.x;
  T* drow = dlogits + n * vocab;
  const int64_t target = static_cast<int64_t>(targets[n]);
  if (target == ignore_index) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) drow[j] = T(0);
    return;
  }
  const T* row = logits + n * vocab;
  const double row_lse = lse.get(n);
  const T s = static_cast<T>(row_scale.data ? row_scale.get(n) : scale);
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    T v = s * exp(static_cast<T>(static_cast<double>(row[j]) - row_lse));
    if (j == target) v -= s;
    drow[j] = v;
  }
}

// logp[n] = logits[n, target] - lse[n]; entropy[n] = lse[n] - Σ_j p_j x_j (double); 0 on ignored rows.
template <class T, class Index>
__global__ void token_logprobs_kernel(const T* logits, const Index* targets, int64_t vocab, int64_t ignore_index,
                                      RowValues lse, RowValues logp, RowValues entropy) {
  const int64_t n = blockIdx.x;
  const int64_t target = static_cast<int64_t>(targets[n]);
  if (target == ignore_index) {  // uniform over the block: no thread reaches block_sum
    if (threadIdx.x == 0) {
      logp.set(n, 0.0);
      if (entropy.data) entropy.set(n, 0.0);
    }
    return;
  }
  const T* row = logits + n * vocab;
  const double row_lse = lse.get(n);
  if (entropy.data) {
    double expected_logit = 0;
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
      const double xj = static_cast<double>(row[j]);
      expected_logit += exp(xj - row_lse) * xj;
    }
    expected_logit = block_sum(expected_logit);
    if (threadIdx.x == 0) entropy.set(n, row_lse - expected_logit);
  }
  if (threadIdx.x == 0) logp.set(n, static_cast<double>(row[target]) - row_lse);
}

// ---------------------------------------------------------------------------------------------
// launchers

void check_logits_targets(const Tensor& logits, const Tensor& targets, std::string_view op) {
  check_on_gpu(logits, op, "logits");
  check_on_gpu(targets, op, "targets");
  check(logits.ndim() == 2, op, "logits must be [N, V], got " + shape_str(logits.shape()));
  check_shape(targets, {logits.dim(0)}, op, "targets");
}

// lse, logp, entropy, row_scale: [N] on the GPU, f32 or f64.
void check_row_tensor(const Tensor& t, int64_t rows, std::string_view op, const char* name) {
  check_on_gpu(t, op, name);
  check_shape(t, {rows}, op, name);
  check(t.dtype() == DType::f32 || t.dtype() == DType::f64, op,
        std::string(name) + " must be f32 or f64, got " + std::string(dtype_name(t.dtype())));
}

// The CPU's checked_targets / target_values: the first target that is neither ignore_index nor
// a vocabulary entry throws.
void check_targets(const Tensor& targets, int64_t vocab, int64_t ignore_index, std::string_view op) {
  const auto bad = rows::first_bad_index(targets, vocab, ignore_index, op);
  check(!bad, op, [&] {
    return "targets[" + std::to_string(bad->position) + "] = " + std::to_string(bad->value) +
           " is neither ignore_index (" + std::to_string(ignore_index) + ") nor in [0, " + std::to_string(vocab) + ")";
  });
}

// "op: dtype X is not supported" unless t is f32|f64, as the CPU's dispatch_float.
void require_float(DType t, std::string_view op) {
  if (t != DType::f32 && t != DType::f64) unsupported_dtype(op, t);
}

RowValues row_values(const Tensor& t) {
  if (!t.defined()) return {nullptr, false};
  return {t.raw(), t.dtype() == DType::f64};
}

unsigned row_grid(int64_t rows, std::string_view op) {
  check(rows <= 0x7fffffff, op, [&] { return "at most 2^31 - 1 rows on the GPU, got " + std::to_string(rows); });
  return static_cast<unsigned>(rows);
}

// Both backward ops: row_scale undefined means the uniform `scale`.
void launch_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                     const Tensor& row_scale, double scale, Tensor& dlogits, std::string_view op) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  if (rows == 0) return;
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    dispatch_index(targets.dtype(), op, [&]<class Index>() {
      cross_entropy_backward_kernel<T, Index>
          <<<row_grid(rows, op), rows::threads_for_row(vocab), 0, current_stream()>>>(
              logits.data<T>(), targets.data<Index>(), vocab, ignore_index, row_values(lse), row_values(row_scale),
              scale, dlogits.data<T>());
      DSX_CUDA_CHECK_LAUNCH("cross_entropy_backward_kernel");
    });
  });
}

}  // namespace

ops::CrossEntropyResult cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                                              Tensor& lse) {
  constexpr std::string_view op = "cross_entropy_forward";
  check_logits_targets(logits, targets, op);
  check_row_tensor(lse, logits.dim(0), op, "lse");
  check(logits.dim(1) > 0 || logits.dim(0) == 0, op, "logits have an empty vocabulary dimension");
  check_targets(targets, logits.dim(1), ignore_index, op);
  require_float(logits.dtype(), op);
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  ops::CrossEntropyResult result;
  if (rows == 0) return result;
  Tensor stats = Tensor::empty({2 * rows}, DType::f64, Device::cuda);
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    dispatch_index(targets.dtype(), op, [&]<class Index>() {
      cross_entropy_forward_kernel<T, Index><<<row_grid(rows, op), rows::threads_for_row(vocab), 0, current_stream()>>>(
          logits.data<T>(), targets.data<Index>(), rows, vocab, ignore_index, row_values(lse), stats.data<double>());
      DSX_CUDA_CHECK_LAUNCH("cross_entropy_forward_kernel");
    });
  });
  // One device-to-host copy (it waits for the kernel); the counted rows are summed in row
  // order, as the CPU does, so the sum does not depend on the GPU's scheduling.
  const Tensor host = stats.to(Device::cpu);
  const double* row_loss = host.data<double>();
  for (int64_t n = 0; n < rows; ++n) {
    if (row_loss[rows + n] == 0.0) continue;
    result.loss_sum += row_loss[n];
    ++result.count;
  }
  return result;
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                            double scale, Tensor& dlogits) {
  constexpr std::string_view op = "cross_entropy_backward";
  check_logits_targets(logits, targets, op);
  check_row_tensor(lse, logits.dim(0), op, "lse");
  check_on_gpu(dlogits, op, "dlogits");
  check_shape(dlogits, logits.shape(), op, "dlogits");
  check(dlogits.dtype() == logits.dtype(), op, "dlogits must have the logits' dtype");
  check_targets(targets, logits.dim(1), ignore_index, op);
  require_float(logits.dtype(), op);
  launch_backward(logits, targets, lse, ignore_index, Tensor(), scale, dlogits, op);
}

void token_logprobs(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index, Tensor& logp,
                    Tensor& entropy) {
  constexpr std::string_view op = "token_logprobs";
  check_logits_targets(logits, targets, op);
  check_on_gpu(lse, op, "lse");
  check_shape(lse, {logits.dim(0)}, op, "lse");
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  check_row_tensor(logp, rows, op, "logp");
  if (entropy.defined()) check_row_tensor(entropy, rows, op, "entropy");
  check_targets(targets, vocab, ignore_index, op);
  require_float(logits.dtype(), op);
  require_float(lse.dtype(), op);
  if (rows == 0) return;
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    dispatch_index(targets.dtype(), op, [&]<class Index>() {
      token_logprobs_kernel<T, Index><<<row_grid(rows, op), rows::threads_for_row(vocab), 0, current_stream()>>>(
          logits.data<T>(), targets.data<Index>(), vocab, ignore_index, row_values(lse), row_values(logp),
          row_values(entropy));
      DSX_CUDA_CHECK_LAUNCH("token_logprobs_kernel");
    });
  });
}

void cross_entropy_backward_weighted(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int64_t ignore_index, const Tensor& row_scale, Tensor& dlogits) {
  constexpr std::string_view op = "cross_entropy_backward_weighted";
  check_logits_targets(logits, targets, op);
  check_on_gpu(lse, op, "lse");
  check_shape(lse, {logits.dim(0)}, op, "lse");
  check_row_tensor(row_scale, logits.dim(0), op, "row_scale");
  check_on_gpu(dlogits, op, "dlogits");
  check_shape(dlogits, logits.shape(), op, "dlogits");
  check(dlogits.dtype() == logits.dtype(), op, "dlogits must have the logits' dtype");
  check_targets(targets, logits.dim(1), ignore_index, op);
  require_float(logits.dtype(), op);
  require_float(lse.dtype(), op);
  launch_backward(logits, targets, lse, ignore_index, row_scale, 0.0, dlogits, op);
}

}  // namespace dsx::cuda
