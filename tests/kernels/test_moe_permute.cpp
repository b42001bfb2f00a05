#include <algorithm>
#include <catch2/catch.hpp>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/ops/moe_permute.h"
#include "support/gradcheck.h"

using namespace dsx;

namespace {

// Router-like choices: K distinct experts per token, never expert `unused` (so one segment is empty).
Tensor random_expert_ids(int64_t tokens, int64_t top_k, int64_t n_experts, int64_t unused, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int32_t> pool;
  for (int32_t e = 0; e < n_experts; ++e) {
    if (e != unused) pool.push_back(e);
  }
  std::vector<int32_t> ids;
  for (int64_t t = 0; t < tokens; ++t) {
    std::shuffle(pool.begin(), pool.end(), gen);
    ids.insert(ids.end(), pool.begin(), pool.begin() + top_k);
  }
  return Tensor::from<int32_t>(ids, {tokens, top_k});
}

std::vector<int64_t> assignment_of(const ops::MoePlan& plan) {
  const int64_t* a = plan.assignment.data<int64_t>();
  return std::vector<int64_t>(a, a + plan.assignment.numel());
}

// The permuted row holding (token, choice), found by search: independent of the op's inverse map.
int64_t row_of(const ops::MoePlan& plan, int64_t token, int64_t choice) {
  const auto a = assignment_of(plan);
  return std::find(a.begin(), a.end(), token * plan.top_k + choice) - a.begin();
}

// y[t] = Σ_k w[t, k] · yp[row of (t, k)] in float64.
Tensor reference_unpermute(const Tensor& yp, const Tensor& weights, const ops::MoePlan& plan) {
  const int64_t d = yp.dim(1);
  const auto src = yp.to_vector();
  const auto w = weights.to_vector();
  std::vector<double> y(static_cast<size_t>(plan.n_tokens * d), 0.0);
  for (int64_t t = 0; t < plan.n_tokens; ++t) {
    for (int64_t k = 0; k < plan.top_k; ++k) {
      const int64_t r = row_of(plan, t, k);
      for (int64_t j = 0; j < d; ++j) y[t * d + j] += w[t * plan.top_k + k] * src[r * d + j];
    }
  }
  return Tensor::from<double>(y, {plan.n_tokens, d});
}

}  // namespace

TEST_CASE("moe_permute: the plan is a stable counting sort by expert", "[moe_permute]") {
  const int64_t tokens = 37, top_k = 3, n_experts = 8, unused = 5;
  const Tensor ids = random_expert_ids(tokens, top_k, n_experts, unused, 1);
  for (DType index_type : {DType::i32, DType::i64}) {
    const ops::MoePlan plan = ops::moe_plan(ids.to(index_type), n_experts);
    REQUIRE(plan.n_tokens == tokens);
    REQUIRE(plan.top_k == top_k);
    const auto flat_ids = ids.to_vector();
    std::vector<int64_t> counts(n_experts, 0);
    for (double id : flat_ids) ++counts[static_cast<size_t>(id)];
    REQUIRE(plan.expert_offsets.size() == static_cast<size_t>(n_experts + 1));
    REQUIRE(plan.expert_offsets.front() == 0);
    for (int64_t e = 0; e < n_experts; ++e) {
      REQUIRE(plan.expert_offsets[e + 1] - plan.expert_offsets[e] == counts[e]);
    }
    REQUIRE(counts[unused] == 0);
    const auto a = assignment_of(plan);
    for (int64_t e = 0; e < n_experts; ++e) {
      for (int64_t r = plan.expert_offsets[e]; r < plan.expert_offsets[e + 1]; ++r) {
        REQUIRE(flat_ids[a[r]] == e);                              // the row belongs to its segment
        if (r > plan.expert_offsets[e]) REQUIRE(a[r - 1] < a[r]);  // stable: assignment order kept
      }
    }
    std::vector<int64_t> sorted = a;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> all(static_cast<size_t>(tokens * top_k));
    std::iota(all.begin(), all.end(), 0);
    REQUIRE(sorted == all);  // every assignment exactly once: dropless
  }
  // A token may name one expert twice; both assignments keep their order.
  const ops::MoePlan twice = ops::moe_plan(Tensor::from<int32_t>({1, 1, 0, 1}, {2, 2}), 2);
  REQUIRE(assignment_of(twice) == std::vector<int64_t>{2, 0, 1, 3});
  REQUIRE(twice.expert_offsets == std::vector<int64_t>{0, 1, 4});
  REQUIRE_THROWS_AS(ops::moe_plan(Tensor::from<int32_t>({0, 2}, {1, 2}), 2), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::moe_plan(Tensor::from<int32_t>({0, -1}, {1, 2}), 2), std::invalid_argument);
}

