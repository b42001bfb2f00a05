// The GRPO stage's pieces: token layout of rollouts, the policy update on a toy case (it must
// move log-probabilities in the direction of the advantages), micro-batching that does not
// change the update, the reference model, and whole GRPO steps of GrpoTrainer on a tiny model.
#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/prompts.h"
#include "support/temp_dir.h"
#include "support/user_error.h"
#include "tests/trainer/test_model_fixtures.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/grpo/addition_task.h"
#include "trainer/grpo/grpo_trainer.h"
#include "trainer/grpo/policy_update.h"
#include "trainer/model/model.h"
#include "trainer/recipe/recipe.h"

using namespace dsx;
using namespace dsx::grpo;

namespace {

ModelConfig toy_config() {
  ModelConfig c = test::tiny_config();
  c.num_nextn_predict_layers = 0;
  c.seq_aux_loss_alpha = 0;
  c.max_position_embeddings = 32;
  return c;
}

OptimSection plain_adam(double weight_decay = 0) {
  OptimSection o;
  o.weight_decay = weight_decay;
  o.grad_clip = 0;
  return o;
}

double sum_of(const std::vector<double>& v) {
  return std::accumulate(v.begin(), v.end(), 0.0);
}

// Rollouts of one prompt with their π_old log-probs taken from the model itself.
std::vector<Rollout> rollouts_for(Model& model, std::vector<std::vector<int32_t>> completions,
                                  const std::vector<double>& advantages) {
  std::vector<Rollout> out;
  for (size_t i = 0; i < completions.size(); ++i) out.push_back({{1, 2, 3}, completions[i], {}, {}, advantages[i]});
  const auto logp = completion_logprobs(model, out, 0, 0);
  for (size_t i = 0; i < out.size(); ++i) out[i].old_logp = logp[i];
  return out;
}

}  // namespace

TEST_CASE("pack_rollouts: prompt then completion, targets only on completion tokens", "[grpo]") {
  const std::vector<Rollout> rollouts = {{{5, 6, 7}, {8, 9}, {}, {}, 0.0}, {{5}, {4, 3, 2, 1}, {}, {}, 0.0}};
  const PolicyBatch pb = pack_rollouts(rollouts, 0);
  // row 0: tokens 5 6 7 8 9 -> inputs 5 6 7 8, targets -100 -100 8 9
  // row 1: tokens 5 4 3 2 1 -> inputs 5 4 3 2, targets 4 3 2 1
  CHECK(pb.batch.inputs.shape() == Shape{2, 4});
  CHECK(pb.batch.inputs.to_vector() == std::vector<double>{5, 6, 7, 8, 5, 4, 3, 2});
  CHECK(pb.batch.targets.to_vector() == std::vector<double>{-100, -100, 8, 9, 4, 3, 2, 1});
  CHECK(pb.width == 4);
  CHECK(pb.lengths == std::vector<int64_t>{2, 4});
  CHECK(pb.offsets == std::vector<int64_t>{2, 0});
  const std::vector<double> values{1, 2, 0, 0, 3, 4, 5, 6};
  const Tensor scattered = scatter_completion(values, pb);
  CHECK(scattered.to_vector() == std::vector<double>{0, 0, 1, 2, 3, 4, 5, 6});
  CHECK(gather_completion(scattered, pb) == values);
}

TEST_CASE("policy_update moves log-probs with the sign of the advantage", "[grpo]") {
  Model model(toy_config(), DType::f64, 5);
  AdamW optimizer(model.parameters(), plain_adam());
  const std::vector<std::vector<int32_t>> completions = {{4, 9, 11}, {7, 7, 2}};
  std::vector<Rollout> rollouts = rollouts_for(model, completions, {+1.0, -1.0});
  const double good_before = sum_of(rollouts[0].old_logp), bad_before = sum_of(rollouts[1].old_logp);

  UpdateConfig config;
  for (const LossAggregation mode : {LossAggregation::grpo, LossAggregation::dapo, LossAggregation::dr_grpo}) {
    // A fresh π_old each time, as after new rollouts: a second update on the same rollouts would
    // find every ratio outside the clip range already (lr 1e-2 moves it by more than ε).
    rollouts = rollouts_for(model, completions, {+1.0, -1.0});
    config.loss.aggregation = mode;
    config.loss.max_completion_length = 4;
    const UpdateStats stats = policy_update(model, optimizer, 1e-2, rollouts, config);
    CHECK(stats.tokens == 6);
    CHECK(stats.max_abs_log_ratio < 1e-12);  // the same f64 forward as π_old
    CHECK(stats.grad_norm > 0);
  }
  const auto after = completion_logprobs(model, rollouts, 0, 0);
  CHECK(sum_of(after[0]) > good_before + 0.1);
  CHECK(sum_of(after[1]) < bad_before - 0.1);
}

