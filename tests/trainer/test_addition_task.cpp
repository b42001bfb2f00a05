// The built-in addition task of the GRPO stage: its tokenizer, prompts, reference completions
// (which the built-in rewards must accept), the held-out split and the SFT sequences.
#include <catch2/catch.hpp>

#include <set>
#include <string>
#include <utility>

#include <nlohmann/json.hpp>

#include "support/user_error.h"
#include "trainer/grpo/addition_task.h"
#include "trainer/grpo/rewards.h"

using namespace dsx;
using namespace dsx::grpo;

namespace {

std::pair<int64_t, int64_t> operands(const data::Prompt& p) {
  const auto j = nlohmann::json::parse(p.extra_json);
  return {j.at("a").get<int64_t>(), j.at("b").get<int64_t>()};
}

}  // namespace

TEST_CASE("addition task: reference completions follow the school method", "[grpo][addition]") {
  CHECK(AdditionTask::prompt_text(57, 68) == "What is 57+68?");
  CHECK(AdditionTask::reference_completion(57, 68) == "<think>7+8=15,5+6+1=12</think><answer>125</answer>");
  CHECK(AdditionTask::reference_completion(123, 45) == "<think>3+5=8,2+4=6,1+0=1</think><answer>168</answer>");
  CHECK(AdditionTask::reference_completion(5, 95) == "<think>5+5=10,0+9+1=10</think><answer>100</answer>");
  CHECK(AdditionTask::reference_completion(0, 0) == "<think>0+0=0</think><answer>0</answer>");
}

TEST_CASE("addition task: the built-in rewards accept every reference completion", "[grpo][addition]") {
  const AdditionTask task({.digits = 3, .direct_fraction = 0, .seed = 7});
  for (int64_t i = 0; i < 200; ++i) {
    const data::Prompt p = task.train_prompt(i);
    const auto [a, b] = operands(p);
    CHECK(p.prompt == AdditionTask::prompt_text(a, b));
    CHECK(p.answer == std::to_string(a + b));
    const std::string completion = AdditionTask::reference_completion(a, b);
    CHECK(follows_think_answer_format(completion));
    const auto answer = extract_answer(completion);
    REQUIRE(answer);
    CHECK(answers_match(*answer, p.answer));
  }
}

TEST_CASE("addition task: the tokenizer is character level and round-trips task text", "[grpo][addition]") {
  const AdditionTask task({.digits = 2, .seed = 0});
  const data::Tokenizer& tok = task.tokenizer();
  CHECK(tok.vocab_size() == 28);
  CHECK(tok.bos_id() == 0);
  CHECK(tok.eos_id() == 1);
  CHECK(tok.pad_id() == 2);
  const std::string text = AdditionTask::prompt_text(57, 68) + AdditionTask::reference_completion(57, 68);
  const auto ids = tok.encode(text);
  CHECK(tok.decode(ids) == text);
  // 14 prompt characters, then <think>, 15 characters, </think>, <answer>, 3 digits, </answer>
  CHECK(ids.size() == 14 + 1 + 15 + 1 + 1 + 3 + 1);
  CHECK(tok.token_id("<answer>") == static_cast<int64_t>(ids[14 + 1 + 15 + 1]));
  // The JSON loads as an ordinary tokenizer with the same hash.
  CHECK(data::Tokenizer::from_json(AdditionTask::tokenizer_json(), "copy").hash() == tok.hash());
}

TEST_CASE("addition task: prompts are deterministic and held-out pairs never reach training", "[grpo][addition]") {
  const AdditionTask task({.digits = 2, .seed = 11});
  const AdditionTask same({.digits = 2, .seed = 11});
  const AdditionTask other_seed({.digits = 2, .seed = 12});
  int64_t differing = 0;
  std::set<std::pair<int64_t, int64_t>> seen;
  for (int64_t i = 0; i < 2000; ++i) {
    const data::Prompt p = task.train_prompt(i);
    CHECK(p.prompt == same.train_prompt(i).prompt);
    differing += p.prompt != other_seed.train_prompt(i).prompt;
    const auto [a, b] = operands(p);
    CHECK(a >= 0);
    CHECK(a < 100);
    CHECK(b < 100);
    CHECK_FALSE(task.is_heldout(a, b));
    seen.insert({a, b});
  }
  CHECK(differing > 1900);    // another seed, other prompts (equal by chance ~1% of the time)
  CHECK(seen.size() > 1500);  // 2000 draws from ~9000 training pairs: few repeats

  const auto held_out = task.heldout_prompts(300);
  REQUIRE(held_out.size() == 300);
  std::set<std::pair<int64_t, int64_t>> distinct;
  for (const data::Prompt& p : held_out) {
    const auto pair = operands(p);
    CHECK(task.is_heldout(pair.first, pair.second));
    CHECK(seen.count(pair) == 0);
    distinct.insert(pair);
  }
  CHECK(distinct.size() == 300);
  // The first n held-out prompts do not depend on n.
  CHECK(task.heldout_prompts(10).back().prompt == held_out[9].prompt);
}

