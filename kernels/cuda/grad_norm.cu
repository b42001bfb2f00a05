// Gradient norms and clipping on the GPU (kernels/ops/grad_norm.h has the semantics).
//
// dtypes: every floating dtype (f64, f32, bf16, fp8_e4m3, fp8_e5m2), as on the CPU.
// Thread mapping: sum of squares: a grid of blocks_for(numel) blocks (a function of numel
// only, so the partition never depends on the device) of kThreads threads, each thread a fixed
// grid-stride subset accumulated in double, then block_sum; the per-block partials come to the
// host in one copy and are added there in block order: the result is deterministic. global_norm
// writes every tensor's partials into one buffer and copies it once. Clipping: elementwise,
// grid-stride, with the scale computed on the host from the norm (the CPU's rule).
#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/cuda/device_checks.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_adamw.h"
#include "kernels/dispatch.h"

namespace dsx::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;
constexpr int64_t kElementsPerThread = 16;  // before a second block is worth it

int64_t blocks_for(int64_t n) {
  const int64_t blocks = (n + kThreads * kElementsPerThread - 1) / (kThreads * kElementsPerThread);
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// ============================================================================================
// kernels
// ============================================================================================

template <class T>
__device__ __forceinline__ double as_double(T v) {
  if constexpr (std::is_same_v<T, double>) {
    return v;
  } else {
    return static_cast<double>(load(v));
  }
}

template <class T>
__global__ void sum_of_squares_kernel(const T* x, int64_t n, double* partials) {
  double s = 0;
  DSX_GRID_STRIDE_LOOP(i, n) {
    const double v = as_double(x[i]);
    s += v * v;
  }
  s = block_sum(s);
  if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

template <class T>
__global__ void scale_kernel(T* x, int64_t n, double scale) {
  if constexpr (std::is_floating_point_v<T>) {
    const T s = static_cast<T>(scale);
    DSX_GRID_STRIDE_LOOP(i, n) x[i] = x[i] * s;
  } else {  // narrow floats: scale in float, round back once (the CPU's rule)
    const float s = static_cast<float>(scale);
    DSX_GRID_STRIDE_LOOP(i, n) x[i] = store<T>(load(x[i]) * s);
  }
}

// ============================================================================================
// launchers
// ============================================================================================

template <class F>
void dispatch_grad(const Tensor& t, std::string_view op, F&& f) {
  check_on_gpu(t, op, "tensor");
  check(is_floating(t.dtype()), op, [&] { return "tensor must be floating point, got " + t.describe(); });
  dispatch_any(t.dtype(), [&]<class T>() {
    if constexpr (std::is_floating_point_v<T> || !std::is_arithmetic_v<T>) f.template operator()<T>();
  });
}

// Enqueues the partial sums of t into partials[0, blocks_for(t.numel())).
void enqueue_partials(const Tensor& t, double* partials, std::string_view op) {
  dispatch_grad(t, op, [&]<class T>() {
    const int64_t n = t.numel();
    sum_of_squares_kernel<T><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0, current_stream()>>>(
        static_cast<const T*>(t.raw()), n, partials);
    DSX_CUDA_CHECK_LAUNCH("sum_of_squares_kernel");
  });
}

// Σ over the tensors (in order) of Σ over their blocks (in order) of the partials.
double ordered_total(std::span<const Tensor> tensors, std::string_view op) {
  std::vector<int64_t> offsets{0};
  for (const Tensor& t : tensors) offsets.push_back(offsets.back() + blocks_for(t.numel()));
  if (offsets.back() == 0) return 0.0;
  Tensor partials = Tensor::empty({offsets.back()}, DType::f64, Device::cuda);
  for (size_t i = 0; i < tensors.size(); ++i) enqueue_partials(tensors[i], partials.data<double>() + offsets[i], op);
  std::vector<double> host(static_cast<size_t>(offsets.back()));
  copy_bytes(host.data(), Device::cpu, partials.raw(), Device::cuda, partials.nbytes());  // waits
  check_device_errors();
  double total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    double tensor_total = 0;
    for (int64_t b = offsets[i]; b < offsets[i + 1]; ++b) tensor_total += host[b];
    total += tensor_total;
  }
  return total;
}

}  // namespace

double sum_of_squares(const Tensor& t) {
  return ordered_total(std::span<const Tensor>(&t, 1), "sum_of_squares");
}

double global_norm(std::span<const Tensor> tensors) {
  return std::sqrt(ordered_total(tensors, "sum_of_squares"));
}

double clip_grad_norm(std::span<Tensor> grads, double max_norm) {
  constexpr std::string_view op = "clip_grad_norm";
  const double norm = std::sqrt(ordered_total(grads, "sum_of_squares"));  // the CPU checks there too
  if (!(max_norm > 0) || !std::isfinite(norm) || norm <= max_norm) return norm;
  const double scale = max_norm / (norm + 1e-6);
  for (Tensor& g : grads) {
    dispatch_grad(g, op, [&]<class T>() {
      const int64_t n = g.numel();
      if (n == 0) return;
      scale_kernel<T><<<grid_for(n), kBlock, 0, current_stream()>>>(static_cast<T*>(g.raw()), n, scale);
      DSX_CUDA_CHECK_LAUNCH("scale_kernel");
    });
  }
  return norm;
}

}  // namespace dsx::cuda
