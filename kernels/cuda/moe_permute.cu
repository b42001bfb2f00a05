// Dropless MoE token permutation on the GPU (kernels/ops/moe_permute.h has the semantics).
//
// dtypes: moe_permute any dtype (a row copy of bytes); the other three f32 or f64, one dtype per
// call, as on the CPU. Expert ids i32 or i64.
//
// Thread mapping:
//  - moe_plan: one pass over the ids (grid-stride; per-block shared-memory histogram of the
//    expert counts, range check with the lowest bad position kept by atomicMin), then
//    cub::DeviceRadixSort::SortPairs on (expert id, assignment index): LSD radix sort is stable,
//    so each expert's segment lists its assignments in increasing t·K + k, the CPU's order.
//    The counts come to the host once (the op's only synchronisation) for expert_offsets and
//    for the range check, which throws exactly like the CPU op.
//  - plan contents in the four row ops: the inverse permutation row_of[t·K + k] is built on the
//    device (grid-stride scatter with atomicExch into a -1-filled buffer): an out-of-range or
//    repeated entry is recorded for check_device_errors() (device_checks.h) instead of
//    synchronising, and the row kernels skip the rows such a plan leaves unmapped, so a bad plan
//    never makes them index out of range. Plans made by moe_plan are always valid.
//  - moe_permute: one block per permuted row, copying with the widest vector (16, 8, 4, 2 or 1
//    bytes) that the row size and both base addresses allow.
//  - moe_permute_backward, moe_unpermute, moe_unpermute_backward: one block per token, threads
//    over D (coalesced); the K rows are summed in k order from 0 as on the CPU; the weight
//    gradient's dot product is accumulated in double and reduced with block_sum.
#include <cub/cub.cuh>

#include <initializer_list>
#include <string>
#include <vector>

#include "kernels/cuda/device_checks.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_moe.h"
#include "kernels/dispatch.h"

namespace dsx::cuda {
namespace {

// Experts up to which moe_plan counts in a shared-memory histogram (32 KiB of counters).
constexpr int64_t kSharedHistogramExperts = 8192;
constexpr int kRowBlock = 256;
// Blocks of the one-block-per-row kernels; more rows are covered by a block-stride loop.
constexpr int64_t kMaxRowBlocks = 1 << 20;

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(rows < 1 ? 1 : (rows > kMaxRowBlocks ? kMaxRowBlocks : rows));
}

// ============================================================================================
// kernels
// ============================================================================================

// keys[a] = the expert id (n_experts for an out-of-range id, which sorts last), values[a] = a,
// counts[id] += 1; first_bad = the lowest position of an out-of-range id (atomicMin).
template <class I>
__global__ void plan_prepare_kernel(const I* ids, int64_t n, int64_t n_experts, uint32_t* keys, int64_t* values,
                                    unsigned long long* counts, long long* first_bad) {
  extern __shared__ unsigned int histogram[];
  const bool shared = n_experts <= kSharedHistogramExperts;
  if (shared) {
    for (int64_t i = threadIdx.x; i < n_experts; i += blockDim.x) histogram[i] = 0;
    __syncthreads();
  }
  DSX_GRID_STRIDE_LOOP(a, n) {
    const int64_t id = static_cast<int64_t>(ids[a]);
    values[a] = a;
    if (id < 0 || id >= n_experts) {
      keys[a] = static_cast<uint32_t>(n_experts);
      atomicMin(first_bad, static_cast<long long>(a));
      continue;
    }
    keys[a] = static_cast<uint32_t>(id);
    if (shared) {
      atomicAdd(&histogram[id], 1u);
    } else {
      atomicAdd(&counts[id], 1ull);
    }
  }
  if (shared) {
    __syncthreads();
    for (int64_t i = threadIdx.x; i < n_experts; i += blockDim.x) {
      if (histogram[i] != 0) atomicAdd(&counts[i], static_cast<unsigned long long>(histogram[i]));
    }
  }
}

// row_of[assignment[r]] = r over a -1-filled row_of; anything that makes assignment not a
// permutation of [0, n) is recorded (the value, the row) and not written out of range.
__global__ void invert_plan_kernel(const int64_t* assignment, int64_t n, int64_t* row_of, DeviceErrorRecord* errors,
                                   DeviceErrorCode code) {
  DSX_GRID_STRIDE_LOOP(r, n) {
    const int64_t a = assignment[r];
    if (a < 0 || a >= n) {
      report_device_error(errors, code, a, r);
      continue;
    }
    const auto previous =
        atomicExch(reinterpret_cast<unsigned long long*>(row_of + a), static_cast<unsigned long long>(r));
    if (previous != ~0ull) report_device_error(errors, code, a, r);
  }
}

// xp[r] = x[assignment[r] / top_k], rows of row_vectors V-sized pieces.
template <class V>
__global__ void permute_rows_kernel(const V* x, V* xp, const int64_t* assignment, int64_t rows, int64_t top_k,
                                    int64_t row_vectors) {
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t a = assignment[r];
    if (a < 0 || a >= rows) continue;  // an invalid plan, recorded by invert_plan_kernel
    const V* src = x + (a / top_k) * row_vectors;
    V* dst = xp + r * row_vectors;
    for (int64_t j = threadIdx.x; j < row_vectors; j += blockDim.x) dst[j] = src[j];
  }
}

