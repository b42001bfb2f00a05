#include "kernels/ops/adamw.h"

#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/adamw_rules.h"
#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

using adamw_rules::load_moment;
using adamw_rules::store_moment;

// The update in the parameter's precision P; m and v stored as M and V (P or bf16). The parameter
// step uses this step's moments before they are rounded for storage.
template <class P, class M, class V>
void adamw_update(const AdamWConfig& c, int64_t step, P* param, const P* grad, M* m, V* v, int64_t n) {
  const double bias1 = 1.0 - std::pow(c.beta1, static_cast<double>(step));
  const double bias2 = 1.0 - std::pow(c.beta2, static_cast<double>(step));
  const P beta1 = static_cast<P>(c.beta1);
  const P beta2 = static_cast<P>(c.beta2);
  const P one_minus_beta1 = static_cast<P>(1.0 - c.beta1);
  const P one_minus_beta2 = static_cast<P>(1.0 - c.beta2);
  // m̂ / (sqrt(v̂) + eps) = (m / bias1) / (sqrt(v) / sqrt(bias2) + eps)
  const P step_size = static_cast<P>(c.lr / bias1);
  const P inv_sqrt_bias2 = static_cast<P>(1.0 / std::sqrt(bias2));
  const P eps = static_cast<P>(c.eps);
  const P decay = static_cast<P>(c.lr * c.weight_decay);
#pragma omp parallel for simd schedule(static) if (n > kParallelElements)
  for (int64_t i = 0; i < n; ++i) {
    const P g = grad[i];
    const P mi = beta1 * load_moment<P>(m[i]) + one_minus_beta1 * g;
    const P vi = beta2 * load_moment<P>(v[i]) + one_minus_beta2 * g * g;
    store_moment(m[i], mi);
    store_moment(v[i], vi);
    const P p = param[i];
    param[i] = p - (step_size * mi / (std::sqrt(vi) * inv_sqrt_bias2 + eps) + decay * p);
  }
}

}  // namespace

void adamw_step(const AdamWConfig& config, int64_t step, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v) {
  DSX_ROUTE_TO_CUDA(param, adamw_step(config, step, param, grad, m, v));
  constexpr std::string_view op = "adamw_step";
  checks::adamw(config, step, Device::cpu, param, grad, m, v);
  dispatch_float(param.dtype(), op, [&]<class P>() {
    checks::dispatch_moment<P>(m.dtype(), op, "m", [&]<class M>() {
      checks::dispatch_moment<P>(v.dtype(), op, "v", [&]<class V>() {
        adamw_update<P>(config, step, param.data<P>(), grad.data<P>(), m.data<M>(), v.data<V>(), param.numel());
      });
    });
  });
}

}  // namespace dsx::ops
