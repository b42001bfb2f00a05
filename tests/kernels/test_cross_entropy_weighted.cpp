// Per-token policy terms (token_logprobs) against a float64 reference, and the per-row weighted
// cross-entropy backward against central finite differences of Σ_n g_n · logp_n.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/ops/cross_entropy.h"
#include "support/gradcheck.h"

using namespace dsx;

namespace {

constexpr int64_t kIgnore = -100;

Tensor targets_tensor(const std::vector<int32_t>& targets) {
  return Tensor::from<int32_t>(std::span<const int32_t>(targets), {static_cast<int64_t>(targets.size())});
}

Tensor lse_of(const Tensor& logits, const Tensor& targets) {
  Tensor lse = Tensor::empty({logits.dim(0)}, DType::f64);
  ops::cross_entropy_forward(logits, targets, kIgnore, lse);
  return lse;
}

struct Terms {
  std::vector<double> logp, entropy;
};

// log softmax and entropy written out from their definitions, in double.
Terms reference_terms(const Tensor& logits, const std::vector<int32_t>& targets) {
  const auto x = logits.to_vector();
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  Terms r;
  for (int64_t n = 0; n < rows; ++n) {
    const double* row = x.data() + n * vocab;
    if (targets[static_cast<size_t>(n)] == kIgnore) {
      r.logp.push_back(0);
      r.entropy.push_back(0);
      continue;
    }
    const double m = *std::max_element(row, row + vocab);
    double z = 0;
    for (int64_t j = 0; j < vocab; ++j) z += std::exp(row[j] - m);
    double h = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const double p = std::exp(row[j] - m) / z;
      h -= p * std::log(p);
    }
    r.logp.push_back(std::log(std::exp(row[targets[static_cast<size_t>(n)]] - m) / z));
    r.entropy.push_back(h);
  }
  return r;
}

Terms computed_terms(const Tensor& logits, const std::vector<int32_t>& targets) {
  const Tensor t = targets_tensor(targets);
  const Tensor lse = lse_of(logits, t);
  Tensor logp = Tensor::full({logits.dim(0)}, 777.0, DType::f64);  // must be overwritten, ignored rows too
  Tensor entropy = Tensor::full({logits.dim(0)}, 777.0, DType::f64);
  ops::token_logprobs(logits, t, lse, kIgnore, logp, entropy);
  return {logp.to_vector(), entropy.to_vector()};
}

double max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

}  // namespace

TEST_CASE("token_logprobs: f64 log-probabilities and entropies match the definitions", "[cross_entropy][policy]") {
  const std::vector<int32_t> targets{3, kIgnore, 0, 6, 2};
  const Tensor logits = test::random_tensor({5, 7}, DType::f64, 11, -3.0, 3.0);
  const Terms expected = reference_terms(logits, targets);
  const Terms actual = computed_terms(logits, targets);
  // Both are the same few double operations in another order: 1e-12 is ~1e4 ulp of values ~2.
  CHECK(max_diff(actual.logp, expected.logp) < 1e-12);
  CHECK(max_diff(actual.entropy, expected.entropy) < 1e-12);
  CHECK(actual.logp[1] == 0.0);
  CHECK(actual.entropy[1] == 0.0);
}

TEST_CASE("token_logprobs: uniform logits give entropy log V and logp -log V", "[cross_entropy][policy]") {
  const Tensor logits = Tensor::full({2, 50}, 4.25, DType::f32);
  const Terms actual = computed_terms(logits, {7, 49});
  for (int n = 0; n < 2; ++n) {
    // f32 logits, f64 sums: exact up to the last bits of log(50) ≈ 3.9.
    CHECK(actual.logp[static_cast<size_t>(n)] == Approx(-std::log(50.0)).epsilon(1e-12));
    CHECK(actual.entropy[static_cast<size_t>(n)] == Approx(std::log(50.0)).epsilon(1e-12));
  }
}