// dx[t] = Σ_k dxp[row_of[t·K + k]], summed from 0 in k order (the CPU's order).
template <class T>
__global__ void permute_backward_kernel(const T* dxp, const int64_t* row_of, T* dx, int64_t tokens, int64_t top_k,
                                        int64_t d) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t* rows = row_of + t * top_k;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      T acc = T(0);
      for (int64_t k = 0; k < top_k; ++k) {
        if (rows[k] >= 0) acc += dxp[rows[k] * d + j];
      }
      dx[t * d + j] = acc;
    }
  }
}

// y[t] = Σ_k weights[t, k] · yp[row_of[t·K + k]], in k order from 0.
template <class T>
__global__ void unpermute_kernel(const T* yp, const T* weights, const int64_t* row_of, T* y, int64_t tokens,
                                 int64_t top_k, int64_t d) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const int64_t* rows = row_of + t * top_k;
    const T* w = weights + t * top_k;
    for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
      T acc = T(0);
      for (int64_t k = 0; k < top_k; ++k) {
        if (rows[k] >= 0) acc += w[k] * yp[rows[k] * d + j];
      }
      y[t * d + j] = acc;
    }
  }
}

// dyp[row] = w · dy[t]; dweights[t, k] = <dy[t], yp[row]> in double. Every thread of the block
// runs every (t, k) iteration, as block_sum requires.
template <class T>
__global__ void unpermute_backward_kernel(const T* dy, const T* yp, const T* weights, const int64_t* row_of, T* dyp,
                                          T* dweights, int64_t tokens, int64_t top_k, int64_t d) {
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    const T* g = dy + t * d;
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t row = row_of[t * top_k + k];
      const T w = weights[t * top_k + k];
      double dot = 0;
      if (row >= 0) {
        const T* src = yp + row * d;
        T* dst = dyp + row * d;
        for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
          dst[j] = w * g[j];
          dot += static_cast<double>(g[j]) * static_cast<double>(src[j]);
        }
      }
      dot = block_sum(dot);
      if (threadIdx.x == 0) dweights[t * top_k + k] = static_cast<T>(dot);
    }
  }
}

// ============================================================================================
// launchers
// ============================================================================================

