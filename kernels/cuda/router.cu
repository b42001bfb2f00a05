// The DeepSeek MoE router on the GPU (kernels/ops/router.h has the semantics).
//
// dtypes: logits, bias, scores, weights and gradients f32 or f64 (one dtype per call, as on
// the CPU); expert ids i32 (expert_counts: i32 or i64); counts i64 (router_update_bias: i32|i64).
//
// Thread mapping:
//  - router_forward, router_backward and the per-token parts of the balance loss: one warp per
//    token (kWarpsPerBlock tokens per block); lanes stride over the experts. router_forward keeps
//    the token's scores, selection keys, group scores and candidate flags in the warp's slice of
//    dynamic shared memory; each group score is computed by one lane (the CPU's sequential top-2
//    scan), and the top_k groups / experts are chosen by rounds of a warp-wide argmax ordered
//    (key descending, index ascending), which yields exactly the CPU's partial_sort order.
//    Up to 8 warps per block share 48 KiB; wider routers run one warp per block and opt in to
//    more shared memory (E up to ~13000 in f64, ~25000 in f32 on H100; beyond that it throws). The
//    arithmetic that reaches the outputs is written with non-fusable IEEE operations
//    (exact_math.cuh), in the CPU's order, so ids match the CPU exactly and scores/weights to
//    the last bit except where exp differs between libm and CUDA (within 1 ulp, rarely).
//  - expert_counts and the balance loss's per-sequence counts: grid-stride over the ids, a
//    shared-memory histogram per block flushed with integer atomics (integer sums: deterministic).
//  - router_update_bias: one block (E is small).
//  - balance_loss_forward: per-token terms in double, then one block sums them in a fixed order;
//    the one synchronisation is the copy of that double (and of the first bad id, if any).
// Validity of expert ids: balance_loss_forward throws like the CPU (it synchronises anyway);
// router_backward, expert_counts and balance_loss_backward skip out-of-range ids and record them
// for check_device_errors() (kernels/cuda/device_checks.h).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>

#include "kernels/cuda/device_checks.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/exact_math.cuh"
#include "kernels/cuda/ops_router.h"
#include "kernels/dispatch.h"

namespace dsx::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
// Dynamic shared memory a router kernel uses without opting in to more.
constexpr size_t kMaxSharedBytes = 48 * 1024;
constexpr double kNormEps = 1e-20;  // as the CPU op (the Hugging Face DeepSeek-V3 gate)
// Experts up to which expert counts use a shared-memory histogram (32 KiB of counters).
constexpr int64_t kSharedHistogramExperts = 8192;

struct RouterShape {
  int n_experts;
  int top_k;
  int n_group;
  int topk_group;
  int group_size;
  bool sigmoid;
  bool norm_topk_prob;
  double routed_scaling_factor;
};

// ============================================================================================
// kernels
// ============================================================================================

template <class T>
__device__ __forceinline__ T selection_key(T v) {
  return isnan(v) ? -std::numeric_limits<T>::infinity() : v;
}

// The (key, index) pair that ranks first: larger key, then lower index. Keys are never NaN.
template <class T>
struct Best {
  T key;
  int index;
  __device__ __forceinline__ void consider(T k, int i) {
    if (k > key || (k == key && i < index)) {
      key = k;
      index = i;
    }
  }
};

template <class T>
__device__ __forceinline__ Best<T> no_best() {
  return {-std::numeric_limits<T>::infinity(), std::numeric_limits<int>::max()};
}

template <class T>
__device__ __forceinline__ Best<T> warp_best(Best<T> b) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T k = __shfl_xor_sync(0xffffffffu, b.key, offset);
    const int i = __shfl_xor_sync(0xffffffffu, b.index, offset);
    b.consider(k, i);
  }
  return b;
}

