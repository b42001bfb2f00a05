#include <algorithm>
#include <catch2/catch.hpp>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "kernels/ops/router.h"
#include "support/gradcheck.h"

using namespace dsx;
using ops::RouterConfig;

namespace {

RouterConfig v3_like() {  // DeepSeek-V3's routing rules at a small size
  RouterConfig c;
  c.n_experts = 16;
  c.n_group = 4;
  c.topk_group = 2;
  c.top_k = 4;
  c.scoring = RouterConfig::Scoring::sigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 2.5;
  return c;
}

RouterConfig v2_lite_like() {  // softmax, no groups, unnormalised weights
  RouterConfig c;
  c.n_experts = 64;
  c.n_group = 1;
  c.topk_group = 1;
  c.top_k = 6;
  c.scoring = RouterConfig::Scoring::softmax;
  c.norm_topk_prob = false;
  c.routed_scaling_factor = 1.0;
  return c;
}

// The router for one token, written plainly in float64 with sorts instead of the op's partial sorts.
struct ReferenceRoute {
  std::vector<double> scores;
  std::vector<int> ids;
  std::vector<double> weights;
  // Smallest gap between consecutive entries of the sorted candidate and group lists around the
  // choices: a token whose margin is below the f32 rounding of the scores may legitimately be
  // routed differently in f32.
  double margin = INFINITY;
};

ReferenceRoute reference_route(const RouterConfig& c, const double* logits, const double* bias) {
  const int n = static_cast<int>(c.n_experts);
  ReferenceRoute r;
  r.scores.resize(n);
  if (c.scoring == RouterConfig::Scoring::sigmoid) {
    for (int e = 0; e < n; ++e) r.scores[e] = 1.0 / (1.0 + std::exp(-logits[e]));
  } else {
    const double top = *std::max_element(logits, logits + n);
    double z = 0;
    for (int e = 0; e < n; ++e) z += std::exp(logits[e] - top);
    for (int e = 0; e < n; ++e) r.scores[e] = std::exp(logits[e] - top) / z;
  }
  std::vector<double> biased(n);
  for (int e = 0; e < n; ++e) biased[e] = r.scores[e] + (bias ? bias[e] : 0.0);

  const int group_size = n / static_cast<int>(c.n_group);
  std::vector<double> group_score(c.n_group);
  for (int g = 0; g < c.n_group; ++g) {
    std::vector<double> members(biased.begin() + g * group_size, biased.begin() + (g + 1) * group_size);
    std::sort(members.begin(), members.end(), std::greater<>());
    group_score[g] = members[0] + (group_size > 1 ? members[1] : 0.0);
  }
  // Stable sorts of index-ordered lists: equal scores keep the lower index first.
  std::vector<int> groups(c.n_group);
  std::iota(groups.begin(), groups.end(), 0);
  std::stable_sort(groups.begin(), groups.end(), [&](int a, int b) { return group_score[a] > group_score[b]; });
  if (c.topk_group < c.n_group) {
    r.margin = group_score[groups[c.topk_group - 1]] - group_score[groups[c.topk_group]];
  }
  std::vector<int> candidates;
  for (int e = 0; e < n; ++e) {
    const auto kept_end = groups.begin() + c.topk_group;
    if (std::find(groups.begin(), kept_end, e / group_size) != kept_end) candidates.push_back(e);
  }
  std::stable_sort(candidates.begin(), candidates.end(), [&](int a, int b) { return biased[a] > biased[b]; });
  for (size_t i = 0; i + 1 < candidates.size() && i < static_cast<size_t>(c.top_k); ++i) {
    r.margin = std::min(r.margin, biased[candidates[i]] - biased[candidates[i + 1]]);
  }
  r.ids.assign(candidates.begin(), candidates.begin() + c.top_k);
  double chosen_sum = 0;
  for (int id : r.ids) chosen_sum += r.scores[id];
  for (int id : r.ids) {
    const double w = c.norm_topk_prob ? r.scores[id] / chosen_sum : r.scores[id];
    r.weights.push_back(w * c.routed_scaling_factor);
  }
  return r;
}

struct Routed {
  Tensor scores, ids, weights;
};

Routed route(const RouterConfig& c, const Tensor& logits, const Tensor& bias = Tensor()) {
  const int64_t tokens = logits.dim(0);
  Routed r{Tensor::empty(logits.shape(), logits.dtype()), Tensor::empty({tokens, c.top_k}, DType::i32),
           Tensor::empty({tokens, c.top_k}, logits.dtype())};
  ops::router_forward(c, logits, bias, r.scores, r.ids, r.weights);
  return r;
}

std::vector<int> ids_of(const Tensor& ids) {
  const auto v = ids.to_vector();
  return std::vector<int>(v.begin(), v.end());
}

Tensor logits_for_scores(const std::vector<double>& p) {  // sigmoid⁻¹, so the test can state scores
  std::vector<double> x;
  for (double v : p) x.push_back(std::log(v / (1.0 - v)));
  return Tensor::from<double>(x, {1, static_cast<int64_t>(p.size())});
}

// Compares the op against the reference on random logits (and bias when given); f32 tokens whose
// selection margin is below 1e-5 (f32 scores carry ~1e-7 error) are excused from the id check.
void compare_with_reference(const RouterConfig& c, DType dtype, bool with_bias, uint64_t seed, int64_t tokens = 200) {
  const Tensor logits64 =
      test::random_tensor({tokens, c.n_experts}, DType::f64, seed, -3.0, 3.0).to(dtype).to(DType::f64);
  const Tensor bias64 =
      with_bias ? test::random_tensor({c.n_experts}, DType::f64, seed + 1, -0.3, 0.3).to(dtype).to(DType::f64)
                : Tensor();
  const Routed r = route(c, logits64.to(dtype), with_bias ? bias64.to(dtype) : Tensor());
  const auto ids = ids_of(r.ids);
  const auto weights = r.weights.to_vector();
  const auto scores = r.scores.to_vector();
  // f64: a few roundings of O(1) values, 1e-13 leaves ample margin. f32: exp, divide, scale each
  // round at 6e-8 relative; 2e-6 of the O(2.5) weights still catches any formula error.
  const double tol = dtype == DType::f64 ? 1e-13 : 2e-6;
  int excused = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    const ReferenceRoute ref =
        reference_route(c, logits64.data<double>() + t * c.n_experts, with_bias ? bias64.data<double>() : nullptr);
    for (int64_t e = 0; e < c.n_experts; ++e) REQUIRE(std::abs(scores[t * c.n_experts + e] - ref.scores[e]) < tol);
    if (dtype == DType::f32 && ref.margin < 1e-5) {
      ++excused;
      continue;
    }
    for (int64_t k = 0; k < c.top_k; ++k) {
      INFO("token " << t << " choice " << k);
      REQUIRE(ids[t * c.top_k + k] == ref.ids[k]);
      REQUIRE(std::abs(weights[t * c.top_k + k] - ref.weights[k]) < tol);
    }
  }
  REQUIRE(excused <= tokens / 20);
}

}  // namespace

