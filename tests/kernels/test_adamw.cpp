#include <catch2/catch.hpp>
#include <cmath>
#include <vector>

#include "kernels/codecs.h"
#include "kernels/ops/adamw.h"
#include "support/gradcheck.h"

using namespace dsx;
using ops::AdamWConfig;

namespace {

AdamWConfig config_with_decay(double weight_decay) {
  AdamWConfig c;
  c.lr = 1e-2;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = weight_decay;
  return c;
}

// bf16 round-to-nearest-even of a value the test holds in double (exactly a float in every use below).
double to_bf16(double x) {
  return codec::bf16_to_float(codec::float_to_bf16(static_cast<float>(x)));
}

// AdamW in float64, written from the formulas; round_moments stores m and v as bf16 after each step.
struct ReferenceAdamW {
  AdamWConfig c;
  std::vector<double> p, m, v;
  bool round_moments = false;

  void step(int64_t t, const std::vector<double>& g) {
    for (size_t i = 0; i < p.size(); ++i) {
      const double mi = c.beta1 * m[i] + (1 - c.beta1) * g[i];
      const double vi = c.beta2 * v[i] + (1 - c.beta2) * g[i] * g[i];
      const double m_hat = mi / (1 - std::pow(c.beta1, t));
      const double v_hat = vi / (1 - std::pow(c.beta2, t));
      p[i] -= c.lr * (m_hat / (std::sqrt(v_hat) + c.eps) + c.weight_decay * p[i]);
      m[i] = round_moments ? to_bf16(mi) : mi;
      v[i] = round_moments ? to_bf16(vi) : vi;
    }
  }
};

struct Run {
  Tensor param, m, v;
  ReferenceAdamW reference;
};

// Runs `steps` AdamW steps of the op and of the reference from the same start and gradients.
Run run_steps(const AdamWConfig& c, DType param_dtype, DType moment_dtype, int64_t n, int steps, uint64_t seed) {
  Run run{test::random_tensor({n}, param_dtype, seed),
          Tensor::zeros({n}, moment_dtype),
          Tensor::zeros({n}, moment_dtype),
          {}};
  run.reference = ReferenceAdamW{c, run.param.to_vector(), std::vector<double>(n, 0.0), std::vector<double>(n, 0.0),
                                 moment_dtype == DType::bf16};
  for (int t = 1; t <= steps; ++t) {
    // Gradients of varying scale and sign across steps, so m and v do not simply track one value.
    const Tensor grad = test::random_tensor({n}, param_dtype, seed + 100 + t, -2.0 / t, 3.0 / t);
    ops::adamw_step(c, t, run.param, grad, run.m, run.v);
    run.reference.step(t, grad.to_vector());
  }
  return run;
}

Tensor as_tensor(const std::vector<double>& v) {
  return Tensor::from<double>(v, {static_cast<int64_t>(v.size())});
}

}  // namespace

TEST_CASE("adamw: matches the float64 reference over several steps", "[adamw]") {
  for (double weight_decay : {0.0, 0.1}) {
    INFO("weight_decay " << weight_decay);
    // 40000 elements: above the op's parallel threshold.
    const Run f64 = run_steps(config_with_decay(weight_decay), DType::f64, DType::f64, 40000, 6, 1);
    // f64: the same formulas in the same precision, only reassociated: 1e-14 absolute on O(1) params.
    REQUIRE(test::max_abs_diff(f64.param, as_tensor(f64.reference.p)) < 1e-14);
    REQUIRE(test::max_rel_error(f64.m, as_tensor(f64.reference.m)) < 1e-14);
    REQUIRE(test::max_rel_error(f64.v, as_tensor(f64.reference.v)) < 1e-14);

    // f32: each step rounds the O(1) param (3e-8) and computes the O(lr) update to ~1e-7 relative;
    // six steps stay below 1e-6, while a wrong update (bias correction, decay) is off by >= 1e-4.
    const Run f32 = run_steps(config_with_decay(weight_decay), DType::f32, DType::f32, 1000, 6, 2);
    REQUIRE(test::max_abs_diff(f32.param, as_tensor(f32.reference.p)) < 1e-6);
    REQUIRE(test::max_rel_error(f32.m, as_tensor(f32.reference.m)) < 1e-6);
    REQUIRE(test::max_rel_error(f32.v, as_tensor(f32.reference.v)) < 1e-6);
  }
}