TEST_CASE("addition task: about a tenth of the pairs are held out", "[grpo][addition]") {
  const AdditionTask task({.digits = 2, .seed = 3});
  int64_t held = 0;
  for (int64_t a = 0; a < 100; ++a)
    for (int64_t b = 0; b < 100; ++b) held += task.is_heldout(a, b);
  // Binomial(10000, 0.1): mean 1000, std 30; ±150 is five standard deviations.
  CHECK(held > 850);
  CHECK(held < 1150);
  CHECK(task.heldout_capacity() == held / 2);
  CHECK_THAT(test::user_error([&] { task.heldout_prompts(held / 2 + 1); }), Catch::Contains("grpo.eval.count"));
}

TEST_CASE("addition task: SFT sequences are BOS + prompt + reference completion + EOS", "[grpo][addition]") {
  const AdditionTask task({.digits = 2, .seed = 5});
  const data::Tokenizer& tok = task.tokenizer();
  for (int64_t i = 0; i < 20; ++i) {
    const SftSequence seq = task.sft_sequence(i);
    const data::Prompt p = task.train_prompt(i);
    const auto [a, b] = operands(p);
    REQUIRE(seq.tokens.size() > static_cast<size_t>(seq.prompt_tokens) + 1);
    CHECK(seq.tokens.front() == tok.bos_id());
    CHECK(seq.tokens.back() == tok.eos_id());
    const std::vector<data::TokenId> prompt(seq.tokens.begin() + 1, seq.tokens.begin() + seq.prompt_tokens);
    const std::vector<data::TokenId> completion(seq.tokens.begin() + seq.prompt_tokens, seq.tokens.end() - 1);
    CHECK(tok.decode(prompt) == p.prompt);
    CHECK(tok.decode(completion) == AdditionTask::reference_completion(a, b));
    CHECK(encode_prompt(tok, p.prompt).size() == static_cast<size_t>(seq.prompt_tokens));
  }
}

TEST_CASE("addition task: direct_fraction of the SFT sequences answer without reasoning", "[grpo][addition]") {
  const AdditionTask task({.digits = 2, .direct_fraction = 0.25, .seed = 5});
  const data::Tokenizer& tok = task.tokenizer();
  const auto think_close = static_cast<int32_t>(tok.token_id("</think>"));
  int64_t direct = 0;
  constexpr int64_t n = 2000;
  for (int64_t i = 0; i < n; ++i) {
    const SftSequence seq = task.sft_sequence(i);
    const auto [a, b] = operands(task.train_prompt(i));
    // the token after <think> is </think> exactly for the direct style
    const bool empty_think = seq.tokens[static_cast<size_t>(seq.prompt_tokens) + 1] == think_close;
    CHECK(empty_think == task.sft_is_direct(i));
    const std::vector<data::TokenId> completion(seq.tokens.begin() + seq.prompt_tokens, seq.tokens.end() - 1);
    CHECK(tok.decode(completion) == AdditionTask::reference_completion(a, b, !empty_think));
    direct += empty_think;
  }
  // Binomial(2000, 0.25): std 19; ±100 is five standard deviations.
  CHECK(direct > 400);
  CHECK(direct < 600);
  CHECK(AdditionTask::reference_completion(57, 68, false) == "<think></think><answer>125</answer>");
  CHECK(follows_think_answer_format(AdditionTask::reference_completion(57, 68, false)));
}

TEST_CASE("addition task: digits outside [1, 6] are a user error", "[grpo][addition]") {
  CHECK_THAT(test::user_error([] { AdditionTask({.digits = 0, .seed = 0}); }), Catch::Contains("grpo.addition.digits"));
  CHECK_THAT(test::user_error([] { AdditionTask({.digits = 7, .seed = 0}); }), Catch::Contains("grpo.addition.digits"));
  CHECK_THAT(test::user_error([] { AdditionTask({.digits = 2, .direct_fraction = 1.5, .seed = 0}); }),
             Catch::Contains("grpo.addition.direct_fraction"));
}
