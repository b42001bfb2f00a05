// dsx plan RECIPE --gpus N: the parallel layouts of a recipe on N devices, ranked (see
// trainer/train/layout_plan.h for what is estimated and how).
#include <fmt/core.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "trainer/cli/registry.h"
#include "trainer/model/param_count.h"
#include "trainer/recipe/recipe.h"
#include "trainer/recipe/summary.h"
#include "trainer/train/layout_plan.h"

namespace dsx::cli {
namespace {

namespace fs = std::filesystem;

struct PlanArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  int64_t gpus = 0;
  int64_t gpus_per_node = 8;
  double memory_gib = 79.6;
  double peak_tflops = 0;
  double mfu = 0.4;
  double fp8_speedup = 2.0;
  double nvlink_gbps = 450;
  double network_gbps = 50;
  int top = 12;
  bool show_refused = false;
  std::string measured_run;
  double tolerance = 0.15;
  bool json = false;
};

constexpr double kGiB = 1LL << 30;

// The table's memory unit: GiB, or MiB when every layout needs less than a GiB.
struct MemoryUnit {
  const char* name;
  double bytes;
  std::string operator()(double value) const { return fmt::format("{:.1f}", value / bytes); }
};
MemoryUnit memory_unit(const std::vector<LayoutPlan>& plans) {
  double most = 0;
  for (const LayoutPlan& plan : plans) most = std::max(most, plan.memory.total());
  return most < kGiB ? MemoryUnit{"MiB", 1 << 20} : MemoryUnit{"GiB", kGiB};
}

std::string layout_name(const ParallelSection& p) {
  std::string name = fmt::format("pp {} x dp {} x tp {}, ep {}", p.pp, p.dp, p.tp, p.ep);
  if (p.sequence_parallel) name += ", sp";
  if (p.pp > 1) {
    const bool interleaved = p.pp_schedule == PipelineSchedule::interleaved_1f1b;
    name += fmt::format(", {}{} {}", enum_name(p.pp_schedule), interleaved ? fmt::format(" x{}", p.pp_chunks) : "",
                        enum_name(p.pp_split));
  }
  return name;
}

std::string set_flags(const ParallelSection& p) {
  std::string flags = fmt::format("--set parallel.pp={} --set parallel.dp={} --set parallel.tp={} --set parallel.ep={}",
                                  p.pp, p.dp, p.tp, p.ep);
  flags += fmt::format(" --set parallel.sequence_parallel={}", p.sequence_parallel ? "true" : "false");
  if (p.pp > 1) {
    flags += fmt::format(" --set parallel.pp_schedule={} --set parallel.pp_split={}", enum_name(p.pp_schedule),
                         enum_name(p.pp_split));
    if (p.pp_schedule == PipelineSchedule::interleaved_1f1b)
      flags += fmt::format(" --set parallel.pp_chunks={}", p.pp_chunks);
  }
  return flags;
}

void print_table(const std::vector<LayoutPlan>& plans, int top) {
  const MemoryUnit unit = memory_unit(plans);
  fmt::print(
      "memory in {} on the busiest rank (! = does not fit; optim = AdamW moments + a CPU model's weight EMA), mb = "
      "micro-batches whose activations it keeps; "
      "step s = compute stretched by the bubble + exposed tp, ep, dp, pp communication\n",
      unit.name);
  fmt::print(
      "{:>3}  {:<50} {:>8}  {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}  {:>4}  {:>8} {:>6} {:>6} {:>6} {:>6}  "
      "{:>6}  {:>10} {:>5}\n",
      "#", "layout", "params", "weight", "grads", "copies", "optim", "activ", "trans", "total", "mb", "step s", "tp",
      "ep", "dp", "pp", "bubble", "tokens/s", "MFU");
  int shown = 0;
  for (const LayoutPlan& plan : plans) {
    if (!plan.refused.empty() || shown >= top) break;
    const RankMemory& m = plan.memory;
    fmt::print(
        "{:>3}  {:<50} {:>8}  {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}{} {:>4}  {:>8.3f} {:>6.3f} {:>6.3f} "
        "{:>6.3f} {:>6.3f}  {:>5.1f}%  {:>10} {:>4.1f}%\n",
        ++shown, layout_name(plan.parallel), human_count(static_cast<double>(m.parameters)), unit(m.weights),
        unit(m.gradients), unit(m.gemm_copies), unit(m.optimizer + m.ema), unit(m.activations), unit(m.transient),
        unit(m.total()), plan.fits ? " " : "!", m.micro_batches_held, plan.time.total(), plan.time.tp, plan.time.ep,
        plan.time.dp, plan.time.pp, 100 * plan.time.bubble, human_count(plan.tokens_per_s), 100 * plan.mfu);
  }
}

nlohmann::json to_json(const LayoutPlan& plan) {
  const ParallelSection& p = plan.parallel;
  const RankMemory& m = plan.memory;
  nlohmann::json j = {{"parallel",
                       {{"pp", p.pp},
                        {"dp", p.dp},
                        {"tp", p.tp},
                        {"ep", p.ep},
                        {"sequence_parallel", p.sequence_parallel},
                        {"pp_schedule", enum_name(p.pp_schedule)},
                        {"pp_chunks", p.pp_schedule == PipelineSchedule::interleaved_1f1b ? p.pp_chunks : 1},
                        {"pp_split", enum_name(p.pp_split)}}},
                      {"runs", plan.refused.empty()}};
  if (!plan.refused.empty()) {
    j["refused"] = plan.refused;
    return j;
  }
  j["fits"] = plan.fits;
  j["busiest_rank"] = plan.busiest_rank;
  j["memory_bytes"] = {{"total", m.total()},           {"weights", m.weights},         {"gradients", m.gradients},
                       {"gemm_copies", m.gemm_copies}, {"optimizer", m.optimizer},     {"ema", m.ema},
                       {"host_ema", m.host_ema},       {"activations", m.activations}, {"transient", m.transient}};
  j["parameters"] = m.parameters;
  j["micro_batches_held"] = m.micro_batches_held;
  j["comm_bytes_per_step"] = {{"tp", plan.comm.tp}, {"ep", plan.comm.ep}, {"dp", plan.comm.dp}, {"pp", plan.comm.pp}};
  j["step_s"] = {{"total", plan.time.total()}, {"compute", plan.time.compute}, {"tp", plan.time.tp},
                 {"ep", plan.time.ep},         {"dp", plan.time.dp},           {"pp", plan.time.pp}};
  j["bubble"] = plan.time.bubble;
  j["tokens_per_s"] = plan.tokens_per_s;
  j["mfu"] = plan.mfu;
  return j;
}

// --json: the hardware assumed and every layout, ranked as the table ranks them.
void print_json(const PlanHardware& hw, const std::vector<LayoutPlan>& plans) {
  nlohmann::json layouts = nlohmann::json::array();
  for (const LayoutPlan& plan : plans) layouts.push_back(to_json(plan));
  const nlohmann::json out = {{"hardware",
                               {{"devices", hw.devices},
                                {"devices_per_node", hw.devices_per_node},
                                {"memory_bytes", hw.memory_bytes},
                                {"usable_fraction", hw.usable_fraction},
                                {"peak_flops", hw.peak_flops},
                                {"mfu", hw.mfu},
                                {"intra_node_bytes_per_s", hw.intra_node_bytes_per_s},
                                {"inter_node_bytes_per_s", hw.inter_node_bytes_per_s}}},
                              {"layouts", layouts}};
  fmt::print("{}\n", out.dump(1));
}

void print_refusals(const std::vector<LayoutPlan>& plans, bool every_one) {
  std::map<std::string, int> reasons;  // the first line of each reason, counted
  for (const LayoutPlan& plan : plans) {
    if (plan.refused.empty()) continue;
    if (every_one) fmt::print("  {}: {}\n", layout_name(plan.parallel), plan.refused);
    ++reasons[plan.refused.substr(0, plan.refused.find('\n'))];
  }
  if (every_one || reasons.empty()) return;
  for (const auto& [reason, count] : reasons) fmt::print("  {:>4} x {}\n", count, reason);
}

// The peak of live tensor memory rank 0 measured in the last step of a run's metrics.jsonl.
int64_t measured_peak_bytes(const fs::path& run_dir) {
  const fs::path path = run_dir / "metrics.jsonl";
  std::ifstream in(path);
  if (!in) throw UserError("--measured: cannot read " + path.string());
  int64_t peak = -1;
  for (std::string line; std::getline(in, line);) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_object() && j.contains("device_peak_bytes")) peak = j["device_peak_bytes"].get<int64_t>();
  }
  if (peak < 0) throw UserError("--measured: " + path.string() + " has no step with device_peak_bytes");
  return peak;
}

