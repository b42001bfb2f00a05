#include "trainer/optim/lr_schedule.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numbers>
#include <stdexcept>

namespace dsx {
namespace {

constexpr int64_t kNever = std::numeric_limits<int64_t>::max();

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return numerator / denominator + (numerator % denominator != 0 ? 1 : 0);
}

// Half a cosine from `from` (p = 0) to `to` (p = 1).
double cosine_between(double from, double to, double p) {
  return to + (from - to) * 0.5 * (1.0 + std::cos(std::numbers::pi * p));
}

double clamp01(double p) {
  return std::clamp(p, 0.0, 1.0);
}

std::string short_number(double value) {
  return fmt::format("{:g}", value);
}

// Token counts as people write them: 469B, 14.8T.
std::string amount(double value, ScheduleUnit unit) {
  if (unit == ScheduleUnit::steps || value < 1e6) return short_number(value);
  if (value >= 1e12) return fmt::format("{:g}T", value / 1e12);
  if (value >= 1e9) return fmt::format("{:g}B", value / 1e9);
  return fmt::format("{:g}M", value / 1e6);
}

}  // namespace

// ---- batch schedule ---------------------------------------------------------------------

BatchSchedule::BatchSchedule(const Recipe& recipe)
    : BatchSchedule(recipe.train.global_batch, recipe.train.batch_ramp.start, recipe.train.batch_ramp.tokens,
                    recipe.train.micro_batch * recipe.parallel.dp, recipe.train.seq_len) {}

BatchSchedule::BatchSchedule(int64_t final, int64_t start, double ramp_tokens, int64_t quantum, int64_t seq_len)
    : final_(final), start_(start), ramp_tokens_(ramp_tokens), quantum_(quantum), seq_len_(seq_len) {
  if (final <= 0 || quantum <= 0 || seq_len <= 0 || final % quantum != 0 || start < 0 || start > final ||
      ramp_tokens < 0)
    throw std::invalid_argument(fmt::format("BatchSchedule: inconsistent final {} start {} ramp {} quantum {}", final,
                                            start, ramp_tokens, quantum));
}

int64_t BatchSchedule::global_batch(int64_t tokens_consumed) const {
  if (!ramps() || static_cast<double>(tokens_consumed) >= ramp_tokens_) return final_;
  const double fraction = static_cast<double>(tokens_consumed) / ramp_tokens_;
  const double raw = static_cast<double>(start_) + static_cast<double>(final_ - start_) * fraction;
  const auto multiples = static_cast<int64_t>(std::floor(raw / static_cast<double>(quantum_) + 0.5));
  return std::clamp(multiples * quantum_, quantum_, final_);
}

int64_t BatchSchedule::next_batch_change(int64_t tokens_consumed) const {
  const int64_t batch = global_batch(tokens_consumed);
  if (batch >= final_) return kNever;
  // Rounding moves up to the next multiple once the raw batch reaches batch + quantum/2.
  const double target = static_cast<double>(batch) + 0.5 * static_cast<double>(quantum_);
  const double at = ramp_tokens_ * (target - static_cast<double>(start_)) / static_cast<double>(final_ - start_);
  int64_t change = std::max(tokens_consumed + 1, static_cast<int64_t>(std::ceil(at)));
  // The division above can be off by an ulp; settle on the exact first token count.
  while (change - 1 > tokens_consumed && global_batch(change - 1) != batch) --change;
  while (global_batch(change) == batch) ++change;
  return change;
}

BatchSchedule::Position BatchSchedule::walk(int64_t max_steps, int64_t min_tokens) const {
  Position at;
  // One run of equal batches per iteration: at most (final - start) / quantum + 1 of them.
  while (at.step < max_steps && at.tokens < min_tokens) {
    const int64_t batch_tokens = global_batch(at.tokens) * seq_len_;
    const int64_t run_end = std::min(next_batch_change(at.tokens), min_tokens);
    const int64_t steps = std::min(ceil_div(run_end - at.tokens, batch_tokens), max_steps - at.step);
    at.step += steps;
    at.tokens += steps * batch_tokens;
  }
  return at;
}

int64_t BatchSchedule::tokens_before_step(int64_t step) const {
  return walk(step, kNever).tokens;
}

int64_t BatchSchedule::steps_to_reach(int64_t tokens) const {
  return walk(kNever, tokens).step;
}