TEST_CASE("router: V3-like sigmoid routing matches the float64 reference", "[router]") {
  const RouterConfig c = v3_like();
  for (DType dtype : {DType::f64, DType::f32}) {
    for (bool with_bias : {false, true}) {
      INFO("dtype " << dtype_name(dtype) << " bias " << with_bias);
      compare_with_reference(c, dtype, with_bias, 11);
    }
  }
}

TEST_CASE("router: V2-Lite-like softmax routing matches the float64 reference", "[router]") {
  const RouterConfig c = v2_lite_like();
  for (DType dtype : {DType::f64, DType::f32}) {
    for (bool with_bias : {false, true}) {
      INFO("dtype " << dtype_name(dtype) << " bias " << with_bias);
      compare_with_reference(c, dtype, with_bias, 23);
    }
  }
}

TEST_CASE("router: DeepSeek-V3's full routing shape matches the float64 reference", "[router]") {
  RouterConfig c = v3_like();
  c.n_experts = 256;
  c.n_group = 8;
  c.topk_group = 4;
  c.top_k = 8;
  // 256 tokens · 256 experts: above the op's parallel threshold, so the threaded path is compared too.
  for (DType dtype : {DType::f64, DType::f32}) {
    INFO("dtype " << dtype_name(dtype));
    compare_with_reference(c, dtype, true, 13, 256);
  }
}