TEST_CASE("policy_update: zero advantages and no KL give a zero gradient", "[grpo]") {
  Model model(toy_config(), DType::f64, 6);
  AdamW optimizer(model.parameters(), plain_adam());
  const std::vector<Rollout> rollouts = rollouts_for(model, {{4, 9}, {7, 7, 2}}, {0.0, 0.0});
  const UpdateStats stats = policy_update(model, optimizer, 1e-2, rollouts, {});
  CHECK(stats.grad_norm == 0.0);
  const auto after = completion_logprobs(model, rollouts, 0, 0);
  // Adam's update is m / (sqrt(v) + eps) = 0 / eps: the parameters do not move.
  CHECK(after[0] == rollouts[0].old_logp);
}

TEST_CASE("policy_update: micro-batches give the same gradient as one batch", "[grpo]") {
  for (const LossAggregation mode : {LossAggregation::grpo, LossAggregation::dapo, LossAggregation::dr_grpo}) {
    std::vector<std::vector<double>> grads[2];
    double losses[2] = {0, 0};
    for (int micro : {0, 1}) {
      Model model(toy_config(), DType::f64, 9);
      AdamW optimizer(model.parameters(), plain_adam());
      const auto rollouts = rollouts_for(model, {{4, 9, 11, 2}, {7}, {3, 3}}, {0.5, -1.5, 2.0});
      UpdateConfig config;
      config.loss.aggregation = mode;
      config.loss.max_completion_length = 6;
      config.micro_batch = micro;
      losses[micro] = policy_update(model, optimizer, 0.0, rollouts, config).loss;
      CHECK(losses[micro] != 0.0);
      for (Parameter& p : model.parameters())
        if (p.spec.trainable) grads[micro].push_back(p.grad.to_vector());
    }
    INFO("aggregation " << enum_name(mode));
    // The same sums in another grouping: agreement to ~1e-15 relative.
    CHECK(losses[1] == Approx(losses[0]).epsilon(1e-12));
    for (size_t k = 0; k < grads[0].size(); ++k)
      for (size_t i = 0; i < grads[0][k].size(); ++i) CHECK(grads[1][k][i] == Approx(grads[0][k][i]).margin(1e-13));
  }
}

TEST_CASE("policy_update: the KL term pulls the policy back towards the reference", "[grpo]") {
  Model model(toy_config(), DType::f64, 12);
  AdamW optimizer(model.parameters(), plain_adam());
  auto rollouts = rollouts_for(model, {{4, 9, 11}}, {0.0});
  // A reference more confident in the completion than the policy: KL > 0, and with zero
  // advantage the only force is β·KL, which raises log π towards log π_ref.
  rollouts[0].ref_logp = rollouts[0].old_logp;
  for (double& x : rollouts[0].ref_logp) x += 0.5;
  UpdateConfig config;
  config.loss.beta = 0.1;
  const UpdateStats stats = policy_update(model, optimizer, 1e-2, rollouts, config);
  // k3 at d = 0.5 per token: e^0.5 − 0.5 − 1.
  CHECK(stats.mean_kl == Approx(std::exp(0.5) - 1.5).epsilon(1e-9));
  const auto after = completion_logprobs(model, rollouts, 0, 0);
  CHECK(sum_of(after[0]) > sum_of(rollouts[0].old_logp));
}

// ---- GrpoTrainer on small runs of recipes/tiny-grpo.yaml ----------------------------------------

namespace {

std::string tiny_grpo_recipe() {
  return (std::filesystem::path(DSX_SOURCE_DIR) / "recipes" / "tiny-grpo.yaml").string();
}

// A few seconds of everything: a short SFT, small groups, a small held-out set.
std::vector<std::string> short_run(const std::string& run_dir, std::vector<std::string> more = {}) {
  std::vector<std::string> o = {"logging.run_dir=" + run_dir, "grpo.sft_steps=10",  "grpo.prompts_per_step=4",
                                "grpo.group_size=4",          "grpo.eval.count=8",  "grpo.eval.samples=2",
                                "grpo.eval.interval=0",       "logging.interval=1", "train.steps=2"};
  o.insert(o.end(), more.begin(), more.end());
  return o;
}

std::vector<nlohmann::json> jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

std::vector<std::vector<double>> parameter_values(Model& model) {
  std::vector<std::vector<double>> out;
  for (Parameter& p : model.parameters()) out.push_back(p.value.to_vector());
  return out;
}

}  // namespace

