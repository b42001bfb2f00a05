#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace dsx::ops {

struct AdamWConfig {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: p -= lr · wd · p
};

// One AdamW step with bias correction for step (1-based):
//   m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;  m̂ = m / (1-β1^t);  v̂ = v / (1-β2^t)
//   p -= lr · (m̂ / (sqrt(v̂) + eps) + wd · p)
// param and grad f32|f64 (same dtype); m and v each in the param's dtype or bf16 (rounded to
// nearest even, once, when stored; the update itself is computed in the param's precision and
// uses this step's moments before that rounding). step >= 1, betas in [0, 1), lr, eps and
// weight_decay >= 0, else std::invalid_argument.
void adamw_step(const AdamWConfig& config, int64_t step, Tensor& param, const Tensor& grad, Tensor& m, Tensor& v);

}  // namespace dsx::ops
