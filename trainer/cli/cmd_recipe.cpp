// `dsx recipe check RECIPE`, `dsx recipe schedule RECIPE` and `dsx recipe explain [SECTION]`.
#include <fmt/core.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "trainer/cli/registry.h"
#include "trainer/model/pipeline_stage.h"
#include "trainer/recipe/recipe.h"
#include "trainer/recipe/schema.h"
#include "trainer/recipe/summary.h"
#include "trainer/train/layout_plan.h"
#include "trainer/train/schedule.h"

namespace dsx::cli {
namespace {

struct CheckArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  bool print_resolved = false;
};

void run_check(const CheckArgs& args) {
  const Recipe recipe = load_recipe(args.recipe, args.overrides);
  if (args.print_resolved) {
    fmt::print("{}", to_yaml(recipe));
    return;
  }
  fmt::print("{}: valid\n{}", args.recipe, summarize(recipe));
  if (recipe.grpo.enabled()) return;  // the estimate is a pre-training step's
  const LayoutPlan plan = plan_layout(recipe, PlanHardware{});
  if (!plan.refused.empty()) return;
  const RankMemory& m = plan.memory;
  constexpr double kGiB = 1LL << 30;
  fmt::print(
      "{:<11} ~{:.2f} GiB on the busiest rank (pipeline rank {}): model state {:.2f}, activations {:.2f} of {} "
      "micro-batch{}, transient {:.2f} (estimate; dsx plan ranks other layouts)\n",
      "memory", m.total() / kGiB, plan.busiest_rank, m.model_state() / kGiB, m.activations / kGiB, m.micro_batches_held,
      m.micro_batches_held == 1 ? "" : "es", m.transient / kGiB);
}

struct ScheduleArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  double backward_cost = 2;
  size_t max_width = 240;
};

// What one step of the recipe's layout runs on every pipeline stage, and how it fills time.
void run_schedule(const ScheduleArgs& args) {
  const Recipe r = load_recipe(args.recipe, args.overrides);
  const int stages = static_cast<int>(r.parallel.pp);
  const int64_t n = r.train.accumulation_steps(r.train.global_batch, r.parallel.dp);
  fmt::print(
      "{} micro-batches of {} sequences per rank and step (train.global_batch {} / (train.micro_batch {} x "
      "parallel.dp {})){}\n",
      n, r.train.micro_batch, r.train.global_batch, r.train.micro_batch, r.parallel.dp,
      r.train.batch_ramp.start > 0 ? "; at the final batch size, after the ramp" : "");
  Recipe shown = r;  // a schedule that is not built yet is shown as 1f1b
  if (stages > 1 && r.parallel.pp_schedule == PipelineSchedule::dualpipe) {
    fmt::print("parallel.pp_schedule is {}, which is not built yet; showing 1f1b\n", enum_name(r.parallel.pp_schedule));
    shown.parallel.pp_schedule = PipelineSchedule::one_f_one_b;
  }
  const PipelineLayout layout = pipeline_layout(shown);
  if (stages > 1) {
    fmt::print("pipeline: {} over {}\n", enum_name(shown.parallel.pp_schedule),
               describe_pipeline(pipeline_split(shown), r.model.num_nextn_predict_layers, layout));
  }
  fmt::print(
      "actions (F3 forward of micro-batch 3, BW3 its backward, B3/W3 its input/weight passes; SA/RA send/receive "
      "activations, SG/RG their "
      "gradients, SE/RE MTP embeddings, SEG/REG theirs; >s to stage s, <s from it; {}OPT optimizer step):\n",
      layout.chunks() > 1 ? "F3' etc. on the rank's chunk 1, F3'' on chunk 2, ...; SA3>0' to stage 0's chunk 1; " : "");
  const ActionCosts costs{
      .forward = 1, .backward_input = args.backward_cost / 2, .backward_weight = args.backward_cost / 2};
  const RecipeStep step = run_recipe_step(shown, n, costs);
  for (int s = 0; s < stages; ++s) {
    const std::vector<Action>& a = step.schedules[static_cast<size_t>(s)];
    constexpr size_t most = 96;
    const std::vector<Action> head(a.begin(), a.begin() + static_cast<std::ptrdiff_t>(std::min(a.size(), most)));
    fmt::print("  stage {}: {}{}\n", s, to_string(head),
               a.size() > most ? fmt::format(" ... ({} actions)", a.size()) : std::string());
  }
  std::string in_flight;
  for (int s = 0; s < stages; ++s) {
    in_flight +=
        fmt::format("{}stage {}: {}", s ? " | " : "", s, max_in_flight(step.schedules[static_cast<size_t>(s)]));
  }
  fmt::print("micro-batches in flight at most (their activations are stored{}): {}\n",
             layout.chunks() > 1 ? fmt::format("; chunk micro-batches of 1/{} stage each", layout.chunks()) : "",
             in_flight);
  const PipelineRun& run = step.run;
  if (!run.stuck.empty()) {  // only a layout that training refuses too gets here (check_layout_is_built)
    throw UserError(fmt::format(
        "parallel.pp_schedule: {} cannot run with {} ranks on {}: {}", enum_name(shown.parallel.pp_schedule), stages,
        r.model.device == Device::cuda ? "GPUs (NCCL, one in-order stream per rank)" : "MPI", run.stuck));
  }
  fmt::print("on the clock (a stage's forward 1, backward {:g}, transfers free): {:g} units per step, bubble {:.1f}%\n",
             args.backward_cost, run.makespan, 100 * run.bubble);
  if (stages > 1) {
    const PipelineRun weighted = run_recipe_step(shown, n, costs, /*by_flops=*/true).run;
    std::string shares;
    for (double f : relative_stage_flops(shown)) shares += fmt::format("{}{:.2f}", shares.empty() ? "" : " ", f);
    fmt::print(
        "with each stage weighted by its model FLOPs (parallel.pp_split {}; stages relative to the mean: {}): {:g} "
        "units per step, bubble {:.1f}%\n",
        enum_name(shown.parallel.pp_split), shares, weighted.makespan, 100 * weighted.bubble);
  }
  if (run.makespan * layout.chunks() > static_cast<double>(args.max_width)) {
    fmt::print("timeline omitted: {:g} characters wide (--width {})\n", run.makespan * layout.chunks(), args.max_width);
    return;
  }
  fmt::print(
      "timeline (digit: forward of that micro-batch, letter: its backward, a = 0, upper case: a weight pass; '.' "
      "idle{}):\n{}",
      layout.chunks() > 1 ? fmt::format("; one character per 1/{} unit, a chunk's action", layout.chunks()) : "",
      draw_timeline(run, 1.0 / layout.chunks()));
}

