#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/error.h"
#include "trainer/grpo/grpo_loss.h"

using namespace dsx;
using namespace dsx::grpo;

namespace {

// The hand example: two sequences padded to width 3 (A = +1 with 3 tokens, A = −1 with 2).
// Per-token ratios ρ and reference factors k = exp(ref − logp) are chosen so every case of the
// clipped objective appears, with ε_low = 0.2, ε_high = 0.28, β = 0.1:
//   seq 0 (A = +1): ρ = 1.5 (> 1.28: high clip, term 1.28, no grad), ρ = 1.1 (inside),
//                   ρ = 0.5 (low side but A > 0: unclipped);  k = 1, 2, 0.5
//   seq 1 (A = −1): ρ = 0.5 (< 0.8: low clip, term −0.8, no grad), ρ = 1.5 (A < 0: unclipped);
//                   k = 1, 1
// Per token loss −min(ρA, clip(ρ)A) + β(k − ln k − 1) and gradient −ρA·[unclipped] + β(1 − k):
//   seq 0: −1.28,  −1.1 + 0.1(1 − ln2) = −1.0693147,  −0.5 + 0.1(ln2 − 0.5) = −0.4806853
//          grads 0, −1.1 − 0.1 = −1.2, −0.5 + 0.05 = −0.45            (sum of losses −2.83)
//   seq 1: 0.8, 1.5;  grads 0, 1.5                                     (sum of losses 2.3)
// KL per token 0, 0.3068528, 0.1931472, 0, 0 → mean 0.5 / 5 = 0.1.
struct HandExample {
  static constexpr double kPad = 123.0;  // padding values, which must be ignored
  std::vector<int64_t> lengths{3, 2};
  std::vector<double> advantages{1.0, -1.0};
  std::vector<double> old_logp{-1.0, -2.0, -0.5, -1.5, -0.7, kPad};
  std::vector<double> logp, ref_logp;
  HandExample() {
    const std::vector<double> ratio{1.5, 1.1, 0.5, 0.5, 1.5, 1.0};
    const std::vector<double> k{1.0, 2.0, 0.5, 1.0, 1.0, 1.0};
    for (size_t i = 0; i < ratio.size(); ++i) {
      logp.push_back(old_logp[i] + std::log(ratio[i]));
      ref_logp.push_back(logp[i] + std::log(k[i]));
    }
    logp[5] = -kPad;
    ref_logp[5] = kPad;
  }
  PolicyLossInput input() const { return PolicyLossInput{2, 3, lengths, advantages, logp, old_logp, ref_logp}; }
};

PolicyLossConfig config_for(LossAggregation agg) {
  PolicyLossConfig c;
  c.epsilon_low = 0.2;
  c.epsilon_high = 0.28;
  c.beta = 0.1;
  c.aggregation = agg;
  c.max_completion_length = 4;
  return c;
}

// Inputs come from exp/log round trips of the chosen values: relative error ~1e-16 per
// token, so 1e-12 is far above rounding while any slip in the formulas is off by > 1e-3.
constexpr double kTol = 1e-12;

void check_hand(LossAggregation agg, double loss, const std::vector<double>& grad) {
  const HandExample ex;
  const PolicyLossResult r = policy_loss(ex.input(), config_for(agg));
  CHECK(r.loss == Approx(loss).epsilon(kTol));
  REQUIRE(r.grad_logp.size() == grad.size());
  for (size_t i = 0; i < grad.size(); ++i) {
    INFO("token " << i);
    CHECK(r.grad_logp[i] == Approx(grad[i]).margin(kTol));
  }
  CHECK(r.tokens == 5);
  CHECK(r.clip_fraction_low == Approx(0.2).epsilon(kTol));
  CHECK(r.clip_fraction_high == Approx(0.2).epsilon(kTol));
  CHECK(r.mean_kl == Approx(0.1).epsilon(kTol));
}

struct RandomBatch {
  int64_t n = 6, width = 7;
  std::vector<int64_t> lengths{7, 3, 5, 1, 6, 4};
  std::vector<double> advantages, logp, old_logp, ref_logp;
};

// Random tokens with ratios spread over [0.55, 1.65] so both clip sides are hit, kept 1e-3
// away from the kinks at 1 − ε_low and 1 + ε_high (central differences with h = 1e-6 must
// not straddle a kink).
RandomBatch random_batch(uint64_t seed, double eps_low, double eps_high) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> u(0.0, 1.0);
  RandomBatch b;
  for (int64_t i = 0; i < b.n; ++i) b.advantages.push_back(i % 2 == 0 ? 0.3 + u(gen) : -0.3 - u(gen));
  for (int64_t c = 0; c < b.n * b.width; ++c) {
    const double lp = -3.0 + 2.9 * u(gen);
    double log_ratio = 0;
    do {
      log_ratio = std::log(0.55 + 1.1 * u(gen));
    } while (std::abs(std::exp(log_ratio) - (1 - eps_low)) < 1e-3 ||
             std::abs(std::exp(log_ratio) - (1 + eps_high)) < 1e-3);
    b.logp.push_back(lp);
    b.old_logp.push_back(lp - log_ratio);
    b.ref_logp.push_back(lp + (u(gen) - 0.5));
  }
  // Whatever the draw, one token on each clip side: sequence 0 has A > 0, sequence 1 has A < 0.
  b.old_logp[0] = b.logp[0] - std::log(1.5);
  b.old_logp[static_cast<size_t>(b.width)] = b.logp[static_cast<size_t>(b.width)] - std::log(0.6);
  return b;
}

}  // namespace