TEST_CASE("router: n_group 1 with sigmoid scores and top_k = every expert of the kept groups", "[router]") {
  RouterConfig flat = v3_like();
  flat.n_group = 1;
  flat.topk_group = 1;
  compare_with_reference(flat, DType::f64, true, 5);

  RouterConfig all_kept = v3_like();
  all_kept.top_k = all_kept.topk_group * all_kept.n_experts / all_kept.n_group;  // 8
  compare_with_reference(all_kept, DType::f64, true, 7);
  const Tensor logits = test::random_tensor({50, all_kept.n_experts}, DType::f64, 8, -3.0, 3.0);
  const Routed r = route(all_kept, logits);
  const auto ids = ids_of(r.ids);
  const auto w = r.weights.to_vector();
  for (int64_t t = 0; t < 50; ++t) {
    // The chosen experts are exactly two whole groups of four, and the weights sum to the scale.
    std::vector<int> chosen(ids.begin() + t * 8, ids.begin() + (t + 1) * 8);
    std::vector<int> per_group(4, 0);
    for (int id : chosen) ++per_group[id / 4];
    REQUIRE(std::count(per_group.begin(), per_group.end(), 4) == 2);
    REQUIRE(std::accumulate(w.begin() + t * 8, w.begin() + (t + 1) * 8, 0.0) == Approx(2.5).epsilon(1e-14));
  }
}

TEST_CASE("router: exact ties go to the lower expert and group index, deterministically", "[router]") {
  SECTION("all logits equal, groups and experts tie") {
    const RouterConfig c = v3_like();
    const Tensor logits = Tensor::zeros({3, c.n_experts}, DType::f32);
    const Routed first = route(c, logits);
    const Routed second = route(c, logits);
    REQUIRE(ids_of(first.ids) == std::vector<int>{0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3});
    REQUIRE(ids_of(second.ids) == ids_of(first.ids));
    for (double w : first.weights.to_vector()) REQUIRE(w == Approx(2.5 / 4).epsilon(1e-7));
  }
  SECTION("a tie for the last slot") {
    RouterConfig c = v2_lite_like();
    c.n_experts = 8;
    c.top_k = 3;
    const Tensor logits = Tensor::from<double>({0.1, 0.5, 0.3, 0.9, 0.3, 0.2, 0.0, 0.3}, {1, 8});
    REQUIRE(ids_of(route(c, logits).ids) == std::vector<int>{3, 1, 2});
  }
  SECTION("two groups tie for the last kept place") {
    RouterConfig c = v3_like();
    c.n_experts = 8;  // four groups of two
    c.topk_group = 1;
    c.top_k = 2;
    // Group scores 0.8+0.2 = 1.0 for groups 1 and 3 (the same values in another order), less elsewhere.
    const Tensor logits = logits_for_scores({0.3, 0.3, 0.8, 0.2, 0.4, 0.4, 0.2, 0.8});
    REQUIRE(ids_of(route(c, logits).ids) == std::vector<int>{2, 3});
  }
}

TEST_CASE("router: group score is the sum of the top two biased scores", "[router]") {
  RouterConfig c;
  c.n_experts = 8;
  c.n_group = 2;
  c.topk_group = 1;
  c.top_k = 2;
  c.scoring = RouterConfig::Scoring::sigmoid;
  c.norm_topk_prob = true;
  c.routed_scaling_factor = 1.0;
  // Group 0 has the best expert (0.9) but a weak second (top-2 sum 1.0); group 1 has two medium
  // experts (1.2): a top-1 group rule would keep group 0, the top-2 rule keeps group 1.
  const Routed medium = route(c, logits_for_scores({0.9, 0.1, 0.1, 0.1, 0.6, 0.6, 0.1, 0.1}));
  REQUIRE(ids_of(medium.ids) == std::vector<int>{4, 5});
  REQUIRE(medium.weights.to_vector()[0] == Approx(0.5).epsilon(1e-12));
  // Group 0: top-2 sum 1.4 (total 1.5); group 1: top-2 sum 1.2 (total 2.4): summing whole groups
  // would keep group 1, the top-2 rule keeps group 0.
  const Routed pair = route(c, logits_for_scores({0.7, 0.7, 0.05, 0.05, 0.6, 0.6, 0.6, 0.6}));
  REQUIRE(ids_of(pair.ids) == std::vector<int>{0, 1});
}

