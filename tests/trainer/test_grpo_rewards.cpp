#include <signal.h>
#include <catch2/catch.hpp>

#include <cerrno>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "trainer/grpo/rewards.h"

using namespace dsx;
using namespace dsx::grpo;

namespace {

std::string fixture(const std::string& name) {
  return std::string(DSX_SOURCE_DIR) + "/tests/trainer/grpo_fixtures/" + name;
}

RewardSample sample(std::string completion, std::string answer, std::string extra = "{}", int64_t tokens = 0) {
  RewardSample s;
  s.prompt = "What is 40 + 2?";
  s.completion = std::move(completion);
  s.answer = std::move(answer);
  s.extra_json = std::move(extra);
  s.completion_tokens = tokens;
  return s;
}

double score_one(const Reward& r, const RewardSample& s) {
  return r.score(std::span<const RewardSample>(&s, 1)).at(0);
}

// Message of the UserError thrown by f, or "" when none is thrown.
template <class F>
std::string user_error_of(F&& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  return "";
}

// A process is gone when it does not exist or is a zombie someone else (init) will reap.
bool process_running(pid_t pid) {
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  if (!stat) return false;
  std::string pid_field, comm, state;
  stat >> pid_field >> comm >> state;
  return state != "Z";
}

}  // namespace

TEST_CASE("answer match on a table of completions", "[grpo_rewards]") {
  struct Case {
    const char* completion;
    const char* answer;
    double expected;
  };
  const std::vector<Case> cases = {
      {"<think>40+2</think><answer>42</answer>", "42", 1},
      {"<answer>42.0</answer>", "42", 1},
      {"<answer>+42</answer>", "42", 1},
      {"<answer>4.2e1</answer>", "42", 1},
      {"<answer>\\boxed{42}</answer>", "42", 1},
      {"<answer>$\\boxed{42}$</answer>", "42", 1},
      {"<answer>  42 \n</answer>", "42", 1},
      {"<answer>042</answer>", "42", 1},
      {"<answer>42</answer>", "42.000", 1},
      {"<answer>-0</answer>", "0", 1},
      {"<answer>0.5</answer>", ".5", 1},
      {"<answer>43</answer>", "42", 0},
      {"<answer>-42</answer>", "42", 0},
      {"<answer>42.0001</answer>", "42", 0},
      // Integers are compared digit by digit: these two round to the same double.
      {"<answer>12345678901234567891</answer>", "12345678901234567890", 0},
      {"<answer>inf</answer>", "inf", 1},  // not numbers: equal as strings
      {"<answer>nan</answer>", "42", 0},
      {"<answer>42 apples</answer>", "42", 0},
      {"<answer>0x2A</answer>", "42", 0},
      {"<answer>Paris</answer>", "Paris", 1},
      {"<answer>  Paris\t</answer>", " Paris ", 1},
      {"<answer>paris</answer>", "Paris", 0},
      {"<answer>東京</answer>", "東京", 1},
      {"<think>ünïcödé ≠ ascii</think> <answer> π≈3 </answer>", "π≈3", 1},
      {"42", "42", 0},                                      // no tags
      {"<answer>42", "42", 0},                              // unclosed
      {"42</answer>", "42", 0},                             // no opening tag
      {"</answer>42<answer>", "42", 0},                     // wrong order
      {"<answer>41</answer><answer>42</answer>", "42", 0},  // two answers: hedging
      {"<answer><answer>42</answer></answer>", "42", 0},    // nested
      {"<answer></answer>", "42", 0},                       // empty
      {"<Answer>42</Answer>", "42", 0},                     // tags are case-sensitive
  };
  const AnswerMatchReward reward;
  for (const Case& c : cases) {
    INFO("completion: " << c.completion << "  answer: " << c.answer);
    CHECK(score_one(reward, sample(c.completion, c.answer)) == c.expected);
  }
  CHECK(parse_numeric_answer("\\boxed{4.2e1}").value() == 42.0);
  CHECK(!parse_numeric_answer("1e").has_value());
  CHECK(!parse_numeric_answer("1e999").has_value());  // overflows to inf: not finite
}