TEST_CASE("policy loss on the hand example, grpo aggregation", "[grpo_loss]") {
  // Mean per sequence, then over sequences: (−2.83/3 + 2.3/2)/2 = 1.24/12; weights 1/6, 1/4.
  check_hand(LossAggregation::grpo, 1.24 / 12, {0, -1.2 / 6, -0.45 / 6, 0, 1.5 / 4, 0});
}

TEST_CASE("policy loss on the hand example, dapo aggregation", "[grpo_loss]") {
  // Sum over the 5 tokens / 5: −0.53/5.
  check_hand(LossAggregation::dapo, -0.106, {0, -0.24, -0.09, 0, 0.3, 0});
}

TEST_CASE("policy loss on the hand example, dr_grpo aggregation", "[grpo_loss]") {
  // Sum / (2 sequences · max length 4): −0.53/8.
  check_hand(LossAggregation::dr_grpo, -0.06625, {0, -0.15, -0.05625, 0, 0.1875, 0});
}

TEST_CASE("policy loss gradient matches central differences", "[grpo_loss]") {
  for (const LossAggregation agg : {LossAggregation::grpo, LossAggregation::dapo, LossAggregation::dr_grpo}) {
    INFO("aggregation " << static_cast<int>(agg));
    PolicyLossConfig config;
    config.epsilon_low = 0.2;
    config.epsilon_high = 0.28;
    config.beta = 0.05;
    config.aggregation = agg;
    config.max_completion_length = 9;
    RandomBatch b = random_batch(17 + static_cast<uint64_t>(agg), config.epsilon_low, config.epsilon_high);
    auto run = [&] {
      return policy_loss(PolicyLossInput{b.n, b.width, b.lengths, b.advantages, b.logp, b.old_logp, b.ref_logp},
                         config);
    };
    const PolicyLossResult r = run();
    // The check is only meaningful with both kinds of clipping and the KL term in play.
    REQUIRE(r.clip_fraction_low > 0);
    REQUIRE(r.clip_fraction_high > 0);
    REQUIRE(r.mean_kl > 0);
    double scale = 0;
    for (double g : r.grad_logp) scale = std::max(scale, std::abs(g));
    const double h = 1e-6;
    for (size_t c = 0; c < b.logp.size(); ++c) {
      const double saved = b.logp[c];
      b.logp[c] = saved + h;
      const double up = run().loss;
      b.logp[c] = saved - h;
      const double down = run().loss;
      b.logp[c] = saved;
      const double numeric = (up - down) / (2 * h);
      INFO("cell " << c);
      // f64 central differences: truncation O(h²) ≈ 1e-12, rounding ≈ 1e-16/h ≈ 1e-10 of the
      // loss scale; 1e-6 of the largest gradient leaves a wide margin, a wrong term is O(1e-2).
      CHECK(std::abs(r.grad_logp[c] - numeric) <= 1e-6 * scale);
      const bool padding = static_cast<int64_t>(c % b.width) >= b.lengths[c / b.width];
      if (padding) CHECK(r.grad_logp[c] == 0.0);
    }
  }
}