TEST_CASE("router: bias changes the selection but not the weights of the chosen experts", "[router]") {
  for (const RouterConfig& c : {v3_like(), v2_lite_like()}) {
    const Tensor logits = test::random_tensor({8, c.n_experts}, DType::f64, 31, -2.0, 2.0);
    const Routed plain = route(c, logits);
    Tensor bias = Tensor::zeros({c.n_experts}, DType::f64);
    bias.data<double>()[c.n_experts - 1] = 10.0;  // forces the last expert (and for V3 its group) in
    const Routed biased = route(c, logits, bias);
    REQUIRE(test::max_abs_diff(plain.scores, biased.scores) == 0.0);  // scores stay unbiased
    const auto ids = ids_of(biased.ids);
    const auto w = biased.weights.to_vector();
    const auto s = biased.scores.to_vector();
    int changed = 0;
    for (int64_t t = 0; t < 8; ++t) {
      REQUIRE(ids[t * c.top_k] == c.n_experts - 1);
      const auto plain_ids = ids_of(plain.ids);
      const auto plain_end = plain_ids.begin() + (t + 1) * c.top_k;
      changed += std::find(plain_end - c.top_k, plain_end, c.n_experts - 1) == plain_end;
      double chosen_sum = 0;
      for (int64_t k = 0; k < c.top_k; ++k) chosen_sum += s[t * c.n_experts + ids[t * c.top_k + k]];
      for (int64_t k = 0; k < c.top_k; ++k) {
        const double unbiased = s[t * c.n_experts + ids[t * c.top_k + k]];
        const double expected = (c.norm_topk_prob ? unbiased / chosen_sum : unbiased) * c.routed_scaling_factor;
        REQUIRE(w[t * c.top_k + k] == Approx(expected).epsilon(1e-14));
      }
    }
    REQUIRE(changed > 0);  // for those tokens the bias brought in an expert the scores alone did not pick
  }
}

TEST_CASE("router: invalid configs and shapes throw", "[router]") {
  const Tensor logits = Tensor::zeros({2, 16}, DType::f32);
  const auto rejects = [&](RouterConfig c) {
    Tensor s = Tensor::empty({2, 16}, DType::f32), ids = Tensor::empty({2, c.top_k}, DType::i32),
           w = Tensor::empty({2, c.top_k}, DType::f32);
    REQUIRE_THROWS_AS(ops::router_forward(c, logits, Tensor(), s, ids, w), std::invalid_argument);
  };
  RouterConfig c = v3_like();
  c.n_group = 3;  // 16 % 3 != 0
  rejects(c);
  c = v3_like();
  c.topk_group = 5;  // more groups than exist
  rejects(c);
  c = v3_like();
  c.top_k = 9;  // the two kept groups hold 8 experts
  rejects(c);
  c = v3_like();
  c.top_k = 0;
  rejects(c);
  c = v3_like();
  c.n_group = 0;
  rejects(c);
  c = v3_like();
  c.n_experts = 8;  // logits are 16 wide
  c.n_group = 2;
  rejects(c);

  c = v3_like();
  Tensor s = Tensor::empty({2, 16}, DType::f32), w = Tensor::empty({2, 4}, DType::f32);
  Tensor ids64 = Tensor::empty({2, 4}, DType::i64);
  REQUIRE_THROWS_AS(ops::router_forward(c, logits, Tensor(), s, ids64, w), std::invalid_argument);
  Tensor ids = Tensor::empty({2, 4}, DType::i32);
  REQUIRE_THROWS_AS(ops::router_forward(c, logits, Tensor::zeros({16}, DType::f64), s, ids, w), std::invalid_argument);
  Tensor bad_ids = Tensor::from<int32_t>({0, 1, 2, 16, 0, 1, 2, 3}, {2, 4});
  Tensor dl = Tensor::empty({2, 16}, DType::f32);
  REQUIRE_THROWS_AS(ops::router_backward(c, s, bad_ids, w, dl), std::invalid_argument);
}