// The host-side checks of the CPU's permuted_rows, then row_of built and validated on the device.
Tensor plan_rows(const MoePlan& plan, std::string_view op, DeviceErrorCode code) {
  check(plan.n_tokens >= 0 && plan.top_k >= 1, op,
        [&] { return "plan has n_tokens " + std::to_string(plan.n_tokens) + ", top_k " + std::to_string(plan.top_k); });
  const int64_t n = plan.n_tokens * plan.top_k;
  check_on_gpu(plan.assignment, op, "plan.assignment");
  check(plan.assignment.dtype() == DType::i64, op, "plan.assignment must be i64");
  check_shape(plan.assignment, {n}, op, "plan.assignment");
  Tensor row_of = Tensor::empty({n}, DType::i64, Device::cuda);
  if (n == 0) return row_of;
  DSX_CUDA_CHECK(cudaMemsetAsync(row_of.raw(), 0xff, row_of.nbytes(), current_stream()));  // all -1
  invert_plan_kernel<<<grid_for(n), kBlock, 0, current_stream()>>>(plan.assignment.data<int64_t>(), n,
                                                                   row_of.data<int64_t>(), device_error_record(), code);
  DSX_CUDA_CHECK_LAUNCH("invert_plan_kernel");
  return row_of;
}

int64_t check_rows(const Tensor& t, int64_t rows, std::string_view op, std::string_view name) {
  check_on_gpu(t, op, name);
  check(t.ndim() == 2 && t.dim(0) == rows, op,
        [&] { return std::string(name) + " must be [" + std::to_string(rows) + ", D], got " + shape_str(t.shape()); });
  return t.dim(1);
}

void check_same_dtype(const Tensor& a, const Tensor& b, std::string_view op) {
  check(a.dtype() == b.dtype(), op, [&] { return a.describe() + " and " + b.describe() + " must share a dtype"; });
}

// The widest copy unit dividing the row size and both addresses' alignment.
size_t copy_width(size_t row_bytes, const void* a, const void* b) {
  const auto address_bits = reinterpret_cast<uintptr_t>(a) | reinterpret_cast<uintptr_t>(b);
  for (size_t w = 16; w > 1; w /= 2) {
    if (row_bytes % w == 0 && address_bits % w == 0) return w;
  }
  return 1;
}

template <class V>
void launch_permute_rows(const void* x, void* xp, const int64_t* assignment, int64_t rows, int64_t top_k,
                         size_t row_bytes) {
  const int64_t row_vectors = static_cast<int64_t>(row_bytes / sizeof(V));
  permute_rows_kernel<V><<<row_blocks(rows), kRowBlock, 0, current_stream()>>>(
      static_cast<const V*>(x), static_cast<V*>(xp), assignment, rows, top_k, row_vectors);
  DSX_CUDA_CHECK_LAUNCH("permute_rows_kernel");
}

}  // namespace