TEST_CASE("adamw: weight decay is decoupled from the gradient", "[adamw]") {
  const Tensor start = test::random_tensor({64}, DType::f64, 3);
  const Tensor zero_grad = Tensor::zeros({64}, DType::f64);
  SECTION("with zero gradients the step is exactly the decay p · (1 - lr·wd)") {
    const AdamWConfig c = config_with_decay(0.1);
    Tensor p = start.clone(), m = Tensor::zeros({64}, DType::f64), v = Tensor::zeros({64}, DType::f64);
    ops::adamw_step(c, 1, p, zero_grad, m, v);
    const auto got = p.to_vector();
    const auto before = start.to_vector();
    for (size_t i = 0; i < got.size(); ++i) REQUIRE(got[i] == Approx(before[i] * (1 - c.lr * 0.1)).epsilon(1e-15));
  }
  SECTION("weight decay 0 leaves a parameter with zero gradient untouched") {
    Tensor p = start.clone(), m = Tensor::zeros({64}, DType::f64), v = Tensor::zeros({64}, DType::f64);
    ops::adamw_step(config_with_decay(0.0), 1, p, zero_grad, m, v);
    REQUIRE(test::max_abs_diff(p, start) == 0.0);
  }
  SECTION("the decay term does not pass through the moments") {
    // Same gradients with and without decay: moments identical, params differ by the decay alone.
    const Run plain = run_steps(config_with_decay(0.0), DType::f64, DType::f64, 256, 1, 4);
    const Run decayed = run_steps(config_with_decay(0.1), DType::f64, DType::f64, 256, 1, 4);
    REQUIRE(test::max_abs_diff(plain.m, decayed.m) == 0.0);
    REQUIRE(test::max_abs_diff(plain.v, decayed.v) == 0.0);
    const auto a = plain.param.to_vector();
    const auto b = decayed.param.to_vector();
    const auto p0 = test::random_tensor({256}, DType::f64, 4).to_vector();
    for (size_t i = 0; i < a.size(); ++i) REQUIRE(a[i] - b[i] == Approx(1e-2 * 0.1 * p0[i]).epsilon(1e-9));
  }
}

TEST_CASE("adamw: bf16 moments stay within bf16 rounding of the float64 reference", "[adamw]") {
  const int steps = 6;
  const AdamWConfig c = config_with_decay(0.1);
  const Run run = run_steps(c, DType::f32, DType::bf16, 4000, steps, 5);
  // The op computes each moment in f32 and rounds it to bf16; the reference does it in f64. Both
  // round a value that agrees to ~1e-7, so they differ by at most one bf16 step: 2^-7 relative.
  const auto m = run.m.to_vector();
  const auto v = run.v.to_vector();
  for (size_t i = 0; i < m.size(); ++i) {
    REQUIRE(std::abs(m[i] - run.reference.m[i]) <= 0x1p-7 * std::abs(run.reference.m[i]));
    REQUIRE(std::abs(v[i] - run.reference.v[i]) <= 0x1p-7 * std::abs(run.reference.v[i]));
  }
  // Params follow the rounded-moment reference to f32 accuracy (as in the f32 test)...
  REQUIRE(test::max_abs_diff(run.param, as_tensor(run.reference.p)) < 1e-6);
  // ...and the unrounded f64 run to bf16 accuracy: each step's update (at most ~lr in size) moves by
  // a few bf16 roundings (2^-9 relative each), so 6 steps stay well inside 6 · lr · 2^-5.
  const Run exact = run_steps(c, DType::f64, DType::f64, 4000, steps, 5);
  const double drift = test::max_abs_diff(run.param, exact.param);
  REQUIRE(drift < steps * c.lr * 0x1p-5);
  REQUIRE(drift > 0.0);  // the moments really were rounded
}