// `--measured RUN_DIR`: how far the estimate for rank 0 of the recipe's layout is from what a run
// of it measured; exit code 1 when further than the tolerance.
void compare_with_run(const Recipe& recipe, const PlanArgs& args) {
  const RankMemory estimate = rank_memory(recipe, 0);
  const auto measured = static_cast<double>(measured_peak_bytes(args.measured_run));
  const double ratio = estimate.total() / measured;
  constexpr double kMiB = 1 << 20;
  fmt::print(
      "{}, pipeline rank 0: estimated {:.2f} MiB (model state {:.2f}, activations {:.2f} of {} micro-batches, "
      "transient {:.2f}), measured {:.2f} MiB: ratio {:.3f}\n",
      layout_name(recipe.parallel), estimate.total() / kMiB, estimate.model_state() / kMiB, estimate.activations / kMiB,
      estimate.micro_batches_held, estimate.transient / kMiB, measured / kMiB, ratio);
  if (std::abs(ratio - 1) > args.tolerance) {
    fmt::print("the estimate is off by more than {:.0f}%\n", 100 * args.tolerance);
    set_exit_code(1);
  }
}

// When nothing fits: what the usual memory levers would give (full recompute, one sequence per
// micro-batch, both), each planned like the recipe.
void suggest_less_memory(const Recipe& recipe, const PlanHardware& hw) {
  std::vector<std::pair<std::string, Recipe>> variants;
  const bool full = recipe.train.recomputes(RecomputeKind::full);
  Recipe recompute = recipe;
  recompute.train.recompute = {RecomputeKind::full};
  Recipe one_sequence = recipe;
  one_sequence.train.micro_batch = 1;
  Recipe both = recompute;
  both.train.micro_batch = 1;
  if (!full) variants.emplace_back("--set 'train.recompute=[full]'", recompute);
  if (recipe.train.micro_batch > 1) variants.emplace_back("--set train.micro_batch=1", one_sequence);
  if (!full && recipe.train.micro_batch > 1) variants.emplace_back("both", both);
  if (variants.empty()) return;
  fmt::print("\nnothing fits; with less activation memory:\n");
  for (const auto& [flags, variant] : variants) {
    const std::vector<LayoutPlan> plans = plan_layouts(variant, hw);
    const auto fit = std::count_if(plans.begin(), plans.end(), [](const auto& p) { return p.fits; });
    if (fit == 0) {
      fmt::print("  {}: none fits either\n", flags);
      continue;
    }
    const LayoutPlan& best = plans.front();
    fmt::print("  {}: {} fit, the best {} at {:.1f} GiB, ~{:.3f} s per step\n", flags, fit, layout_name(best.parallel),
               best.memory.total() / kGiB, best.time.total());
  }
}

