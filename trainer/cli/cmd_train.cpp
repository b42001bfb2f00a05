// dsx train RECIPE [--set key=value]... [--stop-after N]
#include <fmt/core.h>

#include "trainer/cli/registry.h"
#include "trainer/recipe/recipe.h"
#include "trainer/train/trainer.h"

namespace dsx::cli {
namespace {

struct TrainArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  int64_t stop_after = 0;
};

void add_train(CLI::App& app) {
  auto args = std::make_shared<TrainArgs>();
  CLI::App* cmd = app.add_subcommand(
      "train",
      "Train a model from a YAML recipe (resumes automatically from the "
      "newest complete checkpoint unless checkpoint.resume says otherwise). Multi-rank: "
      "mpirun -np N dsx train RECIPE with N = parallel.pp x parallel.dp x parallel.tp (pipeline, data, "
      "tensor parallel; expert parallel inside data x tensor)");
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML)")->required();
  cmd->add_option("--set", args->overrides, "Override a recipe key, e.g. --set train.steps=200 (repeatable)");
  cmd->add_option("--stop-after", args->stop_after,
                  "Stop after this many steps of this invocation, with a checkpoint (resume later)");
  cmd->callback([args] {
    TrainerOptions options;
    options.stop_after_steps = args->stop_after;
    Trainer trainer(load_recipe(args->recipe, args->overrides), options);
    const TrainResult r = trainer.run();
    if (!trainer.is_rank0()) return;
    fmt::print("done: step {} loss {:.4f}; run directory {}\n", r.last_step, r.final_loss, r.run_dir.string());
    if (r.last_checkpoint) fmt::print("last checkpoint: {}\n", r.last_checkpoint->string());
  });
}

Register reg("train", 10, add_train);

}  // namespace
}  // namespace dsx::cli