TEST_CASE("router: backward matches central finite differences", "[router]") {
  for (const RouterConfig& c : {v3_like(), v2_lite_like()}) {
    INFO("scoring " << (c.scoring == RouterConfig::Scoring::sigmoid ? "sigmoid" : "softmax"));
    const int64_t tokens = 6;
    Tensor logits = test::random_tensor({tokens, c.n_experts}, DType::f64, 41, -2.0, 2.0);
    const Tensor bias = test::random_tensor({c.n_experts}, DType::f64, 42, -0.2, 0.2);
    const Tensor probe = test::random_tensor({tokens, c.top_k}, DType::f64, 43);
    const Routed base = route(c, logits, bias);
    const auto base_ids = ids_of(base.ids);
    bool selection_changed = false;
    const Tensor numeric = test::finite_difference(logits, [&] {
      const Routed r = route(c, logits, bias);
      selection_changed |= ids_of(r.ids) != base_ids;  // the gradient only exists where selection is fixed
      return test::dot(r.weights, probe);
    });
    REQUIRE_FALSE(selection_changed);
    Tensor analytic = Tensor::full({tokens, c.n_experts}, 7.0, DType::f64);  // overwritten, not accumulated
    ops::router_backward(c, base.scores, base.ids, probe, analytic);
    // gradcheck.h: h = 1e-6 in f64 gives ~1e-10 relative error; a wrong gradient is off by O(1).
    REQUIRE(test::max_rel_error(analytic, numeric) < 1e-6);

    // The f32 backward computes the same function: agreement to f32 rounding (1e-5 of the scale).
    const Routed base32 = route(c, logits.to(DType::f32), bias.to(DType::f32));
    Tensor analytic32 = Tensor::empty({tokens, c.n_experts}, DType::f32);
    ops::router_backward(c, base32.scores, base32.ids, probe.to(DType::f32), analytic32);
    REQUIRE(test::max_rel_error(analytic32, analytic) < 1e-5);
  }
}

TEST_CASE("router: expert counts and the aux-loss-free bias update", "[router]") {
  Tensor counts = Tensor::full({4}, 99.0, DType::i64);
  ops::expert_counts(Tensor::from<int32_t>({0, 2, 2, 1, 2, 0}, {3, 2}), 4, counts);
  REQUIRE(counts.to_vector() == std::vector<double>{2, 1, 3, 0});
  ops::expert_counts(Tensor::from<int64_t>({3, 3}, {1, 2}), 4, counts);
  REQUIRE(counts.to_vector() == std::vector<double>{0, 0, 0, 2});
  REQUIRE_THROWS_AS(ops::expert_counts(Tensor::from<int32_t>({0, 4}, {1, 2}), 4, counts), std::invalid_argument);

  // Mean load 3: the overloaded expert goes down by gamma, the underloaded up, the others stay.
  Tensor bias = Tensor::from<double>({0.1, 0.2, 0.3, 0.4}, {4});
  ops::router_update_bias(Tensor::from<int64_t>({5, 1, 3, 3}, {4}), 0.001, bias);
  REQUIRE(bias.to_vector() == std::vector<double>{0.1 - 0.001, 0.2 + 0.001, 0.3, 0.4});
  REQUIRE_THROWS_AS(ops::router_update_bias(Tensor::from<int64_t>({1, 2}, {2}), 0.001, bias), std::invalid_argument);
}

TEST_CASE("router: bias updates balance a skewed load", "[router]") {
  RouterConfig c = v3_like();
  c.n_experts = 8;
  c.n_group = 1;
  c.topk_group = 1;
  c.top_k = 2;
  const int64_t tokens = 256;
  Tensor logits = test::random_tensor({tokens, c.n_experts}, DType::f32, 51, -1.0, 1.0);
  float* x = logits.data<float>();
  for (int64_t t = 0; t < tokens; ++t) x[t * c.n_experts] += 2.0f;  // expert 0 wins almost every token
  Tensor bias = Tensor::zeros({c.n_experts}, DType::f32);
  Tensor counts = Tensor::empty({c.n_experts}, DType::i64);
  const auto max_load = [&] {
    const Routed r = route(c, logits, bias);
    ops::expert_counts(r.ids, c.n_experts, counts);
    const auto v = counts.to_vector();
    return *std::max_element(v.begin(), v.end());
  };
  const double skewed = max_load();
  for (int step = 0; step < 100; ++step) {
    max_load();
    ops::router_update_bias(counts, 0.02, bias);
  }
  const double balanced = max_load();
  // Perfect balance is 64 per expert; the skewed start sends ~all 256 tokens to expert 0.
  INFO("max load " << skewed << " -> " << balanced);
  REQUIRE(skewed > 200);
  REQUIRE(balanced < 100);
  REQUIRE(bias.to_vector()[0] < 0);
}