void run_plan(const PlanArgs& args) {
  const Recipe recipe = load_recipe(args.recipe, args.overrides);
  if (!args.measured_run.empty()) {
    compare_with_run(recipe, args);
    return;
  }
  if (recipe.grpo.enabled()) {
    throw UserError("dsx plan: " + args.recipe +
                    " has a grpo section; plan estimates pre-training steps (GRPO runs pp = tp = ep = 1, scale it "
                    "with parallel.dp)");
  }
  PlanHardware hw;
  hw.devices = args.gpus > 0 ? args.gpus : recipe.parallel.pp * recipe.parallel.dp * recipe.parallel.tp;
  hw.devices_per_node = std::min(args.gpus_per_node, hw.devices);
  hw.memory_bytes = args.memory_gib * kGiB;
  hw.peak_flops = args.peak_tflops > 0            ? args.peak_tflops * 1e12
                  : recipe.logging.peak_flops > 0 ? recipe.logging.peak_flops
                                                  : hw.peak_flops;
  hw.mfu = args.mfu;
  hw.fp8_speedup = args.fp8_speedup;
  hw.intra_node_bytes_per_s = args.nvlink_gbps * 1e9;
  hw.inter_node_bytes_per_s = args.network_gbps * 1e9;

  if (args.json) {
    const std::vector<LayoutPlan> plans = plan_layouts(recipe, hw);
    print_json(hw, plans);
    if (std::none_of(plans.begin(), plans.end(), [](const auto& p) { return p.fits; })) set_exit_code(2);
    return;
  }
  const ParameterCounts counts = count_parameters(recipe.model);
  fmt::print(
      "{}: {} devices, {} per node, {} GiB each ({:.0f}% usable), {:g} TFLOP/s at {:.0f}% MFU, {:g} GB/s "
      "inside a node and {:g} GB/s across nodes per device\n",
      args.recipe, hw.devices, hw.devices_per_node, args.memory_gib, 100 * hw.usable_fraction, hw.peak_flops / 1e12,
      100 * hw.mfu, args.nvlink_gbps, args.network_gbps);
  fmt::print("model: {} parameters + {} MTP, {} active per token; step: {} sequences x {} tokens, micro-batch {}\n",
             human_count(static_cast<double>(counts.total)), human_count(static_cast<double>(counts.mtp)),
             human_count(static_cast<double>(counts.active)), recipe.train.global_batch, recipe.train.seq_len,
             recipe.train.micro_batch);

  const std::vector<LayoutPlan> plans = plan_layouts(recipe, hw);
  const auto fitting = std::count_if(plans.begin(), plans.end(), [](const auto& p) { return p.fits; });
  const auto refused = std::count_if(plans.begin(), plans.end(), [](const auto& p) { return !p.refused.empty(); });
  fmt::print("{} layouts: {} fit, {} do not fit, {} cannot run\n\n", plans.size(), fitting,
             static_cast<int64_t>(plans.size()) - fitting - refused, refused);
  print_table(plans, args.top);

  if (recipe.parallel.pp * recipe.parallel.dp * recipe.parallel.tp == hw.devices) {
    const LayoutPlan own = plan_layout(recipe, hw);
    fmt::print("\nthe recipe's layout, {}: ", layout_name(own.parallel));
    if (!own.refused.empty()) {
      fmt::print("cannot run: {}\n", own.refused);
    } else {
      fmt::print("{:.2f} GiB on pipeline rank {}{}, step ~{:.3f} s, {} tokens/s, MFU {:.1f}%\n",
                 own.memory.total() / kGiB, own.busiest_rank, own.fits ? "" : " (does not fit)", own.time.total(),
                 human_count(own.tokens_per_s), 100 * own.mfu);
    }
  }
  if (fitting > 0) fmt::print("\nbest: {}\n", set_flags(plans.front().parallel));
  if (refused > 0) {
    fmt::print("\nlayouts that cannot run{}:\n", args.show_refused ? "" : ", by reason (--show-refused lists them)");
    print_refusals(plans, args.show_refused);
  }
  if (fitting == 0) {
    suggest_less_memory(recipe, hw);
    throw UserError(fmt::format("no layout of {} on {} devices fits in {} GiB per device", args.recipe, hw.devices,
                                args.memory_gib));
  }
}