template <class T>
__device__ __forceinline__ T warp_max_ignoring_nan(T v) {
  for (int offset = 16; offset > 0; offset /= 2) {
    const T o = __shfl_xor_sync(0xffffffffu, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// Sum of the two largest keys of a group, the CPU's sequential scan (the largest alone for
// one-expert groups).
template <class T>
__device__ T group_score(const T* v, int n) {
  T first = v[0];
  T second = -std::numeric_limits<T>::infinity();
  for (int j = 1; j < n; ++j) {
    if (v[j] > first) {
      second = first;
      first = v[j];
    } else if (v[j] > second) {
      second = v[j];
    }
  }
  return n == 1 ? first : selection_key(add_rn(first, second));
}

// The warp's slice of dynamic shared memory in router_forward_kernel.
template <class T>
struct ForwardSlice {
  T* scores;          // [E]
  T* keys;            // [E] biased scores with NaN -> -inf
  T* groups;          // [n_group]
  uint8_t* selected;  // [E] 1 = still a candidate expert
};

template <class T>
__host__ __device__ constexpr size_t forward_slice_bytes(int n_experts, int n_group) {
  const size_t bytes = (2 * static_cast<size_t>(n_experts) + n_group) * sizeof(T) + n_experts;
  return (bytes + 15) / 16 * 16;
}

template <class T>
__device__ ForwardSlice<T> forward_slice(unsigned char* smem, const RouterShape& c) {
  unsigned char* base = smem + forward_slice_bytes<T>(c.n_experts, c.n_group) * (threadIdx.x / 32);
  T* values = reinterpret_cast<T*>(base);
  return {values, values + c.n_experts, values + 2 * c.n_experts,
          reinterpret_cast<uint8_t*>(values + 2 * c.n_experts + c.n_group)};
}

// Scores of one token into s.scores (and out), selection keys into s.keys.
template <class T>
__device__ void compute_scores(const RouterShape& c, const T* x, const T* bias, ForwardSlice<T> s, T* out) {
  const int lane = threadIdx.x % 32;
  if (c.sigmoid) {
    for (int e = lane; e < c.n_experts; e += 32) s.scores[e] = div_rn(T(1), add_rn(T(1), exp_like_host(-x[e])));
  } else {
    // The CPU's running std::max starting at x[0]: NaN exactly when x[0] is NaN, else the max
    // of the non-NaN logits.
    T m = -std::numeric_limits<T>::infinity();
    for (int e = lane; e < c.n_experts; e += 32) m = x[e] > m ? x[e] : m;
    m = warp_max_ignoring_nan(m);
    if (isnan(x[0])) m = x[0];
    double sum = 0;
    for (int e = lane; e < c.n_experts; e += 32) {
      s.scores[e] = exp_like_host(sub_rn(x[e], m));
      sum += static_cast<double>(s.scores[e]);
    }
    sum = warp_sum(sum);
    const T inv = static_cast<T>(1.0 / sum);
    for (int e = lane; e < c.n_experts; e += 32) s.scores[e] = mul_rn(s.scores[e], inv);
  }
  for (int e = lane; e < c.n_experts; e += 32) {
    const T v = s.scores[e];
    out[e] = v;
    s.keys[e] = selection_key(bias ? add_rn(v, bias[e]) : v);
  }
  __syncwarp();
}

// Marks the candidate experts: those of the best topk_group groups (every expert when all
// groups are kept).
template <class T>
__device__ void select_groups(const RouterShape& c, ForwardSlice<T> s) {
  const int lane = threadIdx.x % 32;
  const bool all = c.topk_group == c.n_group;
  for (int e = lane; e < c.n_experts; e += 32) s.selected[e] = all ? 1 : 0;
  if (all) {
    __syncwarp();
    return;
  }
  for (int g = lane; g < c.n_group; g += 32) s.groups[g] = group_score(s.keys + g * c.group_size, c.group_size);
  __syncwarp();
  for (int round = 0; round < c.topk_group; ++round) {
    Best<T> best = no_best<T>();
    // A group is taken once its experts are marked, so its first expert's flag tells.
    for (int g = lane; g < c.n_group; g += 32) {
      if (!s.selected[g * c.group_size]) best.consider(s.groups[g], g);
    }
    best = warp_best(best);
    __syncwarp();  // every lane has read the flags before they change
    for (int j = lane; j < c.group_size; j += 32) s.selected[best.index * c.group_size + j] = 1;
    __syncwarp();
  }
}

template <class T>
__global__ void router_forward_kernel(RouterShape c, const T* logits, const T* bias, T* scores, int32_t* expert_ids,
                                      T* weights, int64_t tokens) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= tokens) return;  // warp-uniform; the kernel has no block-wide barrier
  const int lane = threadIdx.x % 32;
  const ForwardSlice<T> s = forward_slice<T>(smem, c);
  compute_scores(c, logits + t * c.n_experts, bias, s, scores + t * c.n_experts);
  select_groups(c, s);

  int32_t* ids = expert_ids + t * c.top_k;
  T sum = static_cast<T>(kNormEps);  // lane 0's running Σ of the chosen scores, in choice order
  for (int k = 0; k < c.top_k; ++k) {
    Best<T> best = no_best<T>();
    for (int e = lane; e < c.n_experts; e += 32) {
      if (s.selected[e]) best.consider(s.keys[e], e);
    }
    best = warp_best(best);
    __syncwarp();
    if (lane == 0) {
      s.selected[best.index] = 0;
      ids[k] = best.index;
      sum = add_rn(sum, s.scores[best.index]);
    }
    __syncwarp();
  }
  if (lane != 0) return;
  const T scale = static_cast<T>(c.routed_scaling_factor);
  T* w = weights + t * c.top_k;
  for (int k = 0; k < c.top_k; ++k) {
    const T v = s.scores[ids[k]];
    w[k] = c.norm_topk_prob ? mul_rn(div_rn(v, sum), scale) : mul_rn(v, scale);
  }
}

// dlogits of one token per warp; ds is the warp's [E] slice of dynamic shared memory.
template <class T>
__global__ void router_backward_kernel(RouterShape c, const T* scores, const int32_t* expert_ids, const T* dweights,
                                       T* dlogits, int64_t tokens, DeviceErrorRecord* errors) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= tokens) return;
  const int lane = threadIdx.x % 32;
  const int E = c.n_experts;
  T* ds = reinterpret_cast<T*>(smem) + static_cast<size_t>(E) * (threadIdx.x / 32);
  const T* s = scores + t * E;
  const int32_t* ids = expert_ids + t * c.top_k;
  const T* dw = dweights + t * c.top_k;
  for (int e = lane; e < E; e += 32) ds[e] = T(0);
  __syncwarp();
  if (lane == 0) {  // the CPU's gate_weights_backward, in its order (K is small)
    const T scale = static_cast<T>(c.routed_scaling_factor);
    const auto valid = [&](int k) {
      const int32_t id = ids[k];
      if (id >= 0 && id < E) return true;
      report_device_error(errors, DeviceErrorCode::router_backward_id, id, E);
      return false;
    };
    if (!c.norm_topk_prob) {
      for (int k = 0; k < c.top_k; ++k) {
        if (valid(k)) ds[ids[k]] = mul_rn(scale, dw[k]);
      }
    } else {
      T sum = static_cast<T>(kNormEps);
      T weighted = 0;
      for (int k = 0; k < c.top_k; ++k) {
        if (!valid(k)) continue;
        sum = add_rn(sum, s[ids[k]]);
        weighted = add_rn(weighted, mul_rn(dw[k], s[ids[k]]));
      }
      const T mean_dw = div_rn(weighted, sum);
      for (int k = 0; k < c.top_k; ++k) {
        if (ids[k] >= 0 && ids[k] < E) ds[ids[k]] = div_rn(mul_rn(scale, sub_rn(dw[k], mean_dw)), sum);
      }
    }
  }
  __syncwarp();
  T dot = 0;
  if (!c.sigmoid) {
    for (int e = lane; e < E; e += 32) dot = add_rn(dot, mul_rn(ds[e], s[e]));
    dot = warp_sum(dot);
  }
  T* dl = dlogits + t * E;
  for (int e = lane; e < E; e += 32) {
    const T v = s[e];
    dl[e] = c.sigmoid ? mul_rn(mul_rn(ds[e], v), sub_rn(T(1), v)) : mul_rn(v, sub_rn(ds[e], dot));
  }
}

