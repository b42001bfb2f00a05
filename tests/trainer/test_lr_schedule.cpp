#include <catch2/catch.hpp>

#include <cmath>

#include "recipe_test_support.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/recipe/recipe.h"

using namespace dsx;

namespace {

// The schedules are a handful of double operations; 1e-12 relative leaves three orders of
// magnitude above their rounding error while catching any formula slip.
constexpr double kRel = 1e-12;
constexpr double kCosQuarter = 0.7071067811865476;  // cos(π/4)

Recipe recipe_with(ScheduleKind kind, double lr, int64_t steps, double warmup) {
  Recipe r;
  r.optim.lr = lr;
  r.train.steps = steps;
  r.optim.schedule.kind = kind;
  r.optim.schedule.warmup = warmup;
  validate(r);
  return r;
}

}  // namespace

TEST_CASE("constant schedule with a linear warm-up", "[lr_schedule]") {
  const LrSchedule s(recipe_with(ScheduleKind::constant, 1e-3, 1000, 10));
  CHECK(s.lr(0, 0) == 0.0);
  CHECK(s.lr(5, 0) == Approx(5e-4).epsilon(kRel));
  CHECK(s.lr(10, 0) == 1e-3);
  CHECK(s.lr(999, 0) == 1e-3);
  CHECK(s.lr(5000, 0) == 1e-3);
  const LrSchedule no_warmup(recipe_with(ScheduleKind::constant, 1e-3, 1000, 0));
  CHECK(no_warmup.lr(0, 0) == 1e-3);
}

TEST_CASE("warmup_cosine: linear warm-up, then a half cosine to lr x min_lr_ratio", "[lr_schedule]") {
  // peak 1e-3, warm-up 100 steps, 1100 steps in all, floor 1e-4 (ratio 0.1).
  const LrSchedule s(recipe_with(ScheduleKind::warmup_cosine, 1e-3, 1100, 100));
  CHECK(s.lr(50, 0) == Approx(5e-4).epsilon(kRel));
  CHECK(s.lr(100, 0) == Approx(1e-3).epsilon(kRel));
  CHECK(s.lr(350, 0) == Approx(1e-4 + 9e-4 * 0.5 * (1 + kCosQuarter)).epsilon(kRel));  // p = 1/4
  CHECK(s.lr(600, 0) == Approx(5.5e-4).epsilon(kRel));                                 // p = 1/2
  CHECK(s.lr(850, 0) == Approx(1e-4 + 9e-4 * 0.5 * (1 - kCosQuarter)).epsilon(kRel));  // p = 3/4
  CHECK(s.lr(1100, 0) == Approx(1e-4).epsilon(kRel));
  CHECK(s.lr(2000, 0) == Approx(1e-4).epsilon(kRel));  // past the end: the floor
}

TEST_CASE("warmup_cosine measured in tokens", "[lr_schedule]") {
  Recipe r = recipe_with(ScheduleKind::warmup_cosine, 1e-3, 100, 0);
  r.optim.schedule.unit = ScheduleUnit::tokens;
  r.optim.schedule.warmup = 40960;  // 10 steps of 32 x 128 tokens
  validate(r);
  const LrSchedule s(r);
  // The step argument is ignored: progress is tokens / (100 steps x 4096 tokens).
  CHECK(s.lr(999, 20480) == Approx(5e-4).epsilon(kRel));
  CHECK(s.lr(0, 40960 + (409600 - 40960) / 2) == Approx(5.5e-4).epsilon(kRel));
  CHECK(s.lr(0, 409600) == Approx(1e-4).epsilon(kRel));
}

TEST_CASE("wsd: warm-up, stable, then the last decay_fraction decays", "[lr_schedule]") {
  Recipe r = recipe_with(ScheduleKind::wsd, 1e-3, 1000, 100);
  r.optim.schedule.decay_fraction = 0.2;  // decay over steps 800..1000
  SECTION("linear decay") {
    const LrSchedule s(r);
    CHECK(s.lr(50, 0) == Approx(5e-4).epsilon(kRel));
    CHECK(s.lr(100, 0) == 1e-3);
    CHECK(s.lr(799, 0) == 1e-3);
    CHECK(s.lr(800, 0) == Approx(1e-3).epsilon(kRel));
    CHECK(s.lr(850, 0) == Approx(1e-3 - 9e-4 * 0.25).epsilon(kRel));
    CHECK(s.lr(900, 0) == Approx(5.5e-4).epsilon(kRel));
    CHECK(s.lr(1000, 0) == Approx(1e-4).epsilon(kRel));
  }
  SECTION("cosine decay") {
    r.optim.schedule.decay_shape = DecayShape::cosine;
    const LrSchedule s(r);
    CHECK(s.lr(850, 0) == Approx(1e-4 + 9e-4 * 0.5 * (1 + kCosQuarter)).epsilon(kRel));
    CHECK(s.lr(900, 0) == Approx(5.5e-4).epsilon(kRel));
    CHECK(s.lr(1000, 0) == Approx(1e-4).epsilon(kRel));
  }
}