void add_plan(CLI::App& app) {
  auto args = std::make_shared<PlanArgs>();
  CLI::App* cmd = app.add_subcommand(
      "plan",
      "Rank the parallel layouts (pp x dp x tp, ep, schedule) of a recipe on N devices: memory per device (weights, "
      "gradients, optimizer state, activations), communication per step, pipeline bubble and an estimated step "
      "time; nothing runs. Exits 2 when no layout fits");
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML)")->required();
  cmd->add_option("--set", args->overrides, "Override a recipe key, e.g. --set train.micro_batch=2 (repeatable)");
  cmd->add_option("--gpus", args->gpus, "Devices to plan for (default: the recipe's pp x dp x tp)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--gpus-per-node", args->gpus_per_node, "Devices per node (tensor parallelism stays inside one)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--memory-gib", args->memory_gib, "Memory per device in GiB (H100 80GB: 79.6)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--peak-tflops", args->peak_tflops,
                  "Dense peak TFLOP/s per device (default: logging.peak_flops, else 989 for an H100 in bf16)")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--mfu", args->mfu, "Share of the peak the compute reaches")
      ->check(CLI::Range(0.01, 1.0))
      ->capture_default_str();
  cmd->add_option("--fp8-speedup", args->fp8_speedup,
                  "FP8 GEMMs' dense peak over bf16's (precision.gemm: fp8_blockwise; H100: 2)")
      ->check(CLI::Range(1.0, 8.0))
      ->capture_default_str();
  cmd->add_option("--nvlink-gbps", args->nvlink_gbps, "GB/s per device inside a node, one direction")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--network-gbps", args->network_gbps, "GB/s per device across nodes")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--top", args->top, "Rows of the table")->check(CLI::PositiveNumber)->capture_default_str();
  cmd->add_flag("--show-refused", args->show_refused, "List every layout that cannot run, with its reason");
  cmd->add_flag("--json", args->json,
                "Print the assumptions and every layout (memory, communication, time; refused ones with their "
                "reason) as JSON, ranked as the table is; exit code 2 when none fits");
  cmd->add_option("--measured", args->measured_run,
                  "Instead of planning, compare the estimated memory of rank 0 of the recipe's own layout with the "
                  "peak a run measured (RUN_DIR/metrics.jsonl, last step); exit code 1 when further apart than "
                  "--tolerance");
  cmd->add_option("--tolerance", args->tolerance, "Relative difference --measured accepts")
      ->check(CLI::Range(0.0, 10.0))
      ->capture_default_str();
  cmd->callback([args] { run_plan(*args); });
}

Register reg("plan", 14, add_plan);

}  // namespace
}  // namespace dsx::cli