TEST_CASE("moe_permute: permute copies each token to its rows, in any dtype", "[moe_permute]") {
  const int64_t tokens = 37, top_k = 3, d = 10;
  const ops::MoePlan plan = ops::moe_plan(random_expert_ids(tokens, top_k, 8, 5, 2), 8);
  const auto a = assignment_of(plan);
  for (DType dtype : {DType::f64, DType::f32, DType::bf16, DType::fp8_e4m3}) {
    const Tensor x = test::random_tensor({tokens, d}, dtype, 3);
    Tensor xp = Tensor::empty({tokens * top_k, d}, dtype);
    ops::moe_permute(x, plan, xp);
    const size_t row_bytes = static_cast<size_t>(d) * dtype_size(dtype);
    for (int64_t r = 0; r < tokens * top_k; ++r) {
      const char* got = static_cast<const char*>(xp.raw()) + r * row_bytes;
      const char* want = static_cast<const char*>(x.raw()) + (a[r] / top_k) * row_bytes;
      REQUIRE(std::memcmp(got, want, row_bytes) == 0);
    }
  }
}

TEST_CASE("moe_permute: unpermute(permute(x)) with unit weights is K·x", "[moe_permute]") {
  // Large enough (2048 rows of 64) for the ops' parallel paths.
  const int64_t tokens = 512, top_k = 4, d = 64, n_experts = 16;
  const ops::MoePlan plan = ops::moe_plan(random_expert_ids(tokens, top_k, n_experts, 3, 4), n_experts);
  for (DType dtype : {DType::f64, DType::f32}) {
    const Tensor x = test::random_tensor({tokens, d}, dtype, 5);
    Tensor xp = Tensor::empty({tokens * top_k, d}, dtype);
    Tensor y = Tensor::empty({tokens, d}, dtype);
    ops::moe_permute(x, plan, xp);
    ops::moe_unpermute(xp, Tensor::full({tokens, top_k}, 1.0, dtype), plan, y);
    const auto got = y.to_vector();
    const auto xs = x.to_vector();
    // Adding four equal values rounds at most twice: 2 ulps of the dtype, relative.
    const double tol = dtype == DType::f64 ? 5e-16 : 2.5e-7;
    for (size_t i = 0; i < got.size(); ++i) REQUIRE(std::abs(got[i] - top_k * xs[i]) <= tol * std::abs(top_k * xs[i]));
    // The permute backward sums the same rows: also K·x.
    Tensor dx = Tensor::empty({tokens, d}, dtype);
    ops::moe_permute_backward(xp, plan, dx);
    REQUIRE(test::max_abs_diff(dx, y) == 0.0);
  }
}

TEST_CASE("moe_permute: unpermute matches the float64 reference", "[moe_permute]") {
  const int64_t tokens = 37, top_k = 3, d = 10;
  const ops::MoePlan plan = ops::moe_plan(random_expert_ids(tokens, top_k, 8, 5, 6), 8);
  for (DType dtype : {DType::f64, DType::f32}) {
    const Tensor yp = test::random_tensor({tokens * top_k, d}, dtype, 7);
    const Tensor w = test::random_tensor({tokens, top_k}, dtype, 8);
    Tensor y = Tensor::empty({tokens, d}, dtype);
    ops::moe_unpermute(yp, w, plan, y);
    // Three products and sums of O(1) values: f64 1e-15, f32 5e-7 (a few ulps) relative to the scale.
    REQUIRE(test::max_rel_error(y, reference_unpermute(yp, w, plan)) < (dtype == DType::f64 ? 1e-15 : 5e-7));
  }
}