// counts[(a / ids_per_group) * n_experts + id] += 1 over the ids; n_experts counters per group
// (expert_counts: one group; the balance loss: one per sequence). An out-of-range id is skipped
// and reported: through first_bad (the lowest bad position, atomicMin) and/or the error record.
template <class I>
__global__ void count_ids_kernel(const I* ids, int64_t n, int64_t ids_per_group, int64_t n_experts, int64_t groups,
                                 unsigned long long* counts, long long* first_bad, DeviceErrorRecord* errors,
                                 DeviceErrorCode code) {
  extern __shared__ unsigned int histogram[];  // groups * n_experts counters when used
  const bool shared = groups * n_experts <= kSharedHistogramExperts;
  if (shared) {
    for (int64_t i = threadIdx.x; i < groups * n_experts; i += blockDim.x) histogram[i] = 0;
    __syncthreads();
  }
  DSX_GRID_STRIDE_LOOP(a, n) {
    const int64_t id = static_cast<int64_t>(ids[a]);
    if (id < 0 || id >= n_experts) {
      if (first_bad) atomicMin(first_bad, static_cast<long long>(a));
      if (errors) report_device_error(errors, code, id, n_experts);
      continue;
    }
    const int64_t slot = (a / ids_per_group) * n_experts + id;
    if (shared) {
      atomicAdd(&histogram[slot], 1u);
    } else {
      atomicAdd(&counts[slot], 1ull);
    }
  }
  if (shared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < groups * n_experts; i += blockDim.x) {
      if (histogram[i] != 0) atomicAdd(&counts[i], static_cast<unsigned long long>(histogram[i]));
    }
  }
}

