#include "trainer/grpo/grpo_loss.h"

#include <fmt/format.h>
#include <algorithm>
#include <cmath>
#include <stdexcept>

#include "kernels/error.h"

namespace dsx::grpo {

namespace {

void check_groups(size_t n, int64_t group_size) {
  if (group_size < 1 || n % static_cast<size_t>(group_size) != 0) {
    throw std::invalid_argument(fmt::format("grpo: {} rewards do not form groups of {}", n, group_size));
  }
}

double mean_of(std::span<const double> v) {
  double s = 0;
  for (double x : v) s += x;
  return v.empty() ? 0.0 : s / static_cast<double>(v.size());
}

// Sample standard deviation (n − 1); 0 for fewer than two values.
double sample_std(std::span<const double> v) {
  if (v.size() < 2) return 0.0;
  const double m = mean_of(v);
  double ss = 0;
  for (double x : v) ss += (x - m) * (x - m);
  return std::sqrt(ss / static_cast<double>(v.size() - 1));
}

bool all_equal(std::span<const double> v) {
  return std::all_of(v.begin(), v.end(), [&](double x) { return x == v.front(); });
}

// Aggregation weight of each valid token of sequence i: loss = Σ_t w_i · loss_t.
std::vector<double> token_weights(const PolicyLossInput& in, const PolicyLossConfig& config, int64_t total_tokens) {
  std::vector<double> w(static_cast<size_t>(in.n_sequences));
  const double n_seq = static_cast<double>(in.n_sequences);
  for (int64_t i = 0; i < in.n_sequences; ++i) {
    switch (config.aggregation) {
      case LossAggregation::grpo:
        // An empty completion contributes 0 but still counts as a sequence, as in TRL.
        w[i] = 1.0 / (static_cast<double>(std::max<int64_t>(in.lengths[i], 1)) * n_seq);
        break;
      case LossAggregation::dapo:
        w[i] = 1.0 / static_cast<double>(std::max<int64_t>(total_tokens, 1));
        break;
      case LossAggregation::dr_grpo:
        w[i] = 1.0 / (n_seq * static_cast<double>(config.max_completion_length));
        break;
    }
  }
  return w;
}

void validate(const PolicyLossInput& in, const PolicyLossConfig& config) {
  const auto n = static_cast<size_t>(in.n_sequences);
  const auto cells = static_cast<size_t>(in.n_sequences * in.width);
  if (in.n_sequences < 0 || in.width < 0 || in.lengths.size() != n || in.advantages.size() != n ||
      in.logp.size() != cells || in.old_logp.size() != cells || (!in.ref_logp.empty() && in.ref_logp.size() != cells)) {
    throw std::invalid_argument("grpo policy_loss: inputs do not match [n_sequences, width]");
  }
  for (int64_t len : in.lengths) {
    if (len < 0 || len > in.width) throw std::invalid_argument("grpo policy_loss: a length is outside [0, width]");
  }
  if (config.epsilon_low < 0 || config.epsilon_high < 0 || config.beta < 0) {
    throw UserError(fmt::format("grpo: epsilon_low, epsilon_high and beta must be >= 0 (got {}, {}, {})",
                                config.epsilon_low, config.epsilon_high, config.beta));
  }
  if (config.beta > 0 && in.ref_logp.empty()) {
    throw std::invalid_argument("grpo policy_loss: beta > 0 needs reference log-probs");
  }
  if (config.aggregation == LossAggregation::dr_grpo) {
    const int64_t longest = in.lengths.empty() ? 0 : *std::max_element(in.lengths.begin(), in.lengths.end());
    if (config.max_completion_length <= 0 || config.max_completion_length < longest) {
      throw UserError(
          fmt::format("grpo: loss aggregation dr_grpo needs max_completion_length >= the longest "
                      "completion ({}), got {}",
                      longest, config.max_completion_length));
    }
  }
}

}  // namespace

std::vector<double> group_advantages(std::span<const double> rewards, int64_t group_size, ScaleRewards scale,
                                     double eps, std::optional<double> step_std) {
  check_groups(rewards.size(), group_size);
  const auto g = static_cast<size_t>(group_size);
  const double batch_std = step_std ? *step_std : sample_std(rewards);
  std::vector<double> adv(rewards.size(), 0.0);
  for (size_t start = 0; start < rewards.size(); start += g) {
    const std::span<const double> group = rewards.subspan(start, g);
    if (all_equal(group)) continue;  // exactly zero, not a rounding residue of r − mean
    const double mean = mean_of(group);
    double denom = 1.0;
    if (scale == ScaleRewards::group) denom = sample_std(group) + eps;
    if (scale == ScaleRewards::batch) denom = batch_std + eps;
    for (size_t j = 0; j < g; ++j) adv[start + j] = (group[j] - mean) / denom;
  }
  return adv;
}

std::vector<bool> zero_spread_groups(std::span<const double> rewards, int64_t group_size) {
  check_groups(rewards.size(), group_size);
  const auto g = static_cast<size_t>(group_size);
  std::vector<bool> flags;
  for (size_t start = 0; start < rewards.size(); start += g) flags.push_back(all_equal(rewards.subspan(start, g)));
  return flags;
}

std::vector<int64_t> informative_sequences(std::span<const double> rewards, int64_t group_size) {
  const std::vector<bool> flags = zero_spread_groups(rewards, group_size);
  std::vector<int64_t> keep;
  for (size_t grp = 0; grp < flags.size(); ++grp) {
    if (flags[grp]) continue;
    for (int64_t j = 0; j < group_size; ++j) keep.push_back(static_cast<int64_t>(grp) * group_size + j);
  }
  return keep;
}

PolicyLossResult policy_loss(const PolicyLossInput& in, const PolicyLossConfig& config) {
  validate(in, config);
  PolicyLossResult r;
  r.grad_logp.assign(in.logp.size(), 0.0);
  for (int64_t len : in.lengths) r.tokens += len;
  const std::vector<double> w = token_weights(in, config, r.tokens);
  const bool have_ref = !in.ref_logp.empty();
  const double lo = 1.0 - config.epsilon_low;
  const double hi = 1.0 + config.epsilon_high;
  int64_t clipped_low = 0, clipped_high = 0;
  double kl_sum = 0;
  for (int64_t i = 0; i < in.n_sequences; ++i) {
    const double a = in.advantages[i];
    for (int64_t t = 0; t < in.lengths[i]; ++t) {
      const size_t k = static_cast<size_t>(i * in.width + t);
      const double ratio = std::exp(in.logp[k] - in.old_logp[k]);
      // min(ρA, clip(ρ)A) takes the clipped term exactly when ρ left the trust region in the
      // direction the advantage pushes it; that term is constant in logp, so no gradient.
      const bool cut_high = a > 0 && ratio > hi;
      const bool cut_low = a < 0 && ratio < lo;
      clipped_high += cut_high;
      clipped_low += cut_low;
      double loss_t = -(cut_high ? hi * a : cut_low ? lo * a : ratio * a);
      double grad_t = (cut_high || cut_low) ? 0.0 : -ratio * a;  // d(ρA)/dlogp = ρA
      if (have_ref) {
        const double d = in.ref_logp[k] - in.logp[k];
        const double kl = std::exp(d) - d - 1.0;
        kl_sum += kl;
        loss_t += config.beta * kl;
        grad_t += config.beta * (1.0 - std::exp(d));  // d KL / d logp
      }
      r.loss += w[i] * loss_t;
      r.grad_logp[k] = w[i] * grad_t;
    }
  }
  if (r.tokens > 0) {
    const double n = static_cast<double>(r.tokens);
    r.clip_fraction_low = static_cast<double>(clipped_low) / n;
    r.clip_fraction_high = static_cast<double>(clipped_high) / n;
    r.mean_kl = kl_sum / n;
  }
  return r;
}

}  // namespace dsx::grpo