TEST_CASE("format reward on a table of completions", "[grpo_rewards]") {
  struct Case {
    const char* completion;
    double expected;
  };
  const std::vector<Case> cases = {
      {"<think>reasoning</think><answer>42</answer>", 1},
      {"<think>a\nb</think>\n\n<answer>42</answer>\n", 1},
      {"  <think></think> <answer></answer>  ", 1},
      {"<think>日本語で考える</think><answer>答え</answer>", 1},
      {"<answer>42</answer>", 0},                                      // missing think
      {"<think>x</think>", 0},                                         // missing answer
      {"<think>x</think>so<answer>42</answer>", 0},                    // text between
      {"<think>x</think><answer>42</answer> trailing", 0},             // text after
      {"preamble <think>x</think><answer>42</answer>", 0},             // text before
      {"<answer>42</answer><think>x</think>", 0},                      // wrong order
      {"<think><think>x</think></think><answer>42</answer>", 0},       // nested think
      {"<think>x</think><answer><answer>42</answer></answer>", 0},     // nested answer
      {"<think>x</think><think>y</think><answer>42</answer>", 0},      // duplicated think
      {"<think>x</think><answer>41</answer><answer>42</answer>", 0},   // duplicated answer
      {"<think>x <answer>41</answer></think><answer>42</answer>", 0},  // answer inside think
      {"<think>x</think><answer>42</answer></think>", 0},              // stray closing tag
      {"<think>x<answer>42</answer>", 0},                              // think never closed
      {"<think>x</think><answer>42", 0},                               // answer never closed
      {"", 0},
  };
  const FormatReward reward;
  for (const Case& c : cases) {
    INFO("completion: " << c.completion);
    CHECK(score_one(reward, sample(c.completion, "42")) == c.expected);
  }
}

TEST_CASE("DAPO overlong penalty", "[grpo_rewards]") {
  // max_len 100, cache 20: free up to 80 tokens, then −1/20 per token, −1 from 100 on.
  const OverlongPenaltyReward reward(100, 20);
  const std::vector<std::pair<int64_t, double>> cases = {{0, 0.0},    {50, 0.0},   {80, 0.0},   {81, -0.05},
                                                         {90, -0.5},  {95, -0.75}, {99, -0.95}, {100, -1.0},
                                                         {101, -1.0}, {500, -1.0}};
  for (const auto& [tokens, expected] : cases) {
    INFO("tokens " << tokens);
    // The penalty is one subtraction and one division of small integers: exact to rounding.
    CHECK(score_one(reward, sample("x", "42", "{}", tokens)) == Approx(expected).margin(1e-15));
  }
  CHECK(overlong_penalty(10, 10, 0) == 0.0);
  CHECK(overlong_penalty(11, 10, 0) == -1.0);
  CHECK_THROWS_AS(OverlongPenaltyReward(100, 101), UserError);
  CHECK_THROWS_AS(OverlongPenaltyReward(0, 0), UserError);
}

TEST_CASE("weighted combination keeps each reward's values", "[grpo_rewards]") {
  CombinedReward combined;
  combined.add(std::make_unique<AnswerMatchReward>(), 1.0);
  combined.add(std::make_unique<FormatReward>(), 0.5);
  combined.add(std::make_unique<OverlongPenaltyReward>(10, 4), 2.0);
  const std::vector<RewardSample> batch = {
      sample("<think>t</think><answer>42</answer>", "42", "{}", 3),  // 1, 1, 0
      sample("<answer>42</answer>", "42", "{}", 8),                  // 1, 0, −0.5
      sample("<think>t</think><answer>7</answer>", "42", "{}", 12),  // 0, 1, −1
  };
  const RewardScores s = combined.score(batch);
  REQUIRE(s.names == std::vector<std::string>{"answer_match", "format", "overlong_penalty"});
  CHECK(s.weights == std::vector<double>{1.0, 0.5, 2.0});
  CHECK(s.per_reward[0] == std::vector<double>{1, 1, 0});
  CHECK(s.per_reward[1] == std::vector<double>{1, 0, 1});
  CHECK(s.per_reward[2] == std::vector<double>{0, -0.5, -1});
  // Sums of a few products of exactly representable values: exact.
  CHECK(s.total == std::vector<double>{1.5, 0.0, -1.5});
  const MeanStd m = mean_std(s.per_reward[0]);
  CHECK(m.mean == Approx(2.0 / 3).epsilon(1e-15));
  CHECK(m.std == Approx(std::sqrt(2.0 / 9)).epsilon(1e-15));
}

