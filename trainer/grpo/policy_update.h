// The GRPO policy update on a batch of rollouts: token layout, reference log-probabilities and
// one optimizer step of the clipped objective (grpo_loss.h) through Model's policy API.
//
// Row i of the policy batch is prompt_i ++ completion_i without its last token, so position
// p predicts token p + 1; only completion tokens are targets (the rest are -100). Rows are
// padded on the right (positions restart at 0 in every row, so padding never affects a real
// token). Completion-token values are moved between this [rows, seq_len] layout and
// grpo_loss.h's [rows, width] layout (token j of completion i at i·width + j).
//
// Micro-batches: the aggregation modes normalise over the whole batch (sequences or tokens), so
// each micro-batch's policy_loss is weighted by its share (sequences / N for grpo and dr_grpo,
// tokens / T for dapo) and the gradients accumulate into one optimizer step.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "trainer/grpo/grpo_loss.h"
#include "trainer/model/model.h"
#include "trainer/optim/optimizer.h"

namespace dsx::grpo {

struct Rollout {
  std::vector<int32_t> prompt;      // prompt tokens (BOS included), non-empty
  std::vector<int32_t> completion;  // generated tokens (EOS included when generated)
  std::vector<double> old_logp;     // log π_old of each completion token (the sampling policy, temperature 1)
  std::vector<double> ref_logp;     // log π_ref of each completion token; empty without a reference model
  double advantage = 0;
};

struct PolicyBatch {
  Batch batch;                   // inputs and targets [rows, seq_len] i32
  int64_t width = 0;             // the longest completion
  std::vector<int64_t> lengths;  // completion tokens per row
  std::vector<int64_t> offsets;  // position of the first completion target in each row (prompt length − 1)
};

// UserError when a rollout has no prompt; pad_id fills the padding (any valid id). Rows are
// padded to the longest one, or to min_seq_len when that is longer.
PolicyBatch pack_rollouts(std::span<const Rollout> rollouts, int32_t pad_id, int64_t min_seq_len = 1);
// [rows · width] completion values of a [rows, seq_len] per-position tensor (0 on padding).
std::vector<double> gather_completion(const Tensor& per_position, const PolicyBatch& pb);
// The inverse: a [rows, seq_len] f64 tensor with the completion values in place, 0 elsewhere.
Tensor scatter_completion(std::span<const double> values, const PolicyBatch& pb);

// log π of every completion token under `model`, micro_batch rollouts at a time (0 = all), one
// vector per rollout. Used for reference models; keeps nothing for a backward.
std::vector<std::vector<double>> completion_logprobs(Model& model, std::span<const Rollout> rollouts,
                                                     int64_t micro_batch, int32_t pad_id);

struct UpdateConfig {
  PolicyLossConfig loss;
  int64_t micro_batch = 0;     // rollouts per forward/backward; 0 = all
  double balance_scale = 1.0;  // weight of the MoE sequence-wise balance loss (as in pre-training)
  int32_t pad_id = 0;
  // The whole step's rollouts and completion tokens when `rollouts` is one data-parallel rank's
  // share (0 = this call's own). The aggregation normalises by these, so each rank's gradient is
  // its part of the step's gradient and their sum over the ranks is the single-process one; the
  // loss, KL, entropy and clip fractions in UpdateStats are then this rank's parts of the step's
  // values (sum them over the ranks).
  int64_t batch_sequences = 0;
  int64_t batch_tokens = 0;
  // Pad every micro-batch's rows to at least this many positions. The MoE router counts padding
  // positions into its expert loads like any other, so the step's pads must not depend on how its
  // rows are split into micro-batches or over ranks: the trainer passes the step's longest row
  // (over every rank), which gives every row the same padded length whatever the layout.
  int64_t seq_len = 1;
};

struct UpdateStats {
  double loss = 0;
  double grad_norm = 0;  // before clipping
  int64_t tokens = 0;    // completion tokens trained on (this call's)
  double clip_fraction_low = 0;
  double clip_fraction_high = 0;
  double mean_kl = 0;
  double entropy = 0;            // token mean of the policy's entropy over completion tokens
  double max_abs_log_ratio = 0;  // max |logp − old_logp|: 0 up to rounding on a batch's first step
};

// zero_grad, then forward/backward of every micro-batch, then optimizer.step(lr).
UpdateStats policy_update(Model& policy, Optimizer& optimizer, double lr, std::span<const Rollout> rollouts,
                          const UpdateConfig& config);

}  // namespace dsx::grpo