TEST_CASE("policy loss without a reference and on-policy ratios", "[grpo_loss]") {
  // μ = 1: logp == old_logp so ρ = 1, no clipping; with β = 0 the dapo loss is −mean(A) per
  // token and d loss/d logp = −A / tokens.
  const std::vector<int64_t> lengths{2, 1};
  const std::vector<double> adv{0.5, -2.0};
  const std::vector<double> lp{-1.0, -2.0, -3.0, 0.0};
  PolicyLossConfig config;
  config.aggregation = LossAggregation::dapo;
  const PolicyLossResult r = policy_loss(PolicyLossInput{2, 2, lengths, adv, lp, lp, {}}, config);
  CHECK(r.loss == Approx(-(0.5 + 0.5 - 2.0) / 3).epsilon(1e-15));
  CHECK(r.grad_logp == std::vector<double>{-0.5 / 3, -0.5 / 3, 2.0 / 3, 0.0});
  CHECK(r.clip_fraction_low == 0);
  CHECK(r.clip_fraction_high == 0);
  CHECK(r.mean_kl == 0);
}

TEST_CASE("policy loss rejects bad configurations", "[grpo_loss]") {
  const HandExample ex;
  PolicyLossConfig c = config_for(LossAggregation::dr_grpo);
  c.max_completion_length = 2;  // shorter than the 3-token completion
  CHECK_THROWS_AS(policy_loss(ex.input(), c), UserError);
  c = config_for(LossAggregation::grpo);
  c.epsilon_low = -0.1;
  CHECK_THROWS_AS(policy_loss(ex.input(), c), UserError);
  PolicyLossInput no_ref = ex.input();
  no_ref.ref_logp = {};
  CHECK_THROWS_AS(policy_loss(no_ref, config_for(LossAggregation::grpo)), std::invalid_argument);
  PolicyLossInput short_adv = ex.input();
  short_adv.advantages = short_adv.advantages.first(1);
  CHECK_THROWS_AS(policy_loss(short_adv, config_for(LossAggregation::grpo)), std::invalid_argument);
}

TEST_CASE("group advantages for each scale_rewards mode", "[grpo_loss]") {
  // Two groups of 3: {1, 0, 0} (mean 1/3, sample std 1/√3) and {2, 4, 6} (mean 4, std 2).
  const std::vector<double> rewards{1, 0, 0, 2, 4, 6};
  const double eps = 1e-4;
  const double s1 = 1 / std::sqrt(3.0);
  // Whole batch: mean 13/6, Σ(r − mean)² = 173/6 (=Σr² − 6·mean² = 57 − 169/6), n − 1 = 5.
  const double sb = std::sqrt(173.0 / 30);
  const std::vector<double> centred{2.0 / 3, -1.0 / 3, -1.0 / 3, -2, 0, 2};
  // A handful of double operations on exact inputs: 1e-14 relative is far above rounding.
  SECTION("group") {
    const auto a = group_advantages(rewards, 3, ScaleRewards::group, eps);
    const std::vector<double> denom{s1 + eps, s1 + eps, s1 + eps, 2 + eps, 2 + eps, 2 + eps};
    for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(centred[i] / denom[i]).margin(1e-14));
  }
  SECTION("batch") {
    const auto a = group_advantages(rewards, 3, ScaleRewards::batch, eps);
    for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(centred[i] / (sb + eps)).margin(1e-14));
  }
  SECTION("none") {
    const auto a = group_advantages(rewards, 3, ScaleRewards::none, eps);
    for (size_t i = 0; i < a.size(); ++i) CHECK(a[i] == Approx(centred[i]).margin(1e-14));
  }
  CHECK_THROWS_AS(group_advantages(rewards, 4, ScaleRewards::group), std::invalid_argument);
}

TEST_CASE("groups with equal rewards get zero advantages and are flagged", "[grpo_loss]") {
  // 0.1 · 3 / 3 ≠ 0.1 in floating point: the zero must not depend on that rounding.
  const std::vector<double> rewards{0.1, 0.1, 0.1, 1, 0, 1, 0.7, 0.7, 0.7, 0, 0, 0};
  for (const ScaleRewards mode : {ScaleRewards::group, ScaleRewards::batch, ScaleRewards::none}) {
    const auto a = group_advantages(rewards, 3, mode);
    for (size_t i : {0, 1, 2, 6, 7, 8, 9, 10, 11}) CHECK(a[i] == 0.0);
    CHECK(a[3] > 0);
    CHECK(a[4] < 0);
  }
  CHECK(zero_spread_groups(rewards, 3) == std::vector<bool>{true, false, true, true});
  CHECK(informative_sequences(rewards, 3) == std::vector<int64_t>{3, 4, 5});
}