TEST_CASE("router: sequence-wise balance loss on a hand-computed example", "[router]") {
  RouterConfig c;
  c.n_experts = 4;
  c.top_k = 2;
  // Two sequences of two tokens. Sequence 0 (scores sum to 1): f = 4/(2·2)·counts = [2, 1, 1, 0],
  // P = [0.35, 0.225, 0.2625, 0.1625], Σ f·P = 1.1875. Sequence 1 (rows normalise to
  // [0.4, 0.2, 0.2, 0.2] and [0.25]·4): f = [1, 2, 1, 0], P = [0.325, 0.225, 0.225, 0.225],
  // Σ f·P = 1.0. Loss = α · (1.1875 + 1.0) / 2 = α · 1.09375.
  const Tensor scores = Tensor::from<double>(
      {0.5, 0.25, 0.125, 0.125, 0.2, 0.2, 0.4, 0.2, 0.8, 0.4, 0.4, 0.4, 0.1, 0.1, 0.1, 0.1}, {4, 4});
  const Tensor ids = Tensor::from<int32_t>({0, 1, 2, 0, 0, 1, 1, 2}, {4, 2});
  REQUIRE(ops::balance_loss_forward(c, scores, ids, 2, 0.01) == Approx(0.01 * 1.09375).epsilon(1e-14));
  REQUIRE(ops::balance_loss_forward(c, scores.to(DType::f32), ids, 2, 0.01) == Approx(0.01 * 1.09375).epsilon(1e-6));
  // As one sequence of four tokens: f = 4/(2·4)·[3, 3, 2, 0], P = [0.3375, 0.225, 0.24375, 0.19375].
  const double one_seq = 1.5 * 0.3375 + 1.5 * 0.225 + 1.0 * 0.24375;
  REQUIRE(ops::balance_loss_forward(c, scores, ids, 1, 0.01) == Approx(0.01 * one_seq).epsilon(1e-14));
  REQUIRE_THROWS_AS(ops::balance_loss_forward(c, scores, ids, 3, 0.01), std::invalid_argument);
}

TEST_CASE("router: balance loss backward matches central finite differences", "[router]") {
  for (const RouterConfig& c : {v3_like(), v2_lite_like()}) {
    INFO("scoring " << (c.scoring == RouterConfig::Scoring::sigmoid ? "sigmoid" : "softmax"));
    const int64_t tokens = 6;
    const int64_t n_seq = 2;
    const double alpha = 0.3;
    const double dloss = 1.7;
    Tensor logits = test::random_tensor({tokens, c.n_experts}, DType::f64, 61, -2.0, 2.0);
    const Routed base = route(c, logits);
    const auto base_ids = ids_of(base.ids);
    bool selection_changed = false;
    const Tensor numeric = test::finite_difference(logits, [&] {
      const Routed r = route(c, logits);
      selection_changed |= ids_of(r.ids) != base_ids;
      return dloss * ops::balance_loss_forward(c, r.scores, base.ids, n_seq, alpha);
    });
    REQUIRE_FALSE(selection_changed);
    const Tensor start = test::random_tensor({tokens, c.n_experts}, DType::f64, 62);
    Tensor analytic = start.clone();  // accumulates: analytic - start is the gradient
    ops::balance_loss_backward(c, base.scores, base.ids, n_seq, alpha, dloss, analytic);
    const auto a = analytic.to_vector();
    const auto s = start.to_vector();
    std::vector<double> gradient(a.size());
    for (size_t i = 0; i < a.size(); ++i) gradient[i] = a[i] - s[i];
    // gradcheck.h tolerance; the subtraction of start (O(1)) adds only ~1e-16 absolute error.
    REQUIRE(test::max_rel_error(Tensor::from<double>(gradient, analytic.shape()), numeric) < 1e-6);
  }
}
