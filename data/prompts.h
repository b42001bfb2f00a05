// Prompt sets for the RL (GRPO) stage: JSONL files whose lines hold a `prompt` and an `answer`
// (a string, or a number/boolean kept as its JSON text) plus any other fields, which are kept
// verbatim as a JSON object.
//
// The prompt loader serves the same guarantees as the token loader: global sample g of epoch
// e = g / size is prompt perm_{seed, e}(g mod size); step t covers global samples
// [t * global_batch, (t + 1) * global_batch) and DP rank r takes its contiguous slice; the
// state is the number of global samples consumed, so a restore continues exactly on any
// number of DP ranks.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace dsx::data {

struct Prompt {
  int64_t index = 0;  // 0-based position in the set (line order, blank lines skipped)
  std::string prompt;
  std::string answer;
  std::string extra_json;  // the line's other fields as a compact JSON object ("{}" if none)
};

class PromptSet {
 public:
  // Reads a JSONL file. UserError naming file:line for invalid JSON, a missing or mistyped
  // `prompt`/`answer`, and for a file that cannot be read or holds no prompts.
  static PromptSet load(const std::string& path);
  static PromptSet from_prompts(std::vector<Prompt> prompts, std::string origin);

  size_t size() const { return prompts_.size(); }
  const Prompt& operator[](size_t i) const { return prompts_.at(i); }
  const std::string& origin() const { return origin_; }

 private:
  std::vector<Prompt> prompts_;
  std::string origin_;
};

struct PromptLoaderConfig {
  int64_t global_batch = 0;  // prompts per step over all DP ranks
  int dp_rank = 0;
  int dp_size = 1;
  uint64_t seed = 0;
};

struct PromptLoaderState {
  static constexpr int kVersion = 1;
  uint64_t seed = 0;
  int64_t prompts = 0;           // size of the set the state belongs to
  int64_t consumed_samples = 0;  // global samples handed out in completed steps
  int64_t steps = 0;
  bool operator==(const PromptLoaderState&) const = default;
  std::string to_json() const;
  static PromptLoaderState from_json(std::string_view text, const std::string& origin);
};

struct PromptBatch {
  int64_t step = 0;
  int64_t first_global_sample = 0;  // global index of this rank's first prompt in the step
  int64_t epoch = 0;                // epoch of the first prompt of this rank's slice
  std::vector<Prompt> prompts;      // global_batch / dp_size prompts
};

class PromptLoader {
 public:
  PromptLoader(std::shared_ptr<const PromptSet> set, PromptLoaderConfig config);
  PromptBatch next();
  PromptLoaderState state() const;
  void restore(const PromptLoaderState& state);  // UserError when it belongs to another set/seed
  const PromptSet& set() const { return *set_; }

 private:
  std::shared_ptr<const PromptSet> set_;
  PromptLoaderConfig config_;
  int64_t consumed_samples_ = 0;
  int64_t steps_ = 0;
};

}  // namespace dsx::data
