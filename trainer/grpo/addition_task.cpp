#include "trainer/grpo/addition_task.h"

#include <fmt/core.h>

#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>
#include <utility>

#include "kernels/error.h"
#include "kernels/random.h"

namespace dsx::grpo {
namespace {

// Philox streams of the task's random choices (independent of each other by construction).
constexpr uint64_t kHeldoutHashStream = random::stream_of("dsx.grpo.addition.heldout");
constexpr uint64_t kHeldoutDrawStream = random::stream_of("dsx.grpo.addition.heldout_draw");
constexpr uint64_t kTrainDrawStream = random::stream_of("dsx.grpo.addition.train_draw");  // + attempt
constexpr uint64_t kStyleStream = random::stream_of("dsx.grpo.addition.sft_style");

constexpr const char* kSpecialTokens[] = {"<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>"};
constexpr const char* kTagTokens[] = {"<think>", "</think>", "<answer>", "</answer>"};
// Every character of the prompts and completions besides the tags. The byte-level alphabet maps
// printable ASCII to itself and the space to U+0120 ("Ġ").
constexpr std::string_view kCharacters = "0123456789+=,?Whatis";
constexpr std::string_view kByteLevelSpace = "\xC4\xA0";

AdditionTaskConfig checked(AdditionTaskConfig config) {
  if (config.digits < 1 || config.digits > AdditionTask::kMaxDigits) {
    throw UserError(
        fmt::format("grpo.addition.digits must be in [1, {}], got {}", AdditionTask::kMaxDigits, config.digits));
  }
  if (!(config.direct_fraction >= 0 && config.direct_fraction <= 1)) {
    throw UserError(fmt::format("grpo.addition.direct_fraction must be in [0, 1], got {}", config.direct_fraction));
  }
  return config;
}

int64_t power_of_ten(int64_t n) {
  int64_t p = 1;
  for (int64_t i = 0; i < n; ++i) p *= 10;
  return p;
}

uint64_t words_to_u64(uint32_t lo, uint32_t hi) {
  return static_cast<uint64_t>(hi) << 32 | lo;
}

}  // namespace

std::string AdditionTask::tokenizer_json() {
  nlohmann::ordered_json vocab = nlohmann::ordered_json::object();
  nlohmann::ordered_json added = nlohmann::ordered_json::array();
  int64_t next_id = 0;
  const auto add_token = [&](const char* content, bool special) {
    vocab[content] = next_id;
    added.push_back({{"id", next_id},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", special}});
    ++next_id;
  };
  for (const char* t : kSpecialTokens) add_token(t, true);
  for (const char* t : kTagTokens) add_token(t, false);
  for (char c : kCharacters) vocab[std::string(1, c)] = next_id++;
  vocab[std::string(kByteLevelSpace)] = next_id++;

  nlohmann::ordered_json root;
  root["version"] = "1.0";
  root["truncation"] = nullptr;
  root["padding"] = nullptr;
  root["added_tokens"] = added;
  root["normalizer"] = nullptr;
  root["pre_tokenizer"] = {
      {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
  root["post_processor"] = nullptr;
  root["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
  root["model"] = {{"type", "BPE"},
                   {"dropout", nullptr},
                   {"unk_token", nullptr},
                   {"continuing_subword_prefix", nullptr},
                   {"end_of_word_suffix", nullptr},
                   {"fuse_unk", false},
                   {"byte_fallback", false},
                   {"ignore_merges", false},
                   {"vocab", vocab},
                   {"merges", nlohmann::ordered_json::array()}};
  return root.dump(2);
}

AdditionTask::AdditionTask(AdditionTaskConfig config)
    : config_(checked(config)),
      modulus_(power_of_ten(config_.digits)),
      tokenizer_(data::Tokenizer::from_json(tokenizer_json(), "the addition task's tokenizer")) {}

std::string AdditionTask::prompt_text(int64_t a, int64_t b) {
  return fmt::format("What is {}+{}?", a, b);
}

std::string AdditionTask::reference_completion(int64_t a, int64_t b, bool reasoning) {
  if (!reasoning) return fmt::format("<think></think><answer>{}</answer>", a + b);
  // Column sums from the ones up, the carry written as "+1": 57+68 -> "7+8=15,5+6+1=12".
  std::string think;
  int64_t carry = 0;
  for (int64_t x = a, y = b; x > 0 || y > 0 || think.empty(); x /= 10, y /= 10) {
    const int64_t sum = x % 10 + y % 10 + carry;
    think += fmt::format("{}{}+{}{}={}", think.empty() ? "" : ",", x % 10, y % 10, carry ? "+1" : "", sum);
    carry = sum / 10;
  }
  return fmt::format("<think>{}</think><answer>{}</answer>", think, a + b);
}

bool AdditionTask::is_heldout(int64_t a, int64_t b) const {
  const auto w = random::philox_words(config_.seed, kHeldoutHashStream, static_cast<uint64_t>(a * modulus_ + b));
  return w.v[0] % kHeldoutEvery == 0;
}

AdditionTask::Pair AdditionTask::draw(uint64_t stream, uint64_t counter) const {
  const auto w = random::philox_words(config_.seed, stream, counter);
  const auto m = static_cast<uint64_t>(modulus_);
  // 64-bit words modulo at most 10^6: the bias is below 1e-13.
  return {static_cast<int64_t>(words_to_u64(w.v[0], w.v[1]) % m),
          static_cast<int64_t>(words_to_u64(w.v[2], w.v[3]) % m)};
}

data::Prompt AdditionTask::make_prompt(int64_t index, Pair p) const {
  data::Prompt prompt;
  prompt.index = index;
  prompt.prompt = prompt_text(p.a, p.b);
  prompt.answer = std::to_string(p.a + p.b);
  prompt.extra_json = nlohmann::json{{"a", p.a}, {"b", p.b}}.dump();
  return prompt;
}

data::Prompt AdditionTask::train_prompt(int64_t index) const {
  // Rejection: 9 in 10 draws are training pairs, so 1000 attempts never all fail in practice.
  for (uint64_t attempt = 0; attempt < 1000; ++attempt) {
    const Pair p = draw(kTrainDrawStream + attempt, static_cast<uint64_t>(index));
    if (!is_heldout(p.a, p.b)) return make_prompt(index, p);
  }
  throw std::logic_error("AdditionTask::train_prompt: no training pair in 1000 draws");
}

int64_t AdditionTask::heldout_capacity() const {
  const int64_t pairs = modulus_ * modulus_;
  if (pairs > 1'000'000) return pairs / kHeldoutEvery / 2;  // the realised count is within 0.1% of this ×2
  int64_t count = 0;
  for (int64_t a = 0; a < modulus_; ++a)
    for (int64_t b = 0; b < modulus_; ++b) count += is_heldout(a, b);
  return count / 2;
}

std::vector<data::Prompt> AdditionTask::heldout_prompts(int64_t n) const {
  if (n > heldout_capacity()) {
    throw UserError(
        fmt::format("grpo.eval.count: {} held-out addition prompts requested, but {} digits give "
                    "only {}; lower grpo.eval.count or raise grpo.addition.digits",
                    n, config_.digits, heldout_capacity()));
  }
  std::vector<data::Prompt> out;
  std::set<std::pair<int64_t, int64_t>> seen;
  for (uint64_t counter = 0; static_cast<int64_t>(out.size()) < n; ++counter) {
    const Pair p = draw(kHeldoutDrawStream, counter);
    if (!is_heldout(p.a, p.b) || !seen.insert({p.a, p.b}).second) continue;
    out.push_back(make_prompt(static_cast<int64_t>(out.size()), p));
  }
  return out;
}

bool AdditionTask::sft_is_direct(int64_t index) const {
  const auto w = random::philox_words(config_.seed, kStyleStream, static_cast<uint64_t>(index));
  return random::uint_to_unit_double(w.v[0], w.v[1]) < config_.direct_fraction;
}

SftSequence AdditionTask::sft_sequence(int64_t index) const {
  const data::Prompt prompt = train_prompt(index);
  const auto extra = nlohmann::json::parse(prompt.extra_json);
  const std::string completion =
      reference_completion(extra["a"].get<int64_t>(), extra["b"].get<int64_t>(), !sft_is_direct(index));
  SftSequence seq;
  seq.tokens = encode_prompt(tokenizer_, prompt.prompt);
  seq.prompt_tokens = static_cast<int64_t>(seq.tokens.size());
  for (data::TokenId id : tokenizer_.encode(completion)) seq.tokens.push_back(static_cast<int32_t>(id));
  seq.tokens.push_back(static_cast<int32_t>(tokenizer_.eos_id()));
  return seq;
}

std::vector<int32_t> encode_prompt(const data::Tokenizer& tokenizer, const std::string& text) {
  std::vector<int32_t> ids;
  if (tokenizer.bos_id() >= 0) ids.push_back(static_cast<int32_t>(tokenizer.bos_id()));
  for (data::TokenId id : tokenizer.encode(text)) ids.push_back(static_cast<int32_t>(id));
  return ids;
}

}  // namespace dsx::grpo
