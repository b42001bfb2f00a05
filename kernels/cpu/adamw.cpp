#include "kernels/ops/adamw.h"

#include <cmath>
#include <string>
#include <type_traits>

#include "kernels/codecs.h"
#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"

namespace dsx::ops {
namespace {

// Below this many elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// double -> bf16 with one correct round-to-nearest-even. Going through float with the usual rounding
// would round twice (a double just above a bf16 tie can land exactly on the tie and then go to even,
// the wrong way); rounding to float with round-to-odd first keeps the information that the value was
// not a tie, and float has enough extra bits (24 >= 8 + 2) for the second rounding to be exact.
uint16_t double_to_bf16_bits(double d) {
  const float f = static_cast<float>(d);
  if (!std::isfinite(f) || static_cast<double>(f) == d) return codec::float_to_bf16(f);
  uint32_t u = codec::float_bits(f);
  if (std::abs(static_cast<double>(f)) > std::abs(d)) --u;  // truncate toward zero
  u |= 1u;                                                  // odd marks "inexact"
  return codec::float_to_bf16(codec::bits_float(u));
}

template <class P, class M>
P load_moment(const M& m) {
  if constexpr (std::is_same_v<M, bf16>) {
    return static_cast<P>(codec::bf16_to_float(m.bits));
  } else {
    return m;
  }
}

template <class P, class M>
void store_moment(M& m, P value) {
  if constexpr (std::is_same_v<M, bf16>) {
    if constexpr (std::is_same_v<P, float>) {
      m.bits = codec::float_to_bf16(value);
    } else {
      m.bits = double_to_bf16_bits(value);
    }
  } else {
    m = value;
  }
}

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

template <class P, class F>
void dispatch_moment(DType t, std::string_view op, std::string_view name, F&& f) {
  if (t == dtype_of<P>()) {
    f.template operator()<P>();
  } else if (t == DType::bf16) {
    f.template operator()<bf16>();
  } else {
    throw std::invalid_argument(std::string(op) + ": " + std::string(name) + " must be " +
                                std::string(dtype_name(dtype_of<P>())) + " (the param dtype) or bf16, got " +
                                std::string(dtype_name(t)));
  }
}

void check_config(const AdamWConfig& c, int64_t step, std::string_view op) {
  const auto in_unit = [](double b) { return std::isfinite(b) && b >= 0 && b < 1; };
  check(step >= 1, op, "step is 1-based, got " + std::to_string(step));
  check(std::isfinite(c.lr) && c.lr >= 0, op, "lr must be finite and >= 0, got " + std::to_string(c.lr));
  check(in_unit(c.beta1), op, "beta1 must be in [0, 1), got " + std::to_string(c.beta1));
  check(in_unit(c.beta2), op, "beta2 must be in [0, 1), got " + std::to_string(c.beta2));
  check(std::isfinite(c.eps) && c.eps >= 0, op, "eps must be finite and >= 0, got " + std::to_string(c.eps));
  check(std::isfinite(c.weight_decay) && c.weight_decay >= 0, op,
        "weight_decay must be finite and >= 0, got " + std::to_string(c.weight_decay));
}

}  // namespace

void adamw_step(const AdamWConfig& config, int64_t step, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v) {
  DSX_ROUTE_TO_CUDA(param, adamw_step(config, step, param, grad, m, v));
  constexpr std::string_view op = "adamw_step";
  check_config(config, step, op);
  check_cpu(param, op, "param");
  check_cpu(grad, op, "grad");
  check_cpu(m, op, "m");
  check_cpu(v, op, "v");
  check_shape(grad, param.shape(), op, "grad");
  check_shape(m, param.shape(), op, "m");
  check_shape(v, param.shape(), op, "v");
  check(grad.dtype() == param.dtype(), op,
        "grad " + grad.describe() + " must share the param dtype " + param.describe());
  dispatch_float(param.dtype(), op, [&]<class P>() {
    dispatch_moment<P>(m.dtype(), op, "m", [&]<class M>() {
      dispatch_moment<P>(v.dtype(), op, "v", [&]<class V>() {
        adamw_update<P>(config, step, param.data<P>(), grad.data<P>(), m.data<M>(), v.data<V>(), param.numel());
      });
    });
  });
}

}  // namespace dsx::ops