// One block: mean load in double (integer counts below 2^53 sum exactly, in any order), then
// the CPU's ±gamma step.
template <class I, class T>
__global__ void update_bias_kernel(const I* counts, T* bias, int64_t n_experts, T step) {
  double partial = 0;
  for (int64_t e = threadIdx.x; e < n_experts; e += blockDim.x) partial += static_cast<double>(counts[e]);
  const double mean = block_sum(partial) / static_cast<double>(n_experts);
  for (int64_t e = threadIdx.x; e < n_experts; e += blockDim.x) {
    const double load = static_cast<double>(counts[e]);
    if (load > mean) bias[e] = sub_rn(bias[e], step);
    if (load < mean) bias[e] = add_rn(bias[e], step);
  }
}

// term[t] = Σ_e f_{seq,e} s_{t,e} / Σ_e s_{t,e} in double, one warp per token.
template <class T>
__global__ void balance_terms_kernel(const T* scores, const unsigned long long* counts, int64_t tokens,
                                     int64_t tokens_per_seq, int n_experts, double unit, double* terms) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= tokens) return;
  const int lane = threadIdx.x % 32;
  const T* row = scores + t * n_experts;
  const unsigned long long* n = counts + (t / tokens_per_seq) * n_experts;
  double sum = 0, weighted = 0;
  for (int e = lane; e < n_experts; e += 32) {
    const double v = static_cast<double>(row[e]);
    sum += v;
    weighted += static_cast<double>(n[e]) * unit * v;
  }
  sum = warp_sum(sum);
  weighted = warp_sum(weighted);
  if (lane == 0) terms[t] = weighted / sum;
}

// One block: Σ values in a fixed order (each thread a fixed strided subset, then the block tree).
__global__ void ordered_sum_kernel(const double* values, int64_t n, double* out) {
  double partial = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) partial += values[i];
  const double total = block_sum(partial);
  if (threadIdx.x == 0) *out = total;
}