// ---- learning rate ----------------------------------------------------------------------

LrSchedule::LrSchedule(const Recipe& recipe)
    : config_(recipe.optim.schedule),
      peak_(recipe.optim.lr),
      run_length_(recipe.optim.schedule.unit == ScheduleUnit::steps ? static_cast<double>(total_steps(recipe))
                                                                    : static_cast<double>(total_tokens(recipe))) {}

double LrSchedule::warmup_then(double x, double after_warmup) const {
  if (x < config_.warmup) return peak_ * x / config_.warmup;
  return after_warmup;
}

double LrSchedule::lr(int64_t step, int64_t tokens) const {
  const double x = position(config_.unit, step, tokens);
  const double floor_lr = peak_ * config_.min_lr_ratio;
  switch (config_.kind) {
    case ScheduleKind::constant:
      return warmup_then(x, peak_);
    case ScheduleKind::warmup_cosine: {
      const double span = run_length_ - config_.warmup;
      const double p = span > 0 ? clamp01((x - config_.warmup) / span) : 1.0;
      return warmup_then(x, cosine_between(peak_, floor_lr, p));
    }
    case ScheduleKind::wsd: {
      const double decay_start = run_length_ * (1.0 - config_.decay_fraction);
      if (x < decay_start) return warmup_then(x, peak_);
      const double span = run_length_ - decay_start;
      const double p = span > 0 ? clamp01((x - decay_start) / span) : 1.0;
      return config_.decay_shape == DecayShape::linear ? peak_ + (floor_lr - peak_) * p
                                                       : cosine_between(peak_, floor_lr, p);
    }
    case ScheduleKind::piecewise:
      return piecewise(step, tokens);
  }
  return peak_;
}

double LrSchedule::piecewise(int64_t step, int64_t tokens) const {
  double previous_lr = 0;
  for (size_t i = 0; i < config_.segments.size(); ++i) {
    const LrSegment& segment = config_.segments[i];
    const double x = position(segment.unit, step, tokens);
    if (x < segment.until) {
      // Validation guarantees a ramping segment starts at a boundary in its own unit.
      const double start = i == 0 ? 0.0 : config_.segments[i - 1].until;
      const double p = clamp01((x - start) / (segment.until - start));
      switch (segment.kind) {
        case SegmentKind::constant:
          return segment.lr;
        case SegmentKind::linear:
          return previous_lr + (segment.lr - previous_lr) * p;
        case SegmentKind::cosine:
          return cosine_between(previous_lr, segment.lr, p);
      }
    }
    previous_lr = segment.lr;
  }
  return previous_lr;
}

std::string LrSchedule::describe() const {
  const std::string unit(enum_name(config_.unit));
  const std::string warmup =
      config_.warmup > 0 ? fmt::format("warm-up over {} {}, ", amount(config_.warmup, config_.unit), unit) : "";
  const std::string floor_lr = short_number(peak_ * config_.min_lr_ratio);
  switch (config_.kind) {
    case ScheduleKind::constant:
      return fmt::format("constant {}{}", warmup, short_number(peak_));
    case ScheduleKind::warmup_cosine:
      return fmt::format("warmup_cosine: {}peak {}, cosine to {} at {} {}", warmup, short_number(peak_), floor_lr,
                         amount(run_length_, config_.unit), unit);
    case ScheduleKind::wsd:
      return fmt::format("wsd: {}stable {}, {} decay to {} over the last {}% ({} {} in all)", warmup,
                         short_number(peak_), enum_name(config_.decay_shape), floor_lr,
                         short_number(100 * config_.decay_fraction), amount(run_length_, config_.unit), unit);
    case ScheduleKind::piecewise: {
      std::string text = "piecewise:";
      for (const auto& segment : config_.segments)
        text += fmt::format(" {} {} until {} {};", enum_name(segment.kind), short_number(segment.lr),
                            amount(segment.until, segment.unit), enum_name(segment.unit));
      text.pop_back();
      return text;
    }
  }
  return "";
}

double boundary_in_tokens(const LrSegment& segment, const BatchSchedule& batches) {
  if (segment.unit == ScheduleUnit::tokens) return segment.until;
  return static_cast<double>(batches.tokens_before_step(static_cast<int64_t>(std::ceil(segment.until))));
}

}  // namespace dsx
