// The training loop: exact resume, checkpoint selection on resume, loss going down.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>

#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/model.h"
#include "trainer/model/parameters.h"
#include "trainer/recipe/recipe.h"
#include "trainer/train/trainer.h"

using namespace dsx;
namespace fs = std::filesystem;

namespace {

// The shipped tiny recipe, shrunk so a test step takes milliseconds, writing into `run_dir`.
Recipe small_recipe(const fs::path& run_dir, int64_t steps, std::vector<std::string> extra = {}) {
  std::vector<std::string> overrides = {"train.steps=" + std::to_string(steps),
                                        "train.global_batch=4",
                                        "train.micro_batch=2",
                                        "train.seq_len=16",
                                        "model.hidden_size=32",
                                        "model.vocab_size=64",
                                        "model.q_lora_rank=16",
                                        "model.kv_lora_rank=16",
                                        "model.qk_nope_head_dim=8",
                                        "model.qk_rope_head_dim=8",
                                        "model.v_head_dim=8",
                                        "model.intermediate_size=64",
                                        "model.moe_intermediate_size=16",
                                        "model.max_position_embeddings=16",
                                        "optim.schedule.warmup=2",
                                        "checkpoint.interval=2",
                                        "checkpoint.keep_last=10",
                                        "logging.interval=1",
                                        "logging.run_dir=" + run_dir.string()};
  overrides.insert(overrides.end(), extra.begin(), extra.end());
  return load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/tiny.yaml", overrides);
}

struct Run {
  std::vector<double> losses;
  std::vector<std::vector<double>> params;  // every parameter's values at the end
  TrainResult result;
};

Run train(const Recipe& recipe, int64_t stop_after = 0) {
  Run run;
  TrainerOptions options;
  options.console = false;
  options.stop_after_steps = stop_after;
  options.on_step = [&](const StepMetrics& m) { run.losses.push_back(m.loss); };
  Trainer trainer(recipe, options);
  run.result = trainer.run();
  for (const Parameter& p : trainer.model().parameters()) run.params.push_back(p.value.to_vector());
  return run;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("dsx-test-train-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  return dir;
}

}  // namespace

TEST_CASE("train: N steps + stop + resume N steps is bit-identical to 2N straight", "[train][resume]") {
  const fs::path straight_dir = fresh_dir("straight");
  const fs::path split_dir = fresh_dir("split");
  const Run straight = train(small_recipe(straight_dir, 8));
  REQUIRE(straight.losses.size() == 8);

  const Run first_half = train(small_recipe(split_dir, 8), /*stop_after=*/4);
  REQUIRE(first_half.result.last_step == 4);
  REQUIRE(first_half.result.last_checkpoint.has_value());
  const Run second_half = train(small_recipe(split_dir, 8));  // resume: auto
  REQUIRE(second_half.result.first_step == 4);
  REQUIRE(second_half.result.last_step == 8);

  std::vector<double> resumed = first_half.losses;
  resumed.insert(resumed.end(), second_half.losses.begin(), second_half.losses.end());
  // Bit-identical, not merely close: the same ops on the same data in the same order.
  REQUIRE(resumed == straight.losses);
  REQUIRE(second_half.params == straight.params);
  fs::remove_all(straight_dir);
  fs::remove_all(split_dir);
}

TEST_CASE("train: resume picks the newest complete checkpoint, ignoring broken ones", "[train][resume]") {
  const fs::path dir = fresh_dir("broken");
  const Run first = train(small_recipe(dir, 8), /*stop_after=*/4);  // checkpoints at steps 2 and 4
  const fs::path root = dir / "checkpoints";
  REQUIRE(fs::exists(root / "step-000004" / "manifest.json"));
  // What a save killed mid-write leaves: a temporary directory, and a step directory whose
  // manifest is missing. Neither may be taken for a checkpoint.
  fs::create_directories(root / "step-000006.tmp-999");
  std::ofstream(root / "step-000006.tmp-999" / "rank-00000.h5") << "partial";
  fs::create_directories(root / "step-000007");
  std::ofstream(root / "step-000007" / "rank-00000.h5") << "partial";
  const Run resumed = train(small_recipe(dir, 5));
  REQUIRE(resumed.result.first_step == 4);
  REQUIRE(resumed.result.last_step == 5);
  REQUIRE_FALSE(fs::exists(root / "step-000006.tmp-999"));  // stale temporaries are cleaned up
  fs::remove_all(dir);
}

TEST_CASE("train: checkpoint.init_from starts a fresh run from another run's weights", "[train]") {
  const fs::path source_dir = fresh_dir("init-source");
  const fs::path dir = fresh_dir("init");
  const Run source = train(small_recipe(source_dir, 4));
  // One step (of two) at the first warm-up step's learning rate, 0: AdamW leaves the weights as
  // loaded; only the routers' bias moves (by ±γ from the step's loads).
  const std::string from = "checkpoint.init_from=" + (source_dir / "checkpoints").string();
  const Run fresh = train(small_recipe(dir, 2, {from}), /*stop_after=*/1);
  REQUIRE(fresh.result.first_step == 0);
  const std::vector<ParamSpec> specs = model_param_specs(small_recipe(dir, 2).model);  // the store's order
  REQUIRE(specs.size() == fresh.params.size());
  size_t compared = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (specs[i].name.ends_with("e_score_correction_bias")) continue;
    INFO(specs[i].name);
    REQUIRE(fresh.params[i] == source.params[i]);
    ++compared;
  }
  REQUIRE(compared > 100);
  REQUIRE(fresh.params != train(small_recipe(fresh_dir("init-none"), 2), 1).params);  // random init differs
  REQUIRE_THROWS_WITH(train(small_recipe(fresh_dir("init-bad"), 2, {"checkpoint.init_from=/no/such/dir"})),
                      Catch::Contains("checkpoint.init_from: /no/such/dir"));
  for (const fs::path& d : {source_dir, dir, fresh_dir("init-none"), fresh_dir("init-bad")}) fs::remove_all(d);
}