// dlogits += ∂loss/∂logits of one token per warp (see the CPU op for the formulas);
// g_e = counts · unit · coefficient.
template <class T>
__global__ void balance_backward_kernel(bool sigmoid, const T* scores, const unsigned long long* counts, int64_t tokens,
                                        int64_t tokens_per_seq, int n_experts, double g_unit, T* dlogits) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= tokens) return;
  const int lane = threadIdx.x % 32;
  const T* row = scores + t * n_experts;
  const unsigned long long* n = counts + (t / tokens_per_seq) * n_experts;
  const auto g = [&](int e) { return static_cast<double>(n[e]) * g_unit; };
  double sum = 0, weighted = 0;
  for (int e = lane; e < n_experts; e += 32) {
    const double v = static_cast<double>(row[e]);
    sum += v;
    weighted += g(e) * v;
  }
  sum = warp_sum(sum);
  const double mean_g = warp_sum(weighted) / sum;
  const auto dscore = [&](int e) { return static_cast<T>((g(e) - mean_g) / sum); };
  T dot = 0;
  if (!sigmoid) {
    for (int e = lane; e < n_experts; e += 32) dot = add_rn(dot, mul_rn(dscore(e), row[e]));
    dot = warp_sum(dot);
  }
  T* dl = dlogits + t * n_experts;
  for (int e = lane; e < n_experts; e += 32) {
    const T v = row[e];
    const T d = sigmoid ? mul_rn(mul_rn(dscore(e), v), sub_rn(T(1), v)) : mul_rn(v, sub_rn(dscore(e), dot));
    dl[e] = add_rn(dl[e], d);
  }
}

// ============================================================================================
// launchers
// ============================================================================================

void check_config(const RouterConfig& c, std::string_view op) {
  const auto s = [](int64_t v) { return std::to_string(v); };
  check(c.n_experts >= 1, op, [&] { return "n_experts must be >= 1, got " + s(c.n_experts); });
  check(c.n_group >= 1, op, [&] { return "n_group must be >= 1, got " + s(c.n_group); });
  check(c.n_experts % c.n_group == 0, op,
        [&] { return "n_experts (" + s(c.n_experts) + ") must be a multiple of n_group (" + s(c.n_group) + ")"; });
  check(c.topk_group >= 1 && c.topk_group <= c.n_group, op,
        [&] { return "topk_group must be in [1, n_group = " + s(c.n_group) + "], got " + s(c.topk_group); });
  const int64_t kept_experts = c.topk_group * (c.n_experts / c.n_group);
  check(c.top_k >= 1 && c.top_k <= kept_experts, op, [&] {
    return "top_k must be in [1, topk_group * n_experts / n_group = " + s(kept_experts) + "], got " + s(c.top_k);
  });
  check(std::isfinite(c.routed_scaling_factor), op, "routed_scaling_factor must be finite");
  // Beyond the CPU's checks: what the one-warp-per-token kernels can hold.
  check(c.n_experts <= (1 << 20), op, [&] { return "n_experts " + s(c.n_experts) + " is too large for the GPU"; });
}

RouterShape router_shape(const RouterConfig& c) {
  return {static_cast<int>(c.n_experts),
          static_cast<int>(c.top_k),
          static_cast<int>(c.n_group),
          static_cast<int>(c.topk_group),
          static_cast<int>(c.n_experts / c.n_group),
          c.scoring == RouterConfig::Scoring::sigmoid,
          c.norm_topk_prob,
          c.routed_scaling_factor};
}

int64_t check_token_matrix(const RouterConfig& c, const Tensor& t, std::string_view op, std::string_view name) {
  check_on_gpu(t, op, name);
  check(t.ndim() == 2 && t.dim(1) == c.n_experts, op, [&] {
    return std::string(name) + " must be [T, n_experts = " + std::to_string(c.n_experts) + "], got " +
           shape_str(t.shape());
  });
  return t.dim(0);
}

void check_expert_ids(const RouterConfig& c, const Tensor& ids, int64_t tokens, std::string_view op) {
  check_on_gpu(ids, op, "expert_ids");
  check(ids.dtype() == DType::i32, op, [&] { return "expert_ids must be i32, got " + ids.describe(); });
  check_shape(ids, {tokens, c.top_k}, op, "expert_ids");
}