TEST_CASE("piecewise: DeepSeek-V3's schedule at its segment boundaries", "[lr_schedule]") {
  // Warm-up to 2.2e-4 over 2K steps; constant to 10T tokens; cosine to 2.2e-5 over 4.3T;
  // 2.2e-5 for 333B; 7.3e-6 for the last 167B (DEEPSEEK_FACTS.md).
  const Recipe r = load_recipe(dsx::test::recipe_path("deepseek-v3-671b.yaml"));
  const LrSchedule s(r);
  const BatchSchedule batches(r);
  const auto at_step = [&](int64_t step) { return s.lr(step, batches.tokens_before_step(step)); };
  const auto at_tokens = [&](double tokens) {
    const auto t = static_cast<int64_t>(tokens);
    return s.lr(batches.steps_to_reach(t), t);
  };
  CHECK(at_step(0) == 0.0);
  CHECK(at_step(1000) == Approx(1.1e-4).epsilon(kRel));
  CHECK(at_step(1999) == Approx(2.2e-4 * 1999 / 2000).epsilon(kRel));
  CHECK(at_step(2000) == Approx(2.2e-4).epsilon(kRel));
  CHECK(at_tokens(5e12) == 2.2e-4);
  CHECK(at_tokens(10e12 - 1) == 2.2e-4);
  CHECK(at_tokens(10e12) == Approx(2.2e-4).epsilon(kRel));  // cosine at p = 0
  const double span = 2.2e-4 - 2.2e-5;
  CHECK(at_tokens(10e12 + 4.3e12 / 4) == Approx(2.2e-5 + span * 0.5 * (1 + kCosQuarter)).epsilon(kRel));
  CHECK(at_tokens(12.15e12) == Approx(1.21e-4).epsilon(kRel));
  CHECK(at_tokens(10e12 + 4.3e12 * 3 / 4) == Approx(2.2e-5 + span * 0.5 * (1 - kCosQuarter)).epsilon(kRel));
  CHECK(at_tokens(14.3e12 - 1) == Approx(2.2e-5).epsilon(1e-9));  // one token before the end of the cosine
  CHECK(at_tokens(14.3e12) == 2.2e-5);
  CHECK(at_tokens(14.633e12 - 1) == 2.2e-5);
  CHECK(at_tokens(14.633e12) == 7.3e-6);
  CHECK(at_tokens(14.8e12 - 1) == 7.3e-6);
  CHECK(at_tokens(15e12) == 7.3e-6);  // after the last segment the LR keeps its value
}

TEST_CASE("piecewise: linear segments from a non-zero LR and step drops", "[lr_schedule]") {
  Recipe r;
  r.optim.lr = 1e-3;
  r.optim.schedule.kind = ScheduleKind::piecewise;
  r.optim.schedule.segments = {{100, ScheduleUnit::steps, SegmentKind::linear, 1e-3},
                               {300, ScheduleUnit::steps, SegmentKind::linear, 2e-4},
                               {400, ScheduleUnit::steps, SegmentKind::constant, 5e-5}};
  validate(r);
  const LrSchedule s(r);
  CHECK(s.lr(50, 0) == Approx(5e-4).epsilon(kRel));
  CHECK(s.lr(100, 0) == Approx(1e-3).epsilon(kRel));
  CHECK(s.lr(200, 0) == Approx(6e-4).epsilon(kRel));
  CHECK(s.lr(299, 0) == Approx(1e-3 - 8e-4 * 199 / 200).epsilon(kRel));
  CHECK(s.lr(300, 0) == 5e-5);
  CHECK(s.lr(1000, 0) == 5e-5);
}

