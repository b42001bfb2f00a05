// dsx launch RECIPE [--launcher mpirun|slurm] [--nodes N] [--ranks-per-node R] [--dry-run] ...
//
// Starts a recipe's training on as many ranks as its parallel layout needs: builds the mpirun
// command (or writes an sbatch script whose srun starts the ranks), prints it, and execs
// mpirun / sbatch so that their exit status and signals are the launch's own. The commands are
// built in launch_plan.h; this file reads the flags, checks them against the recipe and runs.
#include <fmt/core.h>

#include <unistd.h>

#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>

#include "kernels/error.h"
#include "trainer/cli/launch_plan.h"
#include "trainer/cli/registry.h"
#include "trainer/recipe/recipe.h"
#include "trainer/train/train_parallel.h"

namespace dsx::cli {
namespace {

namespace fs = std::filesystem;

struct LaunchArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  std::string launcher = "mpirun";
  int64_t nodes = 1;
  int64_t ranks_per_node = 0;  // 0 = world / nodes
  std::string hostfile;
  std::string command;  // "" = grpo for a recipe with a grpo section, else train
  int64_t stop_after = 0;
  bool dry_run = false;
  std::vector<std::string> mpirun_args;
  // Slurm
  std::string partition;
  std::string account;
  std::string time_limit;
  std::string job_name;
  std::string script;
};

// ---- checks ------------------------------------------------------------------------------

// Flags of the other launcher are refused rather than ignored: a user who passes --partition to
// an mpirun launch expects it to matter.
void check_launcher_flags(const LaunchArgs& args) {
  const auto refuse_if = [&](bool given, std::string_view flag, std::string_view launcher, std::string_view why = "") {
    if (given) throw UserError(fmt::format("{} applies to --launcher {} only{}", flag, launcher, why));
  };
  if (args.launcher == "slurm") {
    refuse_if(!args.hostfile.empty(), "--hostfile", "mpirun", " (under Slurm the allocation names the nodes)");
    refuse_if(!args.mpirun_args.empty(), "--mpirun-arg", "mpirun");
  } else {
    refuse_if(!args.partition.empty(), "--partition", "slurm");
    refuse_if(!args.account.empty(), "--account", "slurm");
    refuse_if(!args.time_limit.empty(), "--time", "slurm");
    refuse_if(!args.job_name.empty(), "--job-name", "slurm");
    refuse_if(!args.script.empty(), "--script", "slurm");
  }
}

// #SBATCH lines hold one word each.
void check_one_word(std::string_view flag, const std::string& value) {
  for (unsigned char c : value) {
    if (std::isspace(c)) throw UserError(fmt::format("{} must be one word without spaces, got '{}'", flag, value));
  }
}

std::string choose_subcommand(const LaunchArgs& args, const Recipe& recipe) {
  const std::string subcommand = !args.command.empty() ? args.command : recipe.grpo.enabled() ? "grpo" : "train";
  if (subcommand == "grpo" && !recipe.grpo.enabled()) {
    throw UserError("--command grpo: the recipe has no grpo section; set grpo.task or grpo.prompts");
  }
  if (subcommand == "grpo" && args.stop_after > 0) {
    throw UserError("--stop-after applies to --command train only (dsx grpo has no --stop-after)");
  }
  return subcommand;
}

// ---- the system ----------------------------------------------------------------------------

// The binary that is running now, so the ranks run the same build whatever PATH says.
std::string dsx_binary() {
  return fs::read_symlink("/proc/self/exe").string();
}

std::optional<fs::path> find_on_path(const std::string& program) {
  const char* path_variable = std::getenv("PATH");
  std::string_view rest = path_variable != nullptr ? path_variable : "";
  while (true) {
    const size_t colon = rest.find(':');
    const std::string_view entry = rest.substr(0, colon);
    const fs::path candidate = fs::path(entry.empty() ? "." : std::string(entry)) / program;
    std::error_code ec;
    if (fs::is_regular_file(candidate, ec) && access(candidate.c_str(), X_OK) == 0) return candidate;
    if (colon == std::string_view::npos) return std::nullopt;
    rest.remove_prefix(colon + 1);
  }
}

// Replaces this process with argv (argv[0] looked up on PATH): mpirun's or sbatch's exit status
// and signals then reach whoever started dsx launch unchanged.
[[noreturn]] void exec_program(const std::vector<std::string>& argv, std::string_view missing_hint) {
  const std::optional<fs::path> program = find_on_path(argv[0]);
  if (!program) throw UserError(fmt::format("{} is not on PATH; {}", argv[0], missing_hint));
  std::vector<char*> c_argv;
  for (const std::string& word : argv) c_argv.push_back(const_cast<char*>(word.c_str()));
  c_argv.push_back(nullptr);
  std::fflush(nullptr);  // what was printed must come out before the process is replaced
  execv(program->c_str(), c_argv.data());
  throw UserError(fmt::format("cannot run {}: {}", program->string(), std::strerror(errno)));
}

// A reader (or sbatch) never sees half a script: write a temporary file, then rename it.
void write_file_atomically(const fs::path& path, const std::string& text) {
  fs::create_directories(path.parent_path());
  const fs::path temporary = path.string() + fmt::format(".tmp.{}", getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    out << text;
    out.close();
    if (!out) throw UserError(fmt::format("cannot write {}", temporary.string()));
  }
  fs::permissions(temporary, fs::perms::owner_exec | fs::perms::group_exec, fs::perm_options::add);
  fs::rename(temporary, path);
}

void print_plan(const launch::Layout& layout, std::string_view subcommand, std::string_view launcher) {
  fmt::print("dsx launch: {} of dsx {}, with {}\n", launch::describe_layout(layout), subcommand, launcher);
}

// ---- the two launchers -------------------------------------------------------------------

void launch_mpirun(const LaunchArgs& args, const Recipe& recipe, const launch::Layout& layout,
                   std::vector<std::string> rank) {
  launch::MpirunJob job;
  job.layout = layout;
  job.device = recipe.model.device;
  if (!args.hostfile.empty()) {
    if (!fs::is_regular_file(args.hostfile)) throw UserError(fmt::format("--hostfile {}: no such file", args.hostfile));
    job.hostfile = fs::absolute(args.hostfile).string();
  }
  job.env = launch::rank_environment(job.device, [](const char* name) { return std::getenv(name); });
  job.extra_args = args.mpirun_args;
  job.rank = std::move(rank);
  const std::vector<std::string> argv = launch::mpirun_argv(job);
  fmt::print("{}\n", launch::shell_join(argv));
  if (args.dry_run) {
    fmt::print("dsx launch: dry run, nothing started\n");
    return;
  }
  exec_program(argv, "install OpenMPI (or load its module), or use --launcher slurm");
}

void launch_slurm(const LaunchArgs& args, const Recipe& recipe, const launch::Layout& layout,
                  std::vector<std::string> rank) {
  check_one_word("--job-name", args.job_name);
  check_one_word("--partition", args.partition);
  check_one_word("--account", args.account);
  check_one_word("--time", args.time_limit);
  // The run directory holds the script and Slurm's log beside the run's own output; Slurm
  // does not create the --output directory, so it must exist before the job starts.
  const fs::path run_dir = fs::absolute(recipe.logging.run_dir);
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) throw UserError(fmt::format("logging.run_dir: cannot create {}: {}", run_dir.string(), ec.message()));
  launch::SlurmJob job;
  job.layout = layout;
  job.device = recipe.model.device;
  job.job_name = !args.job_name.empty() ? args.job_name : "dsx-" + fs::path(args.recipe).stem().string();
  job.partition = args.partition;
  job.account = args.account;
  job.time_limit = args.time_limit;
  job.output = (run_dir / "slurm-%j.out").string();
  job.working_dir = fs::current_path().string();
  job.env = launch::rank_environment(job.device, [](const char* name) { return std::getenv(name); });
  job.rank = std::move(rank);
  const fs::path script = fs::absolute(!args.script.empty() ? fs::path(args.script) : run_dir / "launch.sbatch");
  const std::string text = launch::sbatch_script(job);
  try {
    write_file_atomically(script, text);
  } catch (const fs::filesystem_error& e) {
    throw UserError(fmt::format("cannot write the sbatch script {}: {}", script.string(), e.code().message()));
  }
  const std::vector<std::string> argv{"sbatch", script.string()};
  fmt::print("dsx launch: wrote {}\n", script.string());
  if (args.dry_run) {
    fmt::print("{}{}\ndsx launch: dry run, nothing submitted\n", text, launch::shell_join(argv));
    return;
  }
  fmt::print("{}\n", launch::shell_join(argv));
  exec_program(argv, "the script is written: submit it from a Slurm login node, or use --launcher mpirun");
}