// Warps per block for a per-warp shared slice of `bytes`: up to kWarpsPerBlock within the
// default 48 KiB; a wider router gets one warp per block and, past 48 KiB, opts the kernel in to
// the device's larger shared memory (227 KiB on H100). Throws when one warp's slice cannot fit.
template <class Kernel>
int warps_for_slice(Kernel kernel, size_t bytes, int64_t n_experts, std::string_view op) {
  if (bytes <= kMaxSharedBytes) {
    const size_t fit = kMaxSharedBytes / bytes;
    return static_cast<int>(fit < kWarpsPerBlock ? fit : kWarpsPerBlock);
  }
  int optin = 0;
  DSX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, current_device()));
  check(bytes <= static_cast<size_t>(optin), op, [&] {
    return "n_experts = " + std::to_string(n_experts) + " needs " + std::to_string(bytes) +
           " bytes of shared memory per token, more than the GPU's " + std::to_string(optin);
  });
  DSX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return 1;
}

unsigned blocks_of_warps(int64_t tokens, int warps) {
  return static_cast<unsigned>((tokens + warps - 1) / warps);
}

// Per-group expert counts (u64 on the device) of ids, a contiguous tensor of n ids, into
// counts [groups · n_experts] (zeroed here).
void count_ids(const Tensor& ids, int64_t n_experts, int64_t ids_per_group, int64_t groups, void* counts,
               long long* first_bad, DeviceErrorRecord* errors, DeviceErrorCode code, std::string_view op) {
  const int64_t slots = groups * n_experts;
  zero_bytes(counts, static_cast<size_t>(slots) * sizeof(unsigned long long));
  const int64_t n = ids.numel();
  if (n == 0) return;
  const size_t shared = slots <= kSharedHistogramExperts ? static_cast<size_t>(slots) * sizeof(unsigned int) : 0;
  unsigned blocks = grid_for(n);
  if (blocks > 264) blocks = 264;  // each block flushes its whole histogram: keep their number moderate
  dispatch_index(ids.dtype(), op, [&]<class I>() {
    count_ids_kernel<I><<<blocks, kBlock, shared, current_stream()>>>(
        static_cast<const I*>(ids.raw()), n, ids_per_group, n_experts, groups, static_cast<unsigned long long*>(counts),
        first_bad, errors, code);
    DSX_CUDA_CHECK_LAUNCH("count_ids_kernel");
  });
}

void check_balance_inputs(const RouterConfig& c, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                          std::string_view op) {
  check_config(c, op);
  const int64_t tokens = check_token_matrix(c, scores, op, "scores");
  check(n_seq >= 1 && tokens % n_seq == 0, op, [&] {
    return "n_seq (" + std::to_string(n_seq) + ") must be >= 1 and divide the token count " + std::to_string(tokens);
  });
  check_expert_ids(c, expert_ids, tokens, op);
}

}  // namespace

void router_forward(const RouterConfig& config, const Tensor& logits, const Tensor& bias, Tensor& scores,
                    Tensor& expert_ids, Tensor& weights) {
  constexpr std::string_view op = "router_forward";
  check_config(config, op);
  const int64_t tokens = check_token_matrix(config, logits, op, "logits");
  check_on_gpu(scores, op, "scores");
  check_on_gpu(expert_ids, op, "expert_ids");
  check_on_gpu(weights, op, "weights");
  check_shape(scores, logits.shape(), op, "scores");
  check_shape(expert_ids, {tokens, config.top_k}, op, "expert_ids");
  check_shape(weights, {tokens, config.top_k}, op, "weights");
  check(expert_ids.dtype() == DType::i32, op, [&] { return "expert_ids must be i32, got " + expert_ids.describe(); });
  check(scores.dtype() == logits.dtype() && weights.dtype() == logits.dtype(), op,
        [&] { return "scores and weights must share the logits dtype " + logits.describe(); });
  if (bias.defined()) {
    check_on_gpu(bias, op, "bias");
    check_shape(bias, {config.n_experts}, op, "bias");
    check(bias.dtype() == logits.dtype(), op, [&] { return "bias must share the logits dtype " + logits.describe(); });
  }
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    if (tokens == 0) return;
    const RouterShape c = router_shape(config);
    const size_t slice = forward_slice_bytes<T>(c.n_experts, c.n_group);
    const int warps = warps_for_slice(router_forward_kernel<T>, slice, config.n_experts, op);
    router_forward_kernel<T><<<blocks_of_warps(tokens, warps), warps * 32, slice * warps, current_stream()>>>(
        c, logits.data<T>(), bias.defined() ? bias.data<T>() : nullptr, scores.data<T>(), expert_ids.data<int32_t>(),
        weights.data<T>(), tokens);
    DSX_CUDA_CHECK_LAUNCH("router_forward_kernel");
  });
}

