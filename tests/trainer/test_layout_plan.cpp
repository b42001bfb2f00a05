// `dsx plan`'s arithmetic (trainer/train/layout_plan.h) against what the model and a run have:
// every parameter element is held by exactly the ranks the layout says, and the estimated peak
// memory of a rank is the peak of live tensor memory a real step measures.
#include <catch2/catch.hpp>

#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "trainer/model/param_count.h"
#include "trainer/recipe/recipe.h"
#include "trainer/train/layout_plan.h"
#include "trainer/train/trainer.h"

using namespace dsx;
namespace fs = std::filesystem;

namespace {

Recipe tiny(std::vector<std::string> overrides) {
  return load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/tiny.yaml", overrides);
}

// The peak of live tensor bytes of a run's last step (one process, CPU).
int64_t measured_peak(Recipe recipe, const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("dsx-test-plan-" + name + "-" + std::to_string(::getpid()));
  fs::remove_all(dir);
  recipe.logging.run_dir = dir.string();
  recipe.checkpoint.interval = 0;
  recipe.logging.interval = 1;
  TrainerOptions options;
  options.console = false;
  int64_t peak = 0;
  options.on_step = [&](const StepMetrics& m) { peak = m.device_peak_bytes; };
  Trainer(recipe, options).run();
  fs::remove_all(dir);
  return peak;
}

}  // namespace

TEST_CASE("plan: the ranks of a layout hold every parameter element exactly once per replica", "[plan]") {
  const Recipe one = tiny({});
  const ParameterCounts counts = count_parameters(one.model);
  const int64_t all = counts.total + counts.mtp;
  REQUIRE(rank_memory(one, 0).parameters == all);

  // pp 2 (even split, and DualPipeV's V), tp 2 and ep 2 (experts over ep·tp = 4 ranks): the pipeline
  // ranks partition the model; tp splits sharded tensors and experts, replicated ones stay whole.
  for (const std::string schedule : {"1f1b", "dualpipev"}) {
    INFO(schedule);
    const Recipe r = tiny({"parallel.pp=2", "parallel.dp=2", "parallel.ep=2", "parallel.tp=2",
                           "parallel.pp_schedule=" + schedule, "train.global_batch=32", "train.micro_batch=4"});
    int64_t held = 0;
    for (int rank = 0; rank < 2; ++rank) held += rank_memory(r, rank).parameters;
    REQUIRE(held > all / 4);
    REQUIRE(held < all);
  }
  // With pp alone the two stages' parameters add up to the model exactly.
  const Recipe pp2 = tiny({"parallel.pp=2"});
  REQUIRE(rank_memory(pp2, 0).parameters + rank_memory(pp2, 1).parameters == all);
}

TEST_CASE("plan: the estimated peak memory of a step is the measured one", "[plan][slow]") {
  struct Variant {
    std::string name;
    std::vector<std::string> overrides;
  };
  const std::vector<Variant> variants = {
      {"default", {}},
      {"long", {"train.micro_batch=2", "train.global_batch=4", "train.seq_len=128"}},
      {"recompute", {"train.recompute=[rmsnorm, mla_up_proj, moe_act]"}},
      {"full", {"train.recompute=[full]"}},
      {"bf16", {"precision.activations=bf16", "precision.gemm=bf16", "optim.moments=bf16"}},
      {"ema", {"optim.ema_decay=0.9"}},
  };
  for (const Variant& v : variants) {
    std::vector<std::string> overrides = {"train.steps=2", "optim.schedule.warmup=1"};
    overrides.insert(overrides.end(), v.overrides.begin(), v.overrides.end());
    const Recipe r = tiny(overrides);
    const RankMemory estimate = rank_memory(r, 0);
    const double measured = static_cast<double>(measured_peak(r, v.name));
    INFO(v.name << ": estimated " << estimate.total() << " B (state " << estimate.model_state() << ", activations "
                << estimate.activations << ", transient " << estimate.transient << "), measured " << measured);
    // Measured: the estimate is 2-6% low (small temporaries it leaves out: rotated rope copies, the
    // batch, the cross entropy's workspace); a missing or double-counted activation tensor of a
    // layer moves it by more than 10%.
    CHECK(std::abs(estimate.total() / measured - 1) < 0.10);
  }
}
