// The demonstration task of the GRPO stage, built into the repository so that nothing is
// downloaded: multi-digit addition in DeepSeek-R1's output format.
//
//   prompt      "What is 57+68?"
//   completion  "<think>7+8=15,5+6+1=12</think><answer>125</answer>" then EOS
//
// The reasoning is the school method: column sums from the ones digit up, a carry written "+1";
// the answer is the last column's sum followed by the earlier columns' ones digits.
//
// The SFT sequences mix two styles: a share `direct_fraction` answers at once after an empty
// "<think></think>", the rest shows the column sums. A briefly fine-tuned model then picks either
// style by chance, and direct answers are mostly wrong: GRPO's reward teaches it to think (held-out
// accuracy and completion length rise), DeepSeek-R1's observation in miniature.
//
// Operands are uniform in [0, 10^digits). A fixed tenth of all operand pairs (chosen by a hash
// of the pair and the seed) is held out: training prompts and SFT sequences never use them,
// held-out prompts only use them, so held-out accuracy measures generalisation.
//
// The tokenizer is a character-level byte-level-BPE tokenizer (no merges) built in-process:
// BOS/EOS/PAD, the four <think>/<answer> tags as single tokens, and the characters the prompts
// and completions use. It is an ordinary data::Tokenizer (its JSON can be saved and loaded).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "data/prompts.h"
#include "data/tokenizer.h"

namespace dsx::grpo {

struct AdditionTaskConfig {
  int64_t digits = 2;            // operands in [0, 10^digits); 1 ≤ digits ≤ kMaxDigits
  double direct_fraction = 0.0;  // share of SFT sequences that answer without reasoning, in [0, 1]
  uint64_t seed = 0;
};

// A training sequence for supervised fine-tuning: BOS + prompt + reference completion + EOS.
struct SftSequence {
  std::vector<int32_t> tokens;
  int64_t prompt_tokens = 0;  // the first prompt_tokens tokens are the prompt (no loss on them)
};

class AdditionTask {
 public:
  static constexpr int64_t kMaxDigits = 6;
  static constexpr int64_t kHeldoutEvery = 10;  // 1 pair in kHeldoutEvery is held out

  // UserError (naming grpo.addition.digits) for digits outside [1, kMaxDigits].
  explicit AdditionTask(AdditionTaskConfig config);

  const data::Tokenizer& tokenizer() const { return tokenizer_; }
  // The tokenizer's JSON (what tokenizer() was built from), for saving next to a run.
  static std::string tokenizer_json();

  static std::string prompt_text(int64_t a, int64_t b);  // "What is a+b?"
  // "<think>7+8=15,5+6+1=12</think><answer>125</answer>" for 57+68 (no EOS); without reasoning
  // "<think></think><answer>125</answer>".
  static std::string reference_completion(int64_t a, int64_t b, bool reasoning = true);

  bool is_heldout(int64_t a, int64_t b) const;
  // Training prompt number `index`: deterministic in (seed, index), never a held-out pair.
  data::Prompt train_prompt(int64_t index) const;
  // The first n held-out prompts of a fixed sequence without repeats. UserError when n exceeds
  // heldout_capacity().
  std::vector<data::Prompt> heldout_prompts(int64_t n) const;
  // How many distinct held-out prompts heldout_prompts may return (half the held-out pairs,
  // so that drawing them without repeats stays fast).
  int64_t heldout_capacity() const;
  // SFT sequence number `index`: train_prompt(index) with its reference completion, without
  // reasoning for a direct_fraction share of the indices (chosen by a hash of seed and index).
  SftSequence sft_sequence(int64_t index) const;
  bool sft_is_direct(int64_t index) const;

 private:
  struct Pair {
    int64_t a = 0, b = 0;
  };
  Pair draw(uint64_t stream, uint64_t counter) const;
  data::Prompt make_prompt(int64_t index, Pair p) const;

  AdditionTaskConfig config_;
  int64_t modulus_ = 0;  // 10^digits
  data::Tokenizer tokenizer_;
};

// BOS (when the tokenizer has one) followed by the encoded text: how the GRPO stage presents
// every prompt to the model.
std::vector<int32_t> encode_prompt(const data::Tokenizer& tokenizer, const std::string& text);

}  // namespace dsx::grpo