void router_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, const Tensor& dweights,
                     Tensor& dlogits) {
  constexpr std::string_view op = "router_backward";
  check_config(config, op);
  const int64_t tokens = check_token_matrix(config, scores, op, "scores");
  check_expert_ids(config, expert_ids, tokens, op);
  check_on_gpu(dweights, op, "dweights");
  check_on_gpu(dlogits, op, "dlogits");
  check_shape(dweights, {tokens, config.top_k}, op, "dweights");
  check_shape(dlogits, scores.shape(), op, "dlogits");
  check(dweights.dtype() == scores.dtype() && dlogits.dtype() == scores.dtype(), op,
        [&] { return "dweights and dlogits must share the scores dtype " + scores.describe(); });
  dispatch_float(scores.dtype(), op, [&]<class T>() {
    if (tokens == 0) return;
    const size_t slice = static_cast<size_t>(config.n_experts) * sizeof(T);
    const int warps = warps_for_slice(router_backward_kernel<T>, slice, config.n_experts, op);
    router_backward_kernel<T><<<blocks_of_warps(tokens, warps), warps * 32, slice * warps, current_stream()>>>(
        router_shape(config), scores.data<T>(), expert_ids.data<int32_t>(), dweights.data<T>(), dlogits.data<T>(),
        tokens, device_error_record());
    DSX_CUDA_CHECK_LAUNCH("router_backward_kernel");
  });
}

void expert_counts(const Tensor& expert_ids, int64_t n_experts, Tensor& counts) {
  constexpr std::string_view op = "expert_counts";
  check_on_gpu(expert_ids, op, "expert_ids");
  check_on_gpu(counts, op, "counts");
  check(n_experts >= 1, op, [&] { return "n_experts must be >= 1, got " + std::to_string(n_experts); });
  check_shape(counts, {n_experts}, op, "counts");
  check(counts.dtype() == DType::i64, op, [&] { return "counts must be i64, got " + counts.describe(); });
  check(expert_ids.dtype() == DType::i32 || expert_ids.dtype() == DType::i64, op,
        [&] { return "dtype " + std::string(dtype_name(expert_ids.dtype())) + " is not supported"; });
  count_ids(expert_ids, n_experts, std::max<int64_t>(expert_ids.numel(), 1), 1, counts.raw(), nullptr,
            device_error_record(), DeviceErrorCode::expert_counts_id, op);
}

void router_update_bias(const Tensor& counts, double gamma, Tensor& bias) {
  constexpr std::string_view op = "router_update_bias";
  check_on_gpu(counts, op, "counts");
  check_on_gpu(bias, op, "bias");
  check(bias.ndim() == 1, op, [&] { return "bias must be 1-D [E], got " + shape_str(bias.shape()); });
  check_shape(counts, bias.shape(), op, "counts");
  check(std::isfinite(gamma) && gamma >= 0, op,
        [&] { return "gamma must be finite and >= 0, got " + std::to_string(gamma); });
  dispatch_index(counts.dtype(), op, [&]<class I>() {
    dispatch_float(bias.dtype(), op, [&]<class T>() {
      if (bias.numel() == 0) return;
      update_bias_kernel<I, T>
          <<<1, 1024, 0, current_stream()>>>(counts.data<I>(), bias.data<T>(), bias.numel(), static_cast<T>(gamma));
      DSX_CUDA_CHECK_LAUNCH("update_bias_kernel");
    });
  });
}

