// Console lines and JSONL objects of the GRPO stage (declared in grpo_trainer.h).
#include <fmt/core.h>

#include "trainer/grpo/grpo_trainer.h"
#include "trainer/train/metrics.h"

namespace dsx::grpo {

nlohmann::json to_json(const GrpoStepMetrics& m) {
  nlohmann::json per_reward = nlohmann::json::object();
  for (const auto& [name, v] : m.per_reward) per_reward[name] = {{"mean", v.mean}, {"std", v.std}};
  return {{"phase", "grpo"},
          {"step", m.step},
          {"lr", m.lr},
          {"prompts", m.prompts},
          {"completions", m.completions},
          {"reward_mean", m.reward_mean},
          {"reward_std", m.reward_std},
          {"rewards", per_reward},
          {"accuracy", m.accuracy},
          {"zero_spread_fraction", m.zero_spread_fraction},
          {"groups_trained", m.groups_trained},
          {"generation_rounds", m.generation_rounds},
          {"completion_length_mean", m.length_mean},
          {"completion_length_min", m.length_min},
          {"completion_length_max", m.length_max},
          {"truncated_fraction", m.truncated_fraction},
          {"loss", m.loss},
          {"grad_norm", m.grad_norm},
          {"kl", m.kl},
          {"entropy", m.entropy},
          {"clip_fraction_low", m.clip_low},
          {"clip_fraction_high", m.clip_high},
          {"max_abs_log_ratio", m.max_abs_log_ratio},
          {"generation_tokens_per_s", m.generation_tokens_per_s},
          {"training_tokens_per_s", m.training_tokens_per_s},
          {"rollout_s", m.rollout_s},
          {"reward_s", m.reward_s},
          {"train_s", m.train_s},
          {"elapsed_s", m.elapsed_s}};
}

nlohmann::json to_json(const EvalMetrics& m) {
  return {{"phase", "eval"},
          {"step", m.step},
          {"prompts", m.prompts},
          {"samples", m.samples},
          {"accuracy", m.accuracy},
          {"format_rate", m.format_rate},
          {"reward_mean", m.reward_mean},
          {"completion_length_mean", m.length_mean},
          {"seconds", m.seconds}};
}

nlohmann::json to_json(const SftMetrics& m) {
  return {{"phase", "sft"},          {"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"tokens_per_s", m.tokens_per_s},
          {"elapsed_s", m.elapsed_s}};
}

std::string console_line(const GrpoStepMetrics& m) {
  std::string line =
      fmt::format("grpo {:>5}/{} | reward {:.3f}±{:.3f}", m.step, m.total_steps, m.reward_mean, m.reward_std);
  if (m.per_reward.size() > 1) {
    line += " (";
    bool first = true;
    for (const auto& [name, v] : m.per_reward) {
      line += fmt::format("{}{} {:.3f}", first ? "" : ", ", name, v.mean);
      first = false;
    }
    line += ")";
  }
  line += fmt::format(" | acc {:.1f}% | zero-spread {:.0f}%", 100 * m.accuracy, 100 * m.zero_spread_fraction);
  if (m.kl != 0) line += fmt::format(" | kl {:.2e}", m.kl);
  line +=
      fmt::format(" | clip {:.1f}%/{:.1f}% | ent {:.3f} | len {:.1f} [{}, {}] trunc {:.0f}%", 100 * m.clip_low,
                  100 * m.clip_high, m.entropy, m.length_mean, m.length_min, m.length_max, 100 * m.truncated_fraction);
  line += fmt::format(" | gen {:.0f} tok/s, train {:.0f} tok/s | rollout {:.2f}s reward {:.2f}s train {:.2f}s",
                      m.generation_tokens_per_s, m.training_tokens_per_s, m.rollout_s, m.reward_s, m.train_s);
  line += fmt::format(" | {} elapsed, ETA {}", format_duration(m.elapsed_s), format_duration(m.eta_s));
  return line;
}

std::string console_line(const EvalMetrics& m) {
  return fmt::format(
      "eval after step {}: accuracy {:.1f}% ({} held-out prompts × {} samples) | format {:.1f}% | "
      "reward {:.3f} | len {:.1f} | {:.1f}s",
      m.step, 100 * m.accuracy, m.prompts, m.samples, 100 * m.format_rate, m.reward_mean, m.length_mean, m.seconds);
}

std::string console_line(const SftMetrics& m) {
  return fmt::format("sft  {:>5}/{} | loss {:.4f} | lr {:.3e} | {:.0f} tok/s | {} elapsed, ETA {}", m.step,
                     m.total_steps, m.loss, m.lr, m.tokens_per_s, format_duration(m.elapsed_s),
                     format_duration(m.eta_s));
}

}  // namespace dsx::grpo