TEST_CASE("train: the loss falls on the synthetic chain", "[train]") {
  const fs::path dir = fresh_dir("falls");
  const Run run = train(small_recipe(dir, 30, {"optim.lr=1e-2", "checkpoint.interval=0"}));
  REQUIRE(run.losses.size() == 30);
  const double start = run.losses.front();
  const double end = (run.losses[27] + run.losses[28] + run.losses[29]) / 3;
  INFO("start " << start << " end " << end);
  REQUIRE(end < start - 1.0);
  fs::remove_all(dir);
}

namespace {

// Every tensor of `prefix` + a parameter's name in a checkpoint, by parameter name.
std::map<std::string, std::vector<double>> tensors_of(const fs::path& checkpoint, const std::string& prefix) {
  ckpt::CheckpointReader reader(checkpoint);
  std::map<std::string, std::vector<double>> out;
  for (const ckpt::TensorInfo& info : reader.manifest().tensors) {
    if (info.name.starts_with(prefix)) out[info.name.substr(prefix.size())] = reader.read_whole(info.name).to_vector();
  }
  return out;
}

// The relative error of `got` against `want`, element by element, at its worst.
double worst_relative_error(const std::vector<double>& got, const std::vector<double>& want) {
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - want[i]) / std::max(std::abs(want[i]), 1e-3));
  return worst;
}

}  // namespace

// optim.ema_decay: the average starts from the step-0 weights and follows ema_k = d·ema_{k-1} +
// (1 − d)·w_k after every step (w_k read from the checkpoint of step k). The update runs in f32
// (keep·a + take·v with keep, take rounded to f32): within 1e-6 relative of the f64 recurrence
// (a few roundings of ~6e-8 each); a missed or doubled step, or the wrong weights, differ by
// (1 − d)·|w_k − w_{k−1}| ~ 1e-3 relative here.
TEST_CASE("train: the weight EMA follows its recurrence from the initial weights and resumes exactly", "[train][ema]") {
  const double d = 0.75;
  const std::vector<std::string> ema = {"optim.ema_decay=0.75", "checkpoint.interval=1"};
  const fs::path dir = fresh_dir("ema");
  const Run run = train(small_recipe(dir, 4, ema));
  REQUIRE(run.losses.size() == 4);

  const Recipe recipe = small_recipe(dir, 4, ema);
  Model initial(recipe.model, recipe.model.dtype, static_cast<uint64_t>(recipe.train.seed));
  std::map<std::string, std::vector<double>> previous;
  for (Parameter& p : initial.parameters()) previous[p.spec.name] = p.value.to_vector();
  size_t checked = 0;
  for (int step = 1; step <= 4; ++step) {
    const fs::path checkpoint = dir / "checkpoints" / ckpt::step_dir_name(step);
    const auto weights = tensors_of(checkpoint, "");
    const auto averages = tensors_of(checkpoint, "ema.");
    REQUIRE(averages.size() == previous.size());
    for (const auto& [name, average] : averages) {
      std::vector<double> want = previous.at(name);
      const std::vector<double>& w = weights.at(name);
      for (size_t i = 0; i < want.size(); ++i) want[i] = d * want[i] + (1 - d) * w[i];
      INFO("step " << step << ", " << name);
      REQUIRE(worst_relative_error(average, want) < 1e-6);
      previous[name] = average;
      ++checked;
    }
  }
  REQUIRE(checked > 4 * 10);

  // 2 steps, stop, resume 2: the same averages, bit for bit
  const fs::path split = fresh_dir("ema-split");
  train(small_recipe(split, 4, ema), /*stop_after=*/2);
  train(small_recipe(split, 4, ema));
  REQUIRE(tensors_of(split / "checkpoints" / ckpt::step_dir_name(4), "ema.") ==
          tensors_of(dir / "checkpoints" / ckpt::step_dir_name(4), "ema."));

  // turned on when resuming a run that had none: it starts from the restored weights
  const fs::path late = fresh_dir("ema-late");
  train(small_recipe(late, 4, {"checkpoint.interval=1"}), /*stop_after=*/2);
  train(small_recipe(late, 3, ema));
  const auto w2 = tensors_of(late / "checkpoints" / ckpt::step_dir_name(2), "");
  const auto w3 = tensors_of(late / "checkpoints" / ckpt::step_dir_name(3), "");
  for (const auto& [name, average] : tensors_of(late / "checkpoints" / ckpt::step_dir_name(3), "ema.")) {
    std::vector<double> want = w2.at(name);
    for (size_t i = 0; i < want.size(); ++i) want[i] = d * want[i] + (1 - d) * w3.at(name)[i];
    INFO(name);
    REQUIRE(worst_relative_error(average, want) < 1e-6);
  }
  for (const fs::path& p : {dir, split, late}) fs::remove_all(p);
}
