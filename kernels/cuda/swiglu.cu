// SwiGLU forward and backward for device tensors (kernels/ops/swiglu.h).
//
// dtypes: as the CPU op: gate, up, out, dout, dgate, dup all f32 or all f64 (computed in that type).
// Thread mapping: one thread per element, grid-stride loops, fully coalesced.
#include <string>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"

namespace dsx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

// 1 / (1 + e^-g), as the CPU: saturates to exactly 0 and 1 for large |g|.
template <class T>
__device__ __forceinline__ T sigmoid(T g) {
  return T(1) / (T(1) + exp(-g));
}

template <class T>
__global__ void swiglu_forward_kernel(const T* gate, const T* up, T* out, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) {
    const T g = gate[i];
    out[i] = g * sigmoid(g) * up[i];
  }
}

// d silu(g) / dg = s + g s (1 - s) with s = sigmoid(g).
template <class T>
__global__ void swiglu_backward_kernel(const T* gate, const T* up, const T* dout, T* dgate, T* dup, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) {
    const T g = gate[i], d = dout[i];
    const T s = sigmoid(g);
    const T silu = g * s;
    dup[i] = d * silu;
    dgate[i] = d * up[i] * (s + silu * (T(1) - s));
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

struct Named {
  const Tensor* tensor;
  std::string_view name;
};

// gate [N, F] on the GPU; every other tensor has gate's shape and dtype and is on the GPU.
void check_like_gate(std::string_view op, const Tensor& gate, std::initializer_list<Named> others) {
  check_on_gpu(gate, op, "gate");
  check(gate.ndim() == 2, op, [&] { return "gate must be 2-D [N, F], got " + shape_str(gate.shape()); });
  for (const Named t : others) {
    check_on_gpu(*t.tensor, op, t.name);
    check_shape(*t.tensor, gate.shape(), op, t.name);
    check(t.tensor->dtype() == gate.dtype(), op, [&] {
      return std::string(t.name) + " " + t.tensor->describe() + " and gate " + gate.describe() + " dtypes differ";
    });
  }
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  constexpr std::string_view op = "swiglu_forward";
  check_like_gate(op, gate, {{&up, "up"}, {&out, "out"}});
  dispatch_float(gate.dtype(), op, [&]<class T>() {
    const int64_t n = gate.numel();
    if (n == 0) return;
    swiglu_forward_kernel<T>
        <<<grid_for(n), kBlock, 0, current_stream()>>>(gate.data<T>(), up.data<T>(), out.data<T>(), n);
    DSX_CUDA_CHECK_LAUNCH("swiglu_forward_kernel");
  });
}

void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup) {
  constexpr std::string_view op = "swiglu_backward";
  check_like_gate(op, gate, {{&up, "up"}, {&dout, "dout"}, {&dgate, "dgate"}, {&dup, "dup"}});
  dispatch_float(gate.dtype(), op, [&]<class T>() {
    const int64_t n = gate.numel();
    if (n == 0) return;
    swiglu_backward_kernel<T><<<grid_for(n), kBlock, 0, current_stream()>>>(
        gate.data<T>(), up.data<T>(), dout.data<T>(), dgate.data<T>(), dup.data<T>(), n);
    DSX_CUDA_CHECK_LAUNCH("swiglu_backward_kernel");
  });
}

}  // namespace dsx::cuda