double balance_loss_forward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                            double alpha) {
  constexpr std::string_view op = "balance_loss_forward";
  check_balance_inputs(config, scores, expert_ids, n_seq, op);
  const int64_t tokens = scores.dim(0);
  if (tokens == 0) return 0.0;
  const int64_t tokens_per_seq = tokens / n_seq;
  const int64_t n_ids = expert_ids.numel();
  // [0] = the lowest position of an out-of-range id (n_ids when none), [1] = the loss sum.
  Tensor result = Tensor::empty({2}, DType::i64, Device::cuda);
  auto* first_bad = static_cast<long long*>(result.raw());
  auto* total = reinterpret_cast<double*>(first_bad + 1);
  fill_elements(first_bad, DType::i64, static_cast<double>(n_ids), 1);
  Tensor counts = Tensor::empty({n_seq * config.n_experts}, DType::i64, Device::cuda);
  count_ids(expert_ids, config.n_experts, tokens_per_seq * config.top_k, n_seq, counts.raw(), first_bad, nullptr,
            DeviceErrorCode::none, op);
  Tensor terms = Tensor::empty({tokens}, DType::f64, Device::cuda);
  const double unit = static_cast<double>(config.n_experts) / static_cast<double>(config.top_k * tokens_per_seq);
  dispatch_float(scores.dtype(), op, [&]<class T>() {
    balance_terms_kernel<T><<<blocks_of_warps(tokens, kWarpsPerBlock), kWarpsPerBlock * 32, 0, current_stream()>>>(
        scores.data<T>(), static_cast<const unsigned long long*>(counts.raw()), tokens, tokens_per_seq,
        static_cast<int>(config.n_experts), unit, terms.data<double>());
    DSX_CUDA_CHECK_LAUNCH("balance_terms_kernel");
  });
  ordered_sum_kernel<<<1, 1024, 0, current_stream()>>>(terms.data<double>(), tokens, total);
  DSX_CUDA_CHECK_LAUNCH("ordered_sum_kernel");
  int64_t host[2];
  copy_bytes(host, Device::cpu, result.raw(), Device::cuda, sizeof(host));
  if (host[0] < n_ids) {
    int32_t id = 0;
    copy_bytes(&id, Device::cpu, expert_ids.data<int32_t>() + host[0], Device::cuda, sizeof(id));
    check(false, op, "expert id " + std::to_string(id) + " out of range [0, " + std::to_string(config.n_experts) + ")");
  }
  check_device_errors();
  double loss_sum = 0;
  std::memcpy(&loss_sum, &host[1], sizeof(loss_sum));
  return alpha * loss_sum / static_cast<double>(n_seq * tokens_per_seq);
}

void balance_loss_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                           double alpha, double dloss, Tensor& dlogits) {
  constexpr std::string_view op = "balance_loss_backward";
  check_balance_inputs(config, scores, expert_ids, n_seq, op);
  check_on_gpu(dlogits, op, "dlogits");
  check_shape(dlogits, scores.shape(), op, "dlogits");
  check(dlogits.dtype() == scores.dtype(), op,
        [&] { return "dlogits must share the scores dtype " + scores.describe(); });
  const int64_t tokens = scores.dim(0);
  if (tokens == 0) return;
  const int64_t tokens_per_seq = tokens / n_seq;
  Tensor counts = Tensor::empty({n_seq * config.n_experts}, DType::i64, Device::cuda);
  count_ids(expert_ids, config.n_experts, tokens_per_seq * config.top_k, n_seq, counts.raw(), nullptr,
            device_error_record(), DeviceErrorCode::balance_loss_backward_id, op);
  const double unit = static_cast<double>(config.n_experts) / static_cast<double>(config.top_k * tokens_per_seq);
  const double coefficient = dloss * alpha / static_cast<double>(n_seq * tokens_per_seq);
  dispatch_float(scores.dtype(), op, [&]<class T>() {
    balance_backward_kernel<T><<<blocks_of_warps(tokens, kWarpsPerBlock), kWarpsPerBlock * 32, 0, current_stream()>>>(
        config.scoring == RouterConfig::Scoring::sigmoid, scores.data<T>(),
        static_cast<const unsigned long long*>(counts.raw()), tokens, tokens_per_seq,
        static_cast<int>(config.n_experts), unit * coefficient, dlogits.data<T>());
    DSX_CUDA_CHECK_LAUNCH("balance_backward_kernel");
  });
}

}  // namespace dsx::cuda