TEST_CASE("GrpoTrainer: a short run logs every phase, checkpoints and resumes without repeating SFT", "[grpo]") {
  const test::TempDir dir("dsx-test-grpo-run");
  std::vector<GrpoStepMetrics> steps;
  GrpoOptions options;
  options.console = false;
  options.on_step = [&](const GrpoStepMetrics& m) { steps.push_back(m); };
  {
    GrpoTrainer trainer(load_recipe(tiny_grpo_recipe(), short_run(dir / "run")), options);
    const GrpoResult r = trainer.run();
    CHECK(r.steps == 2);
    CHECK(r.sft_loss > 0);
    REQUIRE(r.evals.size() == 2);
    CHECK(r.evals[0].step == 0);
    CHECK(r.evals[1].step == 2);
    CHECK(r.evals[0].prompts == 8);
    CHECK(r.evals[0].samples == 2);
    REQUIRE(r.last_checkpoint);
    CHECK(r.last_checkpoint->filename() == "step-000002");
  }
  REQUIRE(steps.size() == 2);
  for (const GrpoStepMetrics& m : steps) {
    CHECK(m.prompts == 4);
    CHECK(m.completions == 16);
    CHECK(m.groups_trained == 4);
    CHECK(m.per_reward.size() == 2);
    // total = 1·answer_match + 0.1·format, averaged over the same completions
    CHECK(m.reward_mean == Approx(m.per_reward.at("answer_match").mean + 0.1 * m.per_reward.at("format").mean));
    CHECK(m.accuracy == Approx(m.per_reward.at("answer_match").mean));
    CHECK(m.length_min <= m.length_mean);
    CHECK(m.length_mean <= m.length_max);
    CHECK(m.length_max <= 32);
    CHECK(m.entropy > 0);
    CHECK(m.max_abs_log_ratio < 1e-3);  // the generator's log-probs are the policy's (f32)
    CHECK(m.generation_tokens_per_s > 0);
    CHECK(m.training_tokens_per_s > 0);
  }
  const auto lines = jsonl(dir / "run/metrics.jsonl");
  int sft = 0, eval = 0, grpo = 0;
  for (const auto& j : lines) {
    sft += j["phase"] == "sft";
    eval += j["phase"] == "eval";
    grpo += j["phase"] == "grpo";
  }
  CHECK(sft == 10);
  CHECK(eval == 2);
  CHECK(grpo == 2);

  // Two more steps: resumes from step 2 (no SFT lines), continues the prompt stream.
  std::vector<std::string> more = short_run(dir / "run", {"train.steps=4"});
  GrpoTrainer resumed(load_recipe(tiny_grpo_recipe(), more), options);
  const GrpoResult r = resumed.run();
  CHECK(r.steps == 4);
  CHECK(steps.size() == 4);
  int sft_after = 0;
  for (const auto& j : jsonl(dir / "run/metrics.jsonl")) sft_after += j["phase"] == "sft";
  CHECK(sft_after == 10);
}

TEST_CASE("GrpoTrainer: zero advantages leave the policy unchanged, shuffled ones do not", "[grpo]") {
  const test::TempDir dir("dsx-test-grpo-control");
  GrpoOptions options;
  options.console = false;
  for (const char* mode : {"zero", "shuffled"}) {
    // A reward proportional to the length, so that every group has a spread even before the
    // model can add (DAPO's overlong penalty over the whole length range).
    GrpoTrainer trainer(
        load_recipe(tiny_grpo_recipe(), short_run(dir / mode, {std::string("grpo.debug_advantages=") + mode,
                                                               "grpo.rewards=[{name: overlong_penalty}]",
                                                               "grpo.overlong_cache=32", "grpo.eval.count=0",
                                                               "model.bias_update_rate=0", "checkpoint.resume=never"})),
        options);
    trainer.sft(5);
    const auto before = parameter_values(trainer.model());
    const GrpoStepMetrics m = trainer.step();
    const bool unchanged = parameter_values(trainer.model()) == before;
    INFO(mode);
    CHECK(m.zero_spread_fraction < 1.0);
    if (std::string(mode) == "zero") {
      CHECK(m.grad_norm == 0.0);
      CHECK(unchanged);
    } else {
      CHECK(m.grad_norm > 0.0);
      CHECK_FALSE(unchanged);
    }
  }
}

