// GRPO advantages and the clipped policy objective (DeepSeekMath; DAPO and Dr. GRPO variants).
//
// Rollouts come in groups of G completions per prompt, group after group. Token-level inputs
// are padded row-major [n_sequences, width] arrays; sequence i has lengths[i] valid tokens at
// its start and the rest is ignored (its gradient is zero).
//
// Per valid token, with ρ = exp(logp − logp_old) and advantage A of its sequence:
//   loss_t = −min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A) + β·KL_t,
//   KL_t = exp(ref − logp) − (ref − logp) − 1   (the k3 estimator, ≥ 0, unbiased for KL(π‖ref))
// and the batch loss is Σ_t w_t·loss_t with the weights of the aggregation mode.
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

namespace dsx::grpo {

enum class ScaleRewards { group, batch, none };
enum class LossAggregation {
  grpo,     // mean over each sequence's tokens, then mean over sequences
  dapo,     // sum over all tokens / number of valid tokens in the batch
  dr_grpo,  // sum over all tokens / (n_sequences · max_completion_length)
};

// Advantages for rewards laid out as consecutive groups of group_size:
//   group: (r − mean_g) / (std_g + eps)       batch: (r − mean_g) / (std_batch + eps)
//   none:  r − mean_g (Dr. GRPO)
// std is the sample standard deviation (n − 1), as TRL computes it. Groups whose rewards are
// all equal get exactly zero advantages. std::invalid_argument when the size is not a
// multiple of group_size or group_size < 1.
//
// batch_std (scale batch only): the standard deviation of the whole step's rewards when
// `rewards` is one data-parallel rank's share of them (the ranks' groups together form the step);
// unset, it is computed from `rewards`.
std::vector<double> group_advantages(std::span<const double> rewards, int64_t group_size, ScaleRewards scale,
                                     double eps = 1e-4, std::optional<double> batch_std = std::nullopt);

// One flag per group: true when all its rewards are equal, so it carries no learning signal
// (DAPO's dynamic sampling drops these groups; the fraction is a metric).
std::vector<bool> zero_spread_groups(std::span<const double> rewards, int64_t group_size);

// Indices of the sequences that belong to groups not flagged by zero_spread_groups.
std::vector<int64_t> informative_sequences(std::span<const double> rewards, int64_t group_size);

struct PolicyLossConfig {
  double epsilon_low = 0.2;
  double epsilon_high = 0.2;  // DAPO's clip-higher uses 0.28
  double beta = 0.0;          // KL coefficient; 0 needs no reference log-probs
  LossAggregation aggregation = LossAggregation::grpo;
  int64_t max_completion_length = 0;  // needed by dr_grpo: ≥ every length
};

struct PolicyLossInput {
  int64_t n_sequences = 0;
  int64_t width = 0;
  std::span<const int64_t> lengths;    // [n_sequences], each in [0, width]
  std::span<const double> advantages;  // [n_sequences]
  std::span<const double> logp;        // [n_sequences · width], current policy
  std::span<const double> old_logp;    // same shape, the rollout policy π_old
  std::span<const double> ref_logp;    // same shape, or empty (required when beta > 0)
};

struct PolicyLossResult {
  double loss = 0;
  std::vector<double> grad_logp;  // d loss / d logp, [n_sequences · width], 0 on padding
  int64_t tokens = 0;             // valid tokens
  double clip_fraction_low = 0;   // tokens with A < 0 and ρ < 1 − ε_low (gradient cut)
  double clip_fraction_high = 0;  // tokens with A > 0 and ρ > 1 + ε_high (gradient cut)
  double mean_kl = 0;             // token mean of KL_t (0 without reference log-probs)
};

// UserError for a bad configuration (negative ε or β, dr_grpo without a max length covering
// the batch); std::invalid_argument for inconsistent shapes.
PolicyLossResult policy_loss(const PolicyLossInput& in, const PolicyLossConfig& config);

}  // namespace dsx::grpo