TEST_CASE("token_logprobs: the entropy output is optional", "[cross_entropy][policy]") {
  const std::vector<int32_t> targets{1, 2};
  const Tensor logits = test::random_tensor({2, 4}, DType::f32, 3);
  const Tensor t = targets_tensor(targets);
  const Tensor lse = lse_of(logits, t);
  Tensor logp = Tensor::empty({2}, DType::f32);
  Tensor no_entropy;
  ops::token_logprobs(logits, t, lse, kIgnore, logp, no_entropy);
  const Terms expected = reference_terms(logits, targets);
  // f32 output of a value computed in double: half an f32 ulp at |logp| < 4.
  CHECK(max_diff(logp.to_vector(), expected.logp) < 1e-6);
}

TEST_CASE("cross_entropy_backward_weighted: gradient of a weighted sum of log-probs (finite differences)",
          "[cross_entropy][policy]") {
  const std::vector<int32_t> targets{2, kIgnore, 0, 5};
  const Tensor t = targets_tensor(targets);
  Tensor logits = test::random_tensor({4, 6}, DType::f64, 5, -2.0, 2.0);
  const std::vector<double> g{0.7, 3.0, -1.3, 0.25};  // row 1 is ignored: its weight must not leak
  const auto objective = [&] {
    const Terms terms = reference_terms(logits, targets);
    double s = 0;
    for (size_t n = 0; n < g.size(); ++n) s += g[n] * terms.logp[n];
    return s;
  };
  Tensor row_scale = Tensor::empty({4}, DType::f64);
  for (int64_t n = 0; n < 4; ++n) row_scale.data<double>()[n] = -g[static_cast<size_t>(n)];
  Tensor d = Tensor::full(logits.shape(), 12345.0, DType::f64);
  ops::cross_entropy_backward_weighted(logits, t, lse_of(logits, t), kIgnore, row_scale, d);
  const Tensor numeric = test::finite_difference(logits, objective);
  // h = 1e-6 in f64 (support/gradcheck.h): error ~1e-10 against gradients of order 1.
  CHECK(test::max_abs_diff(d, numeric) < 1e-8);
  for (int64_t j = 0; j < 6; ++j) CHECK(d.data<double>()[6 + j] == 0.0);
}

TEST_CASE("cross_entropy_backward_weighted: equal weights reproduce cross_entropy_backward",
          "[cross_entropy][policy]") {
  const std::vector<int32_t> targets{1, 3, kIgnore};
  const Tensor t = targets_tensor(targets);
  const Tensor logits = test::random_tensor({3, 5}, DType::f32, 8);
  const Tensor lse = lse_of(logits, t);
  Tensor uniform = Tensor::empty(logits.shape(), DType::f32);
  ops::cross_entropy_backward(logits, t, lse, kIgnore, 0.375, uniform);
  Tensor weighted = Tensor::empty(logits.shape(), DType::f32);
  ops::cross_entropy_backward_weighted(logits, t, lse, kIgnore, Tensor::full({3}, 0.375, DType::f32), weighted);
  // Identical arithmetic in the same order: bit-equal.
  CHECK(test::max_abs_diff(weighted, uniform) == 0.0);
}

TEST_CASE("policy ops: shape mismatches are rejected", "[cross_entropy][policy]") {
  const Tensor logits = Tensor::zeros({3, 4}, DType::f32);
  const Tensor t = targets_tensor({0, 1, 2});
  const Tensor lse = lse_of(logits, t);
  Tensor short_logp = Tensor::empty({2}, DType::f32);
  Tensor none;
  CHECK_THROWS_AS(ops::token_logprobs(logits, t, lse, kIgnore, short_logp, none), std::invalid_argument);
  Tensor d = Tensor::empty({3, 4}, DType::f32);
  CHECK_THROWS_AS(ops::cross_entropy_backward_weighted(logits, t, lse, kIgnore, Tensor::zeros({4}, DType::f32), d),
                  std::invalid_argument);
  CHECK_THROWS_AS(ops::cross_entropy_backward_weighted(logits, targets_tensor({0, 9, 1}), lse, kIgnore,
                                                       Tensor::zeros({3}, DType::f32), d),
                  std::invalid_argument);
}
