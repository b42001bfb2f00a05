// Learning-rate and batch-size schedules. Both are pure functions of the training position
// (completed steps, tokens consumed), so a resumed run recomputes exactly the values it would
// have had: a checkpoint only needs the step and the token count.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/recipe/recipe.h"

namespace dsx {

// Global batch (sequences per step) as a function of the tokens consumed so far: a linear
// ramp from `start` to `final` over `ramp_tokens`, rounded to the nearest multiple of
// `quantum` (micro_batch·dp: every rank gets whole micro-batches), then `final` for good.
// DeepSeek-V3: 3072 → 15360 sequences over the first 469B tokens.
class BatchSchedule {
 public:
  explicit BatchSchedule(const Recipe& recipe);
  // start 0 or ramp_tokens 0: no ramp. `final` must be a multiple of `quantum`.
  BatchSchedule(int64_t final, int64_t start, double ramp_tokens, int64_t quantum, int64_t seq_len);

  int64_t global_batch(int64_t tokens_consumed) const;
  int64_t tokens_in_step(int64_t tokens_consumed) const { return global_batch(tokens_consumed) * seq_len_; }
  // Tokens consumed by steps 0 .. step-1.
  int64_t tokens_before_step(int64_t step) const;
  // The fewest steps whose tokens reach `tokens`.
  int64_t steps_to_reach(int64_t tokens) const;
  bool ramps() const { return ramp_tokens_ > 0 && start_ > 0 && start_ != final_; }

 private:
  struct Position {
    int64_t step = 0;
    int64_t tokens = 0;
  };
  // Advances from the start a run of equal batches at a time while fewer than `max_steps`
  // steps are done and fewer than `min_tokens` tokens consumed.
  Position walk(int64_t max_steps, int64_t min_tokens) const;
  int64_t next_batch_change(int64_t tokens_consumed) const;  // first token count with another batch

  int64_t final_;
  int64_t start_;
  double ramp_tokens_;
  int64_t quantum_;
  int64_t seq_len_;
};

// The learning rate of the step that starts after `step` completed steps and `tokens`
// consumed tokens. Kinds (recipe optim.schedule):
//   constant       optim.lr throughout (after the warm-up, if any)
//   warmup_cosine  linear 0 → lr over `warmup`, then cosine to lr·min_lr_ratio at the end of the run
//   wsd            warm-up, stable at lr, then the last decay_fraction of the run decays
//                  (linear or cosine) to lr·min_lr_ratio
//   piecewise      segments {until, unit, kind, lr}: each goes from the previous segment's end
//                  LR (0 before the first) to its `lr`, linearly or along a half cosine, or holds
//                  `lr` (constant); after the last segment the LR keeps its final value
// Progress is measured in steps or tokens (`unit`, per segment for piecewise).
class LrSchedule {
 public:
  explicit LrSchedule(const Recipe& recipe);

  double lr(int64_t step, int64_t tokens) const;
  std::string describe() const;  // one line for `dsx recipe check`

 private:
  double position(ScheduleUnit unit, int64_t step, int64_t tokens) const {
    return unit == ScheduleUnit::steps ? static_cast<double>(step) : static_cast<double>(tokens);
  }
  double warmup_then(double x, double after_warmup) const;
  double piecewise(int64_t step, int64_t tokens) const;

  LrScheduleSection config_;
  double peak_;
  double run_length_;  // total steps or total tokens, in config_.unit
};

// Where each piecewise boundary falls in tokens (steps converted through the batch schedule),
// so boundaries of mixed units can be ordered.
double boundary_in_tokens(const LrSegment& segment, const BatchSchedule& batches);

}  // namespace dsx
