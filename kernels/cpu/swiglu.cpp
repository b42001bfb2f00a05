#include "kernels/ops/swiglu.h"

#include <cmath>
#include <string>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 14;

struct Named {
  const Tensor* tensor;
  std::string_view name;
};

// gate [N, F] on the CPU; every other tensor has gate's shape and dtype.
void check_like_gate(std::string_view op, const Tensor& gate, std::initializer_list<Named> others) {
  check_cpu(gate, op, "gate");
  check(gate.ndim() == 2, op, [&] { return "gate must be 2-D [N, F], got " + shape_str(gate.shape()); });
  for (const Named t : others) {
    check_cpu(*t.tensor, op, t.name);
    check_shape(*t.tensor, gate.shape(), op, t.name);
    check(t.tensor->dtype() == gate.dtype(), op, [&] {
      return std::string(t.name) + " " + t.tensor->describe() + " and gate " + gate.describe() + " dtypes differ";
    });
  }
}

// 1 / (1 + e^-g): saturates cleanly to 0 and 1 for large |g| (e^-g = inf gives exactly 0).
template <class T>
T sigmoid(T g) {
  return T(1) / (T(1) + std::exp(-g));
}

}  // namespace

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out) {
  DSX_ROUTE_TO_CUDA(gate, swiglu_forward(gate, up, out));
  constexpr std::string_view op = "swiglu_forward";
  check_like_gate(op, gate, {{&up, "up"}, {&out, "out"}});
  dispatch_float(gate.dtype(), op, [&]<class T>() {
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    T* o = out.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for simd schedule(static) if (n > kParallelElements)
    for (int64_t i = 0; i < n; ++i) o[i] = g[i] * sigmoid(g[i]) * u[i];
  });
}

// d silu(g) / dg = s + g s (1 - s) with s = sigmoid(g).
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup) {
  DSX_ROUTE_TO_CUDA(gate, swiglu_backward(gate, up, dout, dgate, dup));
  constexpr std::string_view op = "swiglu_backward";
  check_like_gate(op, gate, {{&up, "up"}, {&dout, "dout"}, {&dgate, "dgate"}, {&dup, "dup"}});
  dispatch_float(gate.dtype(), op, [&]<class T>() {
    const T* g = gate.data<T>();
    const T* u = up.data<T>();
    const T* d = dout.data<T>();
    T* dg = dgate.data<T>();
    T* du = dup.data<T>();
    const int64_t n = gate.numel();
#pragma omp parallel for simd schedule(static) if (n > kParallelElements)
    for (int64_t i = 0; i < n; ++i) {
      const T s = sigmoid(g[i]);
      const T silu = g[i] * s;
      du[i] = d[i] * silu;
      dg[i] = d[i] * u[i] * (s + silu * (T(1) - s));
    }
  });
}

}  // namespace dsx::ops