MoePlan moe_plan(const Tensor& expert_ids, int64_t n_experts) {
  constexpr std::string_view op = "moe_plan";
  check_on_gpu(expert_ids, op, "expert_ids");
  check(expert_ids.ndim() == 2, op, [&] { return "expert_ids must be [T, K], got " + shape_str(expert_ids.shape()); });
  check(n_experts >= 1, op, [&] { return "n_experts must be >= 1, got " + std::to_string(n_experts); });
  MoePlan plan;
  plan.n_tokens = expert_ids.dim(0);
  plan.top_k = expert_ids.dim(1);
  check(plan.top_k >= 1, op, "expert_ids has no choices per token");
  check(expert_ids.dtype() == DType::i32 || expert_ids.dtype() == DType::i64, op,
        [&] { return "dtype " + std::string(dtype_name(expert_ids.dtype())) + " is not supported"; });
  // Sort keys are i32 and n_experts itself marks a bad id.
  check(n_experts < (int64_t{1} << 30), op, [&] { return "n_experts " + std::to_string(n_experts) + " is too large"; });
  const int64_t n = plan.n_tokens * plan.top_k;
  plan.assignment = Tensor::empty({n}, DType::i64, Device::cuda);
  plan.expert_offsets.assign(static_cast<size_t>(n_experts + 1), 0);
  if (n == 0) return plan;

  // state = [counts (n_experts) | lowest bad position]
  Tensor state = Tensor::empty({n_experts + 1}, DType::i64, Device::cuda);
  auto* counts = static_cast<unsigned long long*>(state.raw());
  auto* first_bad = reinterpret_cast<long long*>(counts + n_experts);
  zero_bytes(counts, static_cast<size_t>(n_experts) * sizeof(unsigned long long));
  fill_elements(first_bad, DType::i64, static_cast<double>(n), 1);
  // Unsigned sort keys (stored in i32 tensors): no sign-bit twiddling to think about.
  Tensor keys = Tensor::empty({n}, DType::i32, Device::cuda);
  Tensor sorted_keys = Tensor::empty({n}, DType::i32, Device::cuda);
  auto* keys_in = static_cast<uint32_t*>(keys.raw());
  auto* keys_out = static_cast<uint32_t*>(sorted_keys.raw());
  Tensor order = Tensor::empty({n}, DType::i64, Device::cuda);
  const size_t shared = n_experts <= kSharedHistogramExperts ? static_cast<size_t>(n_experts) * sizeof(unsigned) : 0;
  unsigned blocks = grid_for(n);
  if (blocks > 264) blocks = 264;  // each block flushes its histogram
  dispatch_index(expert_ids.dtype(), op, [&]<class I>() {
    plan_prepare_kernel<I><<<blocks, kBlock, shared, current_stream()>>>(expert_ids.data<I>(), n, n_experts, keys_in,
                                                                         order.data<int64_t>(), counts, first_bad);
    DSX_CUDA_CHECK_LAUNCH("plan_prepare_kernel");
  });
  int end_bit = 1;  // keys are in [0, n_experts]
  while ((int64_t{1} << end_bit) <= n_experts) ++end_bit;
  size_t temp_bytes = 0;
  DSX_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_out, order.data<int64_t>(),
                                                 plan.assignment.data<int64_t>(), n, 0, end_bit, current_stream()));
  Tensor temp = Tensor::empty({static_cast<int64_t>(temp_bytes / 8 + 1)}, DType::i64, Device::cuda);
  DSX_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.raw(), temp_bytes, keys_in, keys_out, order.data<int64_t>(),
                                                 plan.assignment.data<int64_t>(), n, 0, end_bit, current_stream()));

  std::vector<int64_t> host(static_cast<size_t>(n_experts + 1));
  copy_bytes(host.data(), Device::cpu, state.raw(), Device::cuda, state.nbytes());  // waits
  if (host[n_experts] < n) {
    const Tensor bad = expert_ids.view({n}).slice(host[n_experts], host[n_experts] + 1).to(Device::cpu);
    check(false, op, [&] {
      return "expert id " + std::to_string(static_cast<int64_t>(bad.item())) + " out of range [0, " +
             std::to_string(n_experts) + ")";
    });
  }
  for (int64_t e = 0; e < n_experts; ++e) plan.expert_offsets[e + 1] = plan.expert_offsets[e] + host[e];
  check_device_errors();  // the stream is synchronised already: report what earlier MoE calls found
  return plan;
}

void moe_permute(const Tensor& x, const MoePlan& plan, Tensor& xp) {
  constexpr std::string_view op = "moe_permute";
  const Tensor row_of = plan_rows(plan, op, DeviceErrorCode::moe_permute_plan);  // validates the plan
  const int64_t d = check_rows(x, plan.n_tokens, op, "x");
  check_on_gpu(xp, op, "xp");
  check_shape(xp, {plan.n_tokens * plan.top_k, d}, op, "xp");
  check_same_dtype(x, xp, op);
  const int64_t rows = plan.n_tokens * plan.top_k;
  const size_t row_bytes = static_cast<size_t>(d) * dtype_size(x.dtype());
  if (rows == 0 || row_bytes == 0) return;
  const int64_t* assignment = plan.assignment.data<int64_t>();
  switch (copy_width(row_bytes, x.raw(), xp.raw())) {
    case 16:
      launch_permute_rows<uint4>(x.raw(), xp.raw(), assignment, rows, plan.top_k, row_bytes);
      break;
    case 8:
      launch_permute_rows<uint2>(x.raw(), xp.raw(), assignment, rows, plan.top_k, row_bytes);
      break;
    case 4:
      launch_permute_rows<uint32_t>(x.raw(), xp.raw(), assignment, rows, plan.top_k, row_bytes);
      break;
    case 2:
      launch_permute_rows<uint16_t>(x.raw(), xp.raw(), assignment, rows, plan.top_k, row_bytes);
      break;
    default:
      launch_permute_rows<uint8_t>(x.raw(), xp.raw(), assignment, rows, plan.top_k, row_bytes);
      break;
  }
}

