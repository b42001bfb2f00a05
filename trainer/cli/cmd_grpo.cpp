// dsx grpo RECIPE [--set key=value]...
#include <fmt/core.h>

#include "trainer/cli/registry.h"
#include "trainer/grpo/grpo_trainer.h"
#include "trainer/recipe/recipe.h"

namespace dsx::cli {
namespace {

struct GrpoArgs {
  std::string recipe;
  std::vector<std::string> overrides;
};

void run_grpo(const GrpoArgs& args) {
  grpo::GrpoTrainer trainer(load_recipe(args.recipe, args.overrides));
  const grpo::GrpoResult r = trainer.run();
  if (!trainer.is_rank0()) return;  // data-parallel runs: rank 0 reports
  std::string accuracy;
  if (r.evals.size() >= 2) {
    accuracy = fmt::format("; held-out accuracy {:.1f}% -> {:.1f}%", 100 * r.evals.front().accuracy,
                           100 * r.evals.back().accuracy);
  } else if (r.evals.size() == 1) {
    accuracy = fmt::format("; held-out accuracy {:.1f}%", 100 * r.evals.front().accuracy);
  }
  fmt::print("done: {} GRPO steps{}; run directory {}\n", r.steps, accuracy, r.run_dir.string());
  if (r.last_checkpoint) fmt::print("last checkpoint: {}\n", r.last_checkpoint->string());
}

void add_grpo(CLI::App& app) {
  auto args = std::make_shared<GrpoArgs>();
  CLI::App* cmd = app.add_subcommand(
      "grpo",
      "Reinforcement learning with GRPO from a YAML recipe's `grpo` section: optional supervised warm-up on a "
      "built-in task (grpo.sft_steps), then train.steps GRPO steps with held-out evaluations (resumes from the "
      "newest complete checkpoint unless checkpoint.resume says otherwise)");
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML) with a grpo section (`dsx recipe explain grpo`)")
      ->required();
  cmd->add_option("--set", args->overrides, "Override a recipe key, e.g. --set grpo.beta=0.04 (repeatable)");
  cmd->callback([args] { run_grpo(*args); });
}

Register reg("grpo", 12, add_grpo);

}  // namespace
}  // namespace dsx::cli