TEST_CASE("batch ramp: DeepSeek-V3's 3072 -> 15360 sequences over 469B tokens", "[lr_schedule]") {
  const BatchSchedule b(15360, 3072, 469e9, 128, 4096);
  CHECK(b.ramps());
  CHECK(b.global_batch(0) == 3072);
  CHECK(b.global_batch(100'000'000'000) == 5632);  // raw 3072 + 12288·100/469 = 5692.04 -> 44 x 128
  CHECK(b.global_batch(234'500'000'000) == 9216);  // halfway
  CHECK(b.global_batch(468'990'000'000) == 15360);
  CHECK(b.global_batch(469'000'000'000) == 15360);
  CHECK(b.global_batch(10'000'000'000'000) == 15360);

  // Every batch is the multiple of micro_batch·dp nearest the linear ramp, and never shrinks.
  int64_t previous = 0;
  for (int64_t tokens = 0; tokens <= 470'000'000'000; tokens += 1'000'000'007) {
    const int64_t batch = b.global_batch(tokens);
    const double raw = 3072 + 12288 * std::min(1.0, static_cast<double>(tokens) / 469e9);
    CHECK(batch % 128 == 0);
    CHECK(std::fabs(static_cast<double>(batch) - raw) <= 64.0);
    CHECK(batch >= previous);
    previous = batch;
  }

  // The run-at-a-time walk agrees with stepping one step at a time through the whole ramp.
  int64_t tokens = 0;
  int64_t step = 0;
  for (; tokens < 470'000'000'000; ++step) {
    REQUIRE(b.tokens_before_step(step) == tokens);
    tokens += b.tokens_in_step(tokens);
  }
  CHECK(b.steps_to_reach(469'000'000'000) <= step);
  const int64_t ramp_steps = b.steps_to_reach(469'000'000'000);
  CHECK(b.tokens_before_step(ramp_steps) >= 469'000'000'000);
  CHECK(b.tokens_before_step(ramp_steps - 1) < 469'000'000'000);
}

TEST_CASE("batch ramp: small case against a step-by-step count", "[lr_schedule]") {
  const BatchSchedule b(64, 8, 10000, 8, 16);
  std::vector<int64_t> tokens_before = {0};
  for (int step = 0; step < 300; ++step)
    tokens_before.push_back(tokens_before.back() + b.tokens_in_step(tokens_before.back()));
  for (int step = 0; step <= 300; ++step) CHECK(b.tokens_before_step(step) == tokens_before[step]);
  for (int64_t target : {1, 128, 129, 5000, 9999, 10000, 10001, 60000}) {
    const int64_t steps = b.steps_to_reach(target);
    INFO("target " << target);
    CHECK(tokens_before[steps] >= target);
    CHECK((steps == 0 || tokens_before[steps - 1] < target));
  }
  // Without a ramp every step has the final batch.
  const BatchSchedule flat(64, 0, 0, 8, 16);
  CHECK_FALSE(flat.ramps());
  CHECK(flat.tokens_before_step(10) == 10 * 64 * 16);
  CHECK(flat.steps_to_reach(64 * 16 * 10 + 1) == 11);
}

TEST_CASE("batch ramp comes from the recipe and sets the run length in tokens", "[lr_schedule]") {
  Recipe r;
  r.train.steps = 0;
  r.train.tokens = 1e6;
  r.train.global_batch = 64;
  r.train.micro_batch = 8;
  r.train.seq_len = 16;
  r.train.batch_ramp = {8, 10000};
  validate(r);
  const BatchSchedule from_recipe(r);
  const BatchSchedule direct(64, 8, 10000, 8, 16);
  CHECK(total_steps(r) == direct.steps_to_reach(1'000'000));
  CHECK(from_recipe.tokens_before_step(50) == direct.tokens_before_step(50));
}

TEST_CASE("a resumed run sees the same LR and batch sequence", "[lr_schedule]") {
  // The trainer checkpoints (step, tokens); everything else is recomputed from them.
  Recipe r = load_recipe(dsx::test::recipe_path("deepseek-v3-671b.yaml"));
  const LrSchedule straight(r);
  const BatchSchedule batches(r);
  std::vector<double> lrs;
  int64_t tokens = 0;
  for (int64_t step = 0; step < 3000; ++step) {
    lrs.push_back(straight.lr(step, tokens));
    tokens += batches.tokens_in_step(tokens);
  }
  const int64_t resume_step = 1777;
  const LrSchedule resumed(load_recipe(dsx::test::recipe_path("deepseek-v3-671b.yaml")));
  int64_t resumed_tokens = batches.tokens_before_step(resume_step);
  for (int64_t step = resume_step; step < 3000; ++step) {
    REQUIRE(resumed.lr(step, resumed_tokens) == lrs[step]);
    resumed_tokens += batches.tokens_in_step(resumed_tokens);
  }
  CHECK(resumed_tokens == tokens);
}

TEST_CASE("schedule descriptions name the kind and its numbers", "[lr_schedule]") {
  CHECK(LrSchedule(recipe_with(ScheduleKind::warmup_cosine, 1e-3, 1100, 100)).describe() ==
        "warmup_cosine: warm-up over 100 steps, peak 0.001, cosine to 0.0001 at 1100 steps");
  const std::string v3 = LrSchedule(load_recipe(dsx::test::recipe_path("deepseek-v3-671b.yaml"))).describe();
  CHECK(v3.find("cosine 2.2e-05 until 14.3T tokens") != std::string::npos);
}