void moe_permute_backward(const Tensor& dxp, const MoePlan& plan, Tensor& dx) {
  constexpr std::string_view op = "moe_permute_backward";
  const Tensor row_of = plan_rows(plan, op, DeviceErrorCode::moe_permute_backward_plan);
  const int64_t d = check_rows(dxp, plan.n_tokens * plan.top_k, op, "dxp");
  check_on_gpu(dx, op, "dx");
  check_shape(dx, {plan.n_tokens, d}, op, "dx");
  check_same_dtype(dxp, dx, op);
  dispatch_float(dx.dtype(), op, [&]<class T>() {
    if (plan.n_tokens == 0 || d == 0) return;
    permute_backward_kernel<T><<<row_blocks(plan.n_tokens), kRowBlock, 0, current_stream()>>>(
        dxp.data<T>(), row_of.data<int64_t>(), dx.data<T>(), plan.n_tokens, plan.top_k, d);
    DSX_CUDA_CHECK_LAUNCH("permute_backward_kernel");
  });
}

void moe_unpermute(const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& y) {
  constexpr std::string_view op = "moe_unpermute";
  const Tensor row_of = plan_rows(plan, op, DeviceErrorCode::moe_unpermute_plan);
  const int64_t d = check_rows(yp, plan.n_tokens * plan.top_k, op, "yp");
  check_on_gpu(weights, op, "weights");
  check_on_gpu(y, op, "y");
  check_shape(weights, {plan.n_tokens, plan.top_k}, op, "weights");
  check_shape(y, {plan.n_tokens, d}, op, "y");
  check_same_dtype(yp, weights, op);
  check_same_dtype(yp, y, op);
  dispatch_float(y.dtype(), op, [&]<class T>() {
    if (plan.n_tokens == 0 || d == 0) return;
    unpermute_kernel<T><<<row_blocks(plan.n_tokens), kRowBlock, 0, current_stream()>>>(
        yp.data<T>(), weights.data<T>(), row_of.data<int64_t>(), y.data<T>(), plan.n_tokens, plan.top_k, d);
    DSX_CUDA_CHECK_LAUNCH("unpermute_kernel");
  });
}

void moe_unpermute_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& dyp,
                            Tensor& dweights) {
  constexpr std::string_view op = "moe_unpermute_backward";
  const Tensor row_of = plan_rows(plan, op, DeviceErrorCode::moe_unpermute_backward_plan);
  const int64_t d = check_rows(yp, plan.n_tokens * plan.top_k, op, "yp");
  check_on_gpu(dy, op, "dy");
  check_on_gpu(weights, op, "weights");
  check_on_gpu(dyp, op, "dyp");
  check_on_gpu(dweights, op, "dweights");
  check_shape(dy, {plan.n_tokens, d}, op, "dy");
  check_shape(weights, {plan.n_tokens, plan.top_k}, op, "weights");
  check_shape(dyp, yp.shape(), op, "dyp");
  check_shape(dweights, weights.shape(), op, "dweights");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dy, &weights, &dyp, &dweights}) {
    check_same_dtype(yp, *t, op);
  }
  dispatch_float(yp.dtype(), op, [&]<class T>() {
    if (plan.n_tokens == 0) return;
    unpermute_backward_kernel<T><<<row_blocks(plan.n_tokens), kRowBlock, 0, current_stream()>>>(
        dy.data<T>(), yp.data<T>(), weights.data<T>(), row_of.data<int64_t>(), dyp.data<T>(), dweights.data<T>(),
        plan.n_tokens, plan.top_k, d);
    DSX_CUDA_CHECK_LAUNCH("unpermute_backward_kernel");
  });
}

}  // namespace dsx::cuda