TEST_CASE("GrpoTrainer: checkpoint.init_from starts the policy from a checkpoint's weights", "[grpo]") {
  const test::TempDir dir("dsx-test-grpo-init");
  // Another model of the same shape (another seed), saved as a model-only checkpoint.
  const std::vector<std::string> run =
      short_run(dir / "run", {"grpo.sft_steps=0", "train.steps=1", "grpo.debug_advantages=zero",
                              "grpo.rewards=[{name: overlong_penalty}]", "grpo.overlong_cache=32", "grpo.eval.count=0",
                              "model.bias_update_rate=0", "checkpoint.init_from=" + (dir / "source")});
  const Recipe recipe = load_recipe(tiny_grpo_recipe(), run);
  Model source(recipe.model, recipe.model.dtype, static_cast<uint64_t>(recipe.train.seed) + 1);
  std::vector<ckpt::TensorSlice> slices;
  for (Parameter& p : source.parameters()) slices.push_back({p.spec.name, p.spec.shape, {}, p.value});
  ckpt::save(dir / "source", {0, nlohmann::json::object(), ""}, slices);

  GrpoOptions options;
  options.console = false;
  GrpoTrainer trainer(recipe, options);
  REQUIRE(parameter_values(trainer.model()) != parameter_values(source));  // its own initialisation first
  trainer.run();  // loads the checkpoint, then one step with zero advantages: nothing moves
  REQUIRE(parameter_values(trainer.model()) == parameter_values(source));
}

TEST_CASE("GrpoTrainer: a reference model, μ = 2 and ratios away from 1 on the second update", "[grpo]") {
  const test::TempDir dir("dsx-test-grpo-kl");
  GrpoOptions options;
  options.console = false;
  GrpoTrainer trainer(
      load_recipe(tiny_grpo_recipe(),
                  short_run(dir / "kl", {"grpo.beta=0.04", "grpo.mu=2", "grpo.ref_refresh_interval=1", "grpo.loss=grpo",
                                         "grpo.eval.count=0", "optim.lr=1e-2", "checkpoint.resume=never"})),
      options);
  trainer.sft(5);
  const GrpoStepMetrics m = trainer.step();
  // Update 1: policy = reference = π_old, so KL = 0; update 2 moved the policy (lr 1e-2).
  CHECK(m.kl > 0);
  CHECK(m.max_abs_log_ratio < 1e-3);
  CHECK(std::isfinite(m.loss));
}

TEST_CASE("GrpoTrainer: JSONL prompts, an external reward, dynamic sampling drops zero-spread groups", "[grpo]") {
  const test::TempDir dir("dsx-test-grpo-file");
  {
    std::ofstream(dir / "tokenizer.json") << AdditionTask::tokenizer_json();
    std::ofstream prompts(dir / "prompts.jsonl");
    for (int i = 0; i < 12; ++i)
      prompts << nlohmann::json{{"prompt", AdditionTask::prompt_text(i, 2 * i)},
                                {"answer", std::to_string(3 * i)},
                                {"score", 0.25 * (i % 4)}}
                     .dump()
              << "\n";
  }
  const std::string echo =
      (std::filesystem::path(DSX_SOURCE_DIR) / "tests/trainer/grpo_fixtures/echo_score.sh").string();
  GrpoOptions options;
  options.console = false;
  GrpoTrainer trainer(
      load_recipe(
          tiny_grpo_recipe(),
          short_run(dir / "run", {"grpo.task=none", "grpo.prompts=" + dir / "prompts.jsonl",
                                  "data.tokenizer=" + dir / "tokenizer.json", "grpo.sft_steps=0",
                                  "grpo.eval.prompts=" + dir / "prompts.jsonl",
                                  "grpo.rewards=[{name: echo, command: [" + echo + "]}]", "grpo.dynamic_sampling=true",
                                  "grpo.resample_rounds=1", "checkpoint.resume=never"})),
      options);
  const auto before = parameter_values(trainer.model());
  const EvalMetrics e = trainer.evaluate();
  CHECK(e.prompts == 8);
  const GrpoStepMetrics m = trainer.step();
  // The program scores a prompt's completions alike: every group is dropped, both rounds.
  CHECK(m.generation_rounds == 2);
  CHECK(m.prompts == 8);
  CHECK(m.zero_spread_fraction == 1.0);
  CHECK(m.groups_trained == 0);
  // The prompts of both rounds are the loader's first two batches.
  data::PromptLoader loader(std::make_shared<const data::PromptSet>(data::PromptSet::load(dir / "prompts.jsonl")),
                            {.global_batch = 4, .dp_rank = 0, .dp_size = 1, .seed = 1234});
  double expected = 0;
  for (int round = 0; round < 2; ++round)
    for (const data::Prompt& p : loader.next().prompts)
      expected += nlohmann::json::parse(p.extra_json)["score"].get<double>();
  CHECK(m.per_reward.at("echo").mean == Approx(expected / 8));
  const bool unchanged = parameter_values(trainer.model()) == before;
  CHECK(unchanged);
}

TEST_CASE("GrpoTrainer: a recipe without a prompt source is a user error", "[grpo]") {
  const Recipe recipe = load_recipe((std::filesystem::path(DSX_SOURCE_DIR) / "recipes" / "tiny.yaml").string());
  CHECK_THAT(test::user_error([&] { GrpoTrainer trainer(recipe); }), Catch::Contains("grpo.task"));
}