const Register kRegister("recipe", 15, [](CLI::App& app) {
  CLI::App* recipe = app.add_subcommand("recipe", "Validate recipes and document their keys");
  recipe->require_subcommand(1);

  auto check_args = std::make_shared<CheckArgs>();
  CLI::App* check = recipe->add_subcommand(
      "check",
      "Validate a recipe (with any --set overrides) and print the model shape, parameter counts, tokens per step, "
      "layout and schedule. Exit code 0 when valid; 2 with one message naming the key otherwise.");
  check->add_option("RECIPE", check_args->recipe, "recipe YAML file")->required();
  check
      ->add_option("--set", check_args->overrides,
                   "override a key before validation: --set optim.lr=3e-4, --set train.recompute=[rmsnorm] "
                   "(values are YAML; repeatable)")
      ->take_all()
      ->allow_extra_args(false);
  check->add_flag("--resolved", check_args->print_resolved,
                  "print the fully resolved recipe (every key, as written into the run directory) instead");
  check->callback([check_args] { run_check(*check_args); });

  auto schedule_args = std::make_shared<ScheduleArgs>();
  CLI::App* schedule = recipe->add_subcommand(
      "schedule",
      "Print the actions one training step runs on every pipeline stage (1F1B, zero-bubble or DualPipeV; gradient "
      "accumulation with one stage) and its clocked timeline: time per step and the pipeline bubble, with a drawing of "
      "it.");
  schedule->add_option("RECIPE", schedule_args->recipe, "recipe YAML file")->required();
  schedule->add_option("--set", schedule_args->overrides, "override a key before validation (as for check; repeatable)")
      ->take_all()
      ->allow_extra_args(false);
  schedule->add_option("--backward-cost", schedule_args->backward_cost, "a backward's time in forwards (default 2)")
      ->check(CLI::PositiveNumber);
  schedule->add_option("--width", schedule_args->max_width,
                       "draw the timeline up to this many characters (default 240)");
  schedule->callback([schedule_args] { run_schedule(*schedule_args); });

  auto section = std::make_shared<std::string>();
  CLI::App* explain = recipe->add_subcommand(
      "explain", "Print every recipe key with its type, default and meaning (optionally of one section).");
  explain->add_option("SECTION", *section, "model, data, parallel, train, optim, precision, checkpoint or logging");
  explain->callback([section] { fmt::print("{}", schema::explain(*section)); });
});

}  // namespace
}  // namespace dsx::cli