TEST_CASE("moe_permute: backward of permute and unpermute matches finite differences", "[moe_permute]") {
  const int64_t tokens = 7, top_k = 2, d = 5;
  const ops::MoePlan plan = ops::moe_plan(random_expert_ids(tokens, top_k, 4, -1, 9), 4);

  SECTION("permute") {
    Tensor x = test::random_tensor({tokens, d}, DType::f64, 10);
    const Tensor probe = test::random_tensor({tokens * top_k, d}, DType::f64, 11);
    Tensor xp = Tensor::empty({tokens * top_k, d}, DType::f64);
    const Tensor numeric = test::finite_difference(x, [&] {
      ops::moe_permute(x, plan, xp);
      return test::dot(xp, probe);
    });
    Tensor dx = Tensor::full({tokens, d}, 3.0, DType::f64);  // overwritten
    ops::moe_permute_backward(probe, plan, dx);
    // gradcheck.h: 1e-6 relative; the loss is linear so the error is rounding only.
    REQUIRE(test::max_rel_error(dx, numeric) < 1e-6);
  }
  SECTION("unpermute") {
    Tensor yp = test::random_tensor({tokens * top_k, d}, DType::f64, 12);
    Tensor w = test::random_tensor({tokens, top_k}, DType::f64, 13);
    const Tensor probe = test::random_tensor({tokens, d}, DType::f64, 14);
    Tensor y = Tensor::empty({tokens, d}, DType::f64);
    const auto loss = [&] {
      ops::moe_unpermute(yp, w, plan, y);
      return test::dot(y, probe);
    };
    const Tensor numeric_yp = test::finite_difference(yp, loss);
    const Tensor numeric_w = test::finite_difference(w, loss);
    Tensor dyp = Tensor::full(yp.shape(), 3.0, DType::f64);  // both overwritten
    Tensor dw = Tensor::full(w.shape(), 3.0, DType::f64);
    ops::moe_unpermute_backward(probe, yp, w, plan, dyp, dw);
    REQUIRE(test::max_rel_error(dyp, numeric_yp) < 1e-6);
    REQUIRE(test::max_rel_error(dw, numeric_w) < 1e-6);
  }
}

TEST_CASE("moe_permute: malformed plans and shapes throw", "[moe_permute]") {
  const int64_t tokens = 4, top_k = 2, d = 3;
  ops::MoePlan plan = ops::moe_plan(random_expert_ids(tokens, top_k, 4, -1, 15), 4);
  const Tensor x = Tensor::zeros({tokens, d}, DType::f32);
  Tensor xp = Tensor::empty({tokens * top_k, d}, DType::f32);
  Tensor y = Tensor::empty({tokens, d}, DType::f32);
  const Tensor w = Tensor::zeros({tokens, top_k}, DType::f32);
  REQUIRE_THROWS_AS(ops::moe_permute(x.slice(0, 3), plan, xp), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::moe_permute(x, plan, y), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::moe_unpermute(xp, w.to(DType::f64), plan, y), std::invalid_argument);
  Tensor dxp_wrong = Tensor::empty({tokens * top_k, d}, DType::f64);
  REQUIRE_THROWS_AS(ops::moe_permute(x, plan, dxp_wrong), std::invalid_argument);
  plan.assignment.data<int64_t>()[1] = plan.assignment.data<int64_t>()[0];  // a duplicate row
  REQUIRE_THROWS_AS(ops::moe_permute(x, plan, xp), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::moe_unpermute(xp, w, plan, y), std::invalid_argument);
  plan.assignment.data<int64_t>()[1] = tokens * top_k;  // out of range
  REQUIRE_THROWS_AS(ops::moe_permute_backward(xp, plan, y), std::invalid_argument);
}
