// AdamW on the GPU (kernels/ops/adamw.h has the semantics).
//
// dtypes: param and grad f32 or f64; m and v each in the param's dtype or bf16.
// Thread mapping: one element per thread, grid-stride. The update is the CPU's expression with
// every operation IEEE-rounded and nothing fused into an FMA (exact_math.cuh), in the CPU's
// order, and the scalar constants are computed on the host by the CPU's code, so the results
// match the CPU's bit for bit wherever the CPU build does not contract into FMAs either.
#include <cmath>
#include <string>

#include "kernels/adamw_rules.h"
#include "kernels/cuda/device_checks.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/exact_math.cuh"
#include "kernels/cuda/ops_adamw.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {
namespace {

// The step's constants in the parameter's precision, computed as the CPU op computes them.
template <class P>
struct StepConstants {
  P beta1, beta2, one_minus_beta1, one_minus_beta2, step_size, inv_sqrt_bias2, eps, decay;
};

// ============================================================================================
// kernels
// ============================================================================================

using adamw_rules::load_moment;
using adamw_rules::store_moment;

template <class P, class M, class V>
__global__ void adamw_kernel(StepConstants<P> c, P* param, const P* grad, M* m, V* v, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) {
    const P g = grad[i];
    const P mi = add_rn(mul_rn(c.beta1, load_moment<P>(m[i])), mul_rn(c.one_minus_beta1, g));
    const P vi = add_rn(mul_rn(c.beta2, load_moment<P>(v[i])), mul_rn(mul_rn(c.one_minus_beta2, g), g));
    store_moment(m[i], mi);
    store_moment(v[i], vi);
    const P p = param[i];
    const P denominator = add_rn(mul_rn(sqrt_rn(vi), c.inv_sqrt_bias2), c.eps);
    param[i] = sub_rn(p, add_rn(div_rn(mul_rn(c.step_size, mi), denominator), mul_rn(c.decay, p)));
  }
}

// ============================================================================================
// launchers
// ============================================================================================

template <class P>
StepConstants<P> step_constants(const AdamWConfig& c, int64_t step) {
  const double bias1 = 1.0 - std::pow(c.beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(c.beta2, static_cast<double>(step));
  return {static_cast<P>(c.beta1),       static_cast<P>(c.beta2),
          static_cast<P>(1.0 - c.beta1), static_cast<P>(1.0 - c.beta2),
          static_cast<P>(c.lr / bias1),  static_cast<P>(1.0 / std::sqrt(bias2)),
          static_cast<P>(c.eps),         static_cast<P>(c.lr * c.weight_decay)};
}

}  // namespace

void adamw_step(const AdamWConfig& config, int64_t step, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v) {
  constexpr std::string_view op = "adamw_step";
  ops::checks::adamw(config, step, Device::cuda, param, grad, m, v);
  dispatch_float(param.dtype(), op, [&]<class P>() {
    ops::checks::dispatch_moment<P>(m.dtype(), op, "m", [&]<class M>() {
      ops::checks::dispatch_moment<P>(v.dtype(), op, "v", [&]<class V>() {
        const int64_t n = param.numel();
        if (n == 0) return;
        adamw_kernel<P, M, V><<<grid_for(n), kBlock, 0, current_stream()>>>(
            step_constants<P>(config, step), param.data<P>(), grad.data<P>(), m.data<M>(), v.data<V>(), n);
        DSX_CUDA_CHECK_LAUNCH("adamw_kernel");
      });
    });
  });
}

}  // namespace dsx::cuda