TEST_CASE("adamw: bf16 moments round to nearest even, once", "[adamw]") {
  AdamWConfig c = config_with_decay(0.0);
  c.beta1 = 0.0;  // m = g and v = g², so the stored moments show the rounding directly
  c.beta2 = 0.0;
  SECTION("f32 params") {
    // 1 + 0.75·2^-7 lies between bf16 neighbours 1 and 1 + 2^-7, nearer the upper (truncation would
    // give 1); 1 + 2^-8 is an exact tie (to even: 1); 1 + 3·2^-8 is a tie between 1 + 2^-7 (odd) and
    // 1 + 2^-6 (even).
    const std::vector<float> g = {1.0f + 0.75f * 0x1p-7f, 1.0f + 0x1p-8f, 1.0f + 3 * 0x1p-8f,
                                  -(1.0f + 0.75f * 0x1p-7f)};
    Tensor param = Tensor::zeros({4}, DType::f32), m = Tensor::zeros({4}, DType::bf16),
           v = Tensor::zeros({4}, DType::bf16);
    ops::adamw_step(c, 1, param, Tensor::from<float>(g, {4}), m, v);
    REQUIRE(m.to_vector() == std::vector<double>{1 + 0x1p-7, 1.0, 1 + 0x1p-6, -(1 + 0x1p-7)});
    const auto vs = v.to_vector();
    for (size_t i = 0; i < g.size(); ++i) REQUIRE(vs[i] == codec::bf16_to_float(codec::float_to_bf16(g[i] * g[i])));
  }
  SECTION("f64 params: no double rounding through float") {
    // 1 + 2^-8 + 2^-30 is just above the tie; through float it would become the tie and go to 1.
    const std::vector<double> g = {1 + 0x1p-8 + 0x1p-30, 1 + 0x1p-8, 1 + 0x1p-8 - 0x1p-30};
    Tensor param = Tensor::zeros({3}, DType::f64), m = Tensor::zeros({3}, DType::bf16),
           v = Tensor::zeros({3}, DType::f64);
    ops::adamw_step(c, 1, param, Tensor::from<double>(g, {3}), m, v);
    REQUIRE(m.to_vector() == std::vector<double>{1 + 0x1p-7, 1.0, 1.0});
  }
}

TEST_CASE("adamw: invalid arguments throw", "[adamw]") {
  const AdamWConfig c = config_with_decay(0.1);
  Tensor p = Tensor::zeros({8}, DType::f32), g = Tensor::zeros({8}, DType::f32);
  Tensor m = Tensor::zeros({8}, DType::f32), v = Tensor::zeros({8}, DType::f32);
  REQUIRE_THROWS_AS(ops::adamw_step(c, 0, p, g, m, v), std::invalid_argument);  // steps are 1-based
  AdamWConfig bad = c;
  bad.beta2 = 1.0;
  REQUIRE_THROWS_AS(ops::adamw_step(bad, 1, p, g, m, v), std::invalid_argument);
  bad = c;
  bad.lr = -1.0;
  REQUIRE_THROWS_AS(ops::adamw_step(bad, 1, p, g, m, v), std::invalid_argument);
  Tensor g64 = Tensor::zeros({8}, DType::f64);
  REQUIRE_THROWS_AS(ops::adamw_step(c, 1, p, g64, m, v), std::invalid_argument);
  Tensor m64 = Tensor::zeros({8}, DType::f64);
  REQUIRE_THROWS_AS(ops::adamw_step(c, 1, p, g, m64, v), std::invalid_argument);
  Tensor short_v = Tensor::zeros({7}, DType::f32);
  REQUIRE_THROWS_AS(ops::adamw_step(c, 1, p, g, m, short_v), std::invalid_argument);
}