void run_launch(const LaunchArgs& args) {
  check_launcher_flags(args);
  const Recipe recipe = load_recipe(args.recipe, args.overrides);  // a bad recipe fails before anything starts
  check_layout_is_built(recipe);                                   // so does a layout the ranks would refuse
  const launch::Layout layout = launch::resolve_layout(recipe, args.nodes, args.ranks_per_node);
  const std::string subcommand = choose_subcommand(args, recipe);
  std::vector<std::string> rank = launch::rank_argv(
      {dsx_binary(), subcommand, fs::absolute(args.recipe).string(), args.overrides, args.stop_after});
  print_plan(layout, subcommand, args.launcher);
  if (args.launcher == "slurm") {
    launch_slurm(args, recipe, layout, std::move(rank));
  } else {
    launch_mpirun(args, recipe, layout, std::move(rank));
  }
}

void add_launch(CLI::App& app) {
  auto args = std::make_shared<LaunchArgs>();
  CLI::App* cmd = app.add_subcommand(
      "launch",
      "Start a recipe's training on parallel.pp x parallel.dp x parallel.tp ranks: runs mpirun (default) or "
      "writes an sbatch script and submits it (--launcher slurm). Prints the command first; --dry-run prints "
      "it and starts nothing");
  cmd->add_option("recipe", args->recipe, "Recipe file (YAML); validated before anything starts")->required();
  cmd->add_option("--set", args->overrides,
                  "Override a recipe key, e.g. --set parallel.dp=4 (repeatable; passed on to every rank)")
      ->allow_extra_args(false);
  cmd->add_option("--launcher", args->launcher, "How the ranks start: mpirun, or slurm (sbatch + srun)")
      ->check(CLI::IsMember({"mpirun", "slurm"}))
      ->capture_default_str();
  cmd->add_option("--nodes", args->nodes, "Machines to spread the ranks over")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--ranks-per-node", args->ranks_per_node,
                  "Ranks on each machine (with model.device cuda: the GPUs per node); default: the world size / "
                  "--nodes. --nodes x --ranks-per-node must equal parallel.pp x parallel.dp x parallel.tp")
      ->check(CLI::PositiveNumber);
  cmd->add_option("--command", args->command,
                  "What the ranks run: train, or grpo; default: grpo for a recipe with a grpo section, else train")
      ->check(CLI::IsMember({"train", "grpo"}));
  cmd->add_option("--stop-after", args->stop_after,
                  "Passed to dsx train: stop after this many steps, with a checkpoint (resume later)")
      ->check(CLI::NonNegativeNumber);
  cmd->add_flag("--dry-run", args->dry_run,
                "Print what would run (slurm: the script, which is still written) and start nothing");
  cmd->add_option("--hostfile", args->hostfile, "mpirun: the machines to run on (OpenMPI hostfile)");
  cmd->add_option("--mpirun-arg", args->mpirun_args,
                  "mpirun: one extra argument before the dsx command, written with '=', e.g. "
                  "--mpirun-arg=--oversubscribe (repeatable)")
      ->allow_extra_args(false);
  cmd->add_option("--partition", args->partition, "slurm: the partition (#SBATCH --partition)");
  cmd->add_option("--account", args->account, "slurm: the account to charge (#SBATCH --account)");
  cmd->add_option("--time", args->time_limit, "slurm: the time limit, e.g. 24:00:00 (#SBATCH --time)");
  cmd->add_option("--job-name", args->job_name, "slurm: the job's name; default dsx-<recipe file stem>");
  cmd->add_option("--script", args->script,
                  "slurm: where to write the sbatch script; default <logging.run_dir>/launch.sbatch");
  cmd->callback([args] { run_launch(*args); });
}

Register reg("launch", 11, add_launch);

}  // namespace
}  // namespace dsx::cli