TEST_CASE("external reward program that answers correctly", "[grpo_rewards]") {
  const ExternalReward reward("echo_score", {"/bin/sh", fixture("echo_score.sh")}, 10.0);
  // Newlines, quotes and unicode in the text must stay inside one JSON line per sample.
  const std::vector<RewardSample> batch = {
      sample("line one\nline two \"quoted\" \"score\": 9", "42", R"({"score": 0.25})"),
      sample("<answer>東京</answer>", "東京", R"({"score": -1.5, "difficulty": 3})"),
      sample("", "", R"({"score": 3})"),
  };
  CHECK(reward.score(batch) == std::vector<double>{0.25, -1.5, 3});
  CHECK(reward.score({}).empty());
}

TEST_CASE("external reward program failures are errors naming the program", "[grpo_rewards]") {
  const std::vector<RewardSample> batch = {sample("a", "1"), sample("b", "2"), sample("c", "3")};
  auto error_from = [&](const std::string& script) {
    const ExternalReward reward("judge", {"/bin/sh", fixture(script)}, 10.0);
    return user_error_of([&] { reward.score(batch); });
  };
  SECTION("exit status 1, with its stderr") {
    const std::string e = error_from("crash.sh");
    CHECK_THAT(e, Catch::Contains("reward program 'judge'") && Catch::Contains("crash.sh") &&
                      Catch::Contains("exited with status 1") && Catch::Contains("reward model exploded"));
  }
  SECTION("killed by a signal") {
    CHECK_THAT(error_from("killed.sh"), Catch::Contains("'judge'") && Catch::Contains("killed by signal 9"));
  }
  SECTION("garbage output") {
    CHECK_THAT(error_from("garbage.sh"),
               Catch::Contains("'judge'") && Catch::Contains("line 1 is not a finite number: 'reward: high'"));
  }
  SECTION("too few lines") {
    CHECK_THAT(error_from("too_few.sh"),
               Catch::Contains("'judge'") && Catch::Contains("printed 1 lines for 3 samples"));
  }
  SECTION("a program that does not exist") {
    const ExternalReward reward("missing", {"dsx-no-such-reward-program"}, 10.0);
    CHECK_THAT(user_error_of([&] { reward.score(batch); }),
               Catch::Contains("'missing'") && Catch::Contains("cannot start"));
  }
  SECTION("bad construction") {
    CHECK_THROWS_AS(ExternalReward("x", {}, 1.0), UserError);
    CHECK_THROWS_AS(ExternalReward("x", {"/bin/true"}, 0.0), UserError);
  }
}

TEST_CASE("external reward program that hangs is killed with its helpers and reaped", "[grpo_rewards]") {
  const std::filesystem::path pid_file =
      std::filesystem::temp_directory_path() / ("dsx_grpo_hang_" + std::to_string(::getpid()) + ".pids");
  std::filesystem::remove(pid_file);
  const ExternalReward reward("sleepy", {"/bin/sh", fixture("hang.sh"), pid_file.string()}, 1.0);
  const std::vector<RewardSample> batch = {sample("a", "1")};
  const auto start = std::chrono::steady_clock::now();
  const std::string e = user_error_of([&] { reward.score(batch); });
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  CHECK_THAT(e, Catch::Contains("reward program 'sleepy'") && Catch::Contains("timed out after 1 s"));
  // 1 s timeout plus the kill and reap; 2.5 s leaves room for a loaded 2-core machine.
  CHECK(seconds >= 1.0);
  CHECK(seconds < 2.5);
  std::ifstream pids(pid_file);
  pid_t shell = 0, helper = 0;
  REQUIRE(pids >> shell >> helper);
  // The shell was our child: after reaping it no longer exists at all (a zombie would).
  CHECK(::kill(shell, 0) == -1);
  CHECK(errno == ESRCH);
  // The helper (`sleep 30`) was in the same process group: killed, not left running.
  CHECK_FALSE(process_running(helper));
  std::filesystem::remove(pid_file);
}
