// Rewards for the GRPO stage. DeepSeek-R1 trains on rule-based rewards only: an accuracy
// check of the final answer and a format check of the <think>/<answer> layout. DAPO adds a
// soft penalty for completions that approach the length limit. Anything else is an external
// reward program: a command that reads one JSON object per sample on stdin and writes one
// number per line on stdout.
//
// A Reward scores a whole batch at once, so an external program is started once per batch.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsx::grpo {

struct RewardSample {
  std::string prompt;
  std::string completion;
  std::string answer;
  std::string extra_json = "{}";  // the prompt line's other fields, a JSON object
  int64_t completion_tokens = 0;  // length of the completion in tokens (for length shaping)
};

class Reward {
 public:
  virtual ~Reward() = default;
  virtual std::string name() const = 0;
  // One score per sample, in order.
  virtual std::vector<double> score(std::span<const RewardSample> batch) const = 0;
};

// --- Building blocks of the built-in verifiers (exposed for tests and other callers) -------

// The text between the single <answer> and </answer> of a completion; nullopt when either tag
// is missing, repeated, or they come in the wrong order (several answers would let a policy
// hedge, so they count as none).
std::optional<std::string> extract_answer(std::string_view completion);

// A number written as a plain decimal (optional sign, digits, optional fraction and exponent),
// optionally wrapped in \boxed{...} and/or $...$; nullopt for anything else (inf/nan included).
std::optional<double> parse_numeric_answer(std::string_view text);

// Numeric-aware equality: two numbers compare by value (integers digit by digit, so large
// integers are exact; others within 1e-9 relative), anything else as strings after trimming
// ASCII whitespace (and an outer \boxed{}).
bool answers_match(std::string_view given, std::string_view expected);

// True when the completion is <think>…</think> then <answer>…</answer>, separated and
// surrounded only by whitespace, with no tag nested or repeated inside either block.
bool follows_think_answer_format(std::string_view completion);

// DAPO's overlong shaping: 0 up to max_len − cache, then linear down to −1 at max_len, −1
// beyond. Lengths are in tokens.
double overlong_penalty(int64_t completion_tokens, int64_t max_len, int64_t cache);

// --- Built-in rewards ----------------------------------------------------------------------

// 1 when the extracted answer matches the sample's answer, else 0.
class AnswerMatchReward final : public Reward {
 public:
  std::string name() const override { return "answer_match"; }
  std::vector<double> score(std::span<const RewardSample> batch) const override;
};

// 1 when follows_think_answer_format, else 0.
class FormatReward final : public Reward {
 public:
  std::string name() const override { return "format"; }
  std::vector<double> score(std::span<const RewardSample> batch) const override;
};

class OverlongPenaltyReward final : public Reward {
 public:
  // UserError unless 0 ≤ cache ≤ max_len and max_len > 0.
  OverlongPenaltyReward(int64_t max_len, int64_t cache);
  std::string name() const override { return "overlong_penalty"; }
  std::vector<double> score(std::span<const RewardSample> batch) const override;

 private:
  int64_t max_len_;
  int64_t cache_;
};

// Runs argv (no shell; argv[0] is looked up in PATH) once per batch in its own process group.
// stdin gets one compact JSON object per sample: the extra fields, then prompt, completion and
// answer (which win over extra fields of the same name). stdout must hold exactly one finite
// number per sample, one per line. A program that cannot start, runs past the timeout (its
// whole process group is killed and it is reaped), exits non-zero or by a signal, or prints
// the wrong number of lines or a non-number throws UserError naming the program.
class ExternalReward final : public Reward {
 public:
  ExternalReward(std::string name, std::vector<std::string> argv, double timeout_seconds);
  std::string name() const override { return name_; }
  std::vector<double> score(std::span<const RewardSample> batch) const override;

 private:
  std::string describe() const;  // "reward program '<name>' (<argv>)"
  std::string name_;
  std::vector<std::string> argv_;
  double timeout_seconds_;
};

// --- Weighted combination ------------------------------------------------------------------

struct RewardScores {
  std::vector<double> total;                    // Σ_k weight_k · per_reward[k][i]
  std::vector<std::string> names;               // per reward, in the order added
  std::vector<double> weights;                  // per reward
  std::vector<std::vector<double>> per_reward;  // unweighted scores, [reward][sample]
};

struct MeanStd {
  double mean = 0;
  double std = 0;  // population standard deviation (a metric, not an estimator)
};
MeanStd mean_std(std::span<const double> values);

class CombinedReward {
 public:
  void add(std::unique_ptr<Reward> reward, double weight);
  size_t size() const { return rewards_.size(); }
  // UserError when a reward returns a wrong number of scores.
  RewardScores score(std::span<const RewardSample> batch) const;

 private:
  std::vector<std::unique_ptr<Reward>> rewards_;
  std::vector<double> weights_;
};

}  // namespace dsx::grpo
