#include "trainer/cli/launch_plan.h"

#include <fmt/core.h>

#include <algorithm>
#include <cctype>

#include "kernels/error.h"

namespace dsx::cli::launch {

namespace {

std::string describe_world(const ParallelSection& p, int64_t world) {
  return fmt::format("parallel.pp ({}) x parallel.dp ({}) x parallel.tp ({}) = {}", p.pp, p.dp, p.tp,
                     count_of(world, "rank"));
}

// GPU users think in GPUs per node; say how that maps onto the flag.
std::string gpu_hint(Device device) {
  return device == Device::cuda ? "; with model.device cuda, --ranks-per-node is the GPUs per node (one rank per GPU)"
                                : "";
}

// A #SBATCH value with whitespace (a run directory with a space) in double quotes, which sbatch
// strips when it reads its directives.
std::string directive(std::string_view name, std::string_view value) {
  const bool has_space = std::any_of(value.begin(), value.end(), [](unsigned char c) { return std::isspace(c); });
  return has_space ? fmt::format("#SBATCH --{}=\"{}\"\n", name, value) : fmt::format("#SBATCH --{}={}\n", name, value);
}

}  // namespace

std::string count_of(int64_t n, std::string_view noun) {
  return fmt::format("{} {}{}", n, noun, n == 1 ? "" : "s");
}

std::string describe_layout(const Layout& layout) {
  return fmt::format("{} ({} x {} per node)", count_of(layout.world, "rank"), count_of(layout.nodes, "node"),
                     count_of(layout.ranks_per_node, "rank"));
}

Layout resolve_layout(const Recipe& recipe, int64_t nodes, int64_t ranks_per_node) {
  const ParallelSection& p = recipe.parallel;
  Layout layout{p.pp * p.dp * p.tp, nodes, ranks_per_node};
  if (nodes < 1) throw UserError(fmt::format("--nodes must be at least 1, got {}", nodes));
  if (ranks_per_node < 0) throw UserError(fmt::format("--ranks-per-node must be at least 1, got {}", ranks_per_node));
  if (ranks_per_node == 0) {  // not given: spread the world evenly
    if (layout.world % nodes != 0) {
      throw UserError(
          fmt::format("{} that do not divide evenly over --nodes {}; change --nodes or the parallel layout{}",
                      describe_world(p, layout.world), nodes, gpu_hint(recipe.model.device)));
    }
    layout.ranks_per_node = layout.world / nodes;
  } else if (nodes * ranks_per_node != layout.world) {
    throw UserError(fmt::format("{}, but --nodes {} x --ranks-per-node {} = {}; make them equal{}",
                                describe_world(p, layout.world), nodes, ranks_per_node, nodes * ranks_per_node,
                                gpu_hint(recipe.model.device)));
  }
  return layout;
}

std::vector<std::string> rank_argv(const RankCommand& command) {
  std::vector<std::string> argv{command.dsx, command.subcommand, command.recipe};
  for (const std::string& override_text : command.overrides) {
    argv.push_back("--set");
    argv.push_back(override_text);
  }
  if (command.stop_after > 0) {
    argv.push_back("--stop-after");
    argv.push_back(std::to_string(command.stop_after));
  }
  return argv;
}

std::vector<RankEnv> rank_environment(Device device, const GetEnv& getenv) {
  if (device != Device::cpu) return {};
  std::vector<RankEnv> env;
  for (const char* name : {"OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"}) {
    const char* user_value = getenv(name);
    if (user_value != nullptr && *user_value != '\0') {
      env.push_back({name, user_value, true});
    } else {
      env.push_back({name, "1", false});
    }
  }
  return env;
}

std::vector<std::string> mpirun_argv(const MpirunJob& job) {
  std::vector<std::string> argv{"mpirun", "-np", std::to_string(job.layout.world)};
  if (job.layout.nodes > 1) {  // the same number of ranks on every node
    argv.push_back("--map-by");
    argv.push_back(fmt::format("ppr:{}:node", job.layout.ranks_per_node));
  }
  if (!job.hostfile.empty()) {
    argv.push_back("--hostfile");
    argv.push_back(job.hostfile);
  }
  // CPU ranks run one BLAS thread each; mpirun's default binding would pin several of them to
  // one core (or a rank's OpenMP threads to one core) when the ranks do not fill the machine.
  if (job.device == Device::cpu) {
    argv.push_back("--bind-to");
    argv.push_back("none");
  }
  for (const RankEnv& variable : job.env) {
    argv.push_back("-x");  // mpirun passes these to the ranks on every node, not only the local ones
    argv.push_back(variable.inherited ? variable.name : variable.name + "=" + variable.value);
  }
  argv.insert(argv.end(), job.extra_args.begin(), job.extra_args.end());
  argv.insert(argv.end(), job.rank.begin(), job.rank.end());
  return argv;
}

std::string sbatch_script(const SlurmJob& job) {
  const Layout& l = job.layout;
  std::string script = "#!/bin/bash\n";
  script += fmt::format("# Written by `dsx launch`: {}. Submit with sbatch.\n", describe_layout(l));
  script += directive("job-name", job.job_name);
  script += directive("nodes", std::to_string(l.nodes));
  script += directive("ntasks-per-node", std::to_string(l.ranks_per_node));
  if (job.device == Device::cuda) script += directive("gpus-per-node", std::to_string(l.ranks_per_node));
  if (!job.partition.empty()) script += directive("partition", job.partition);
  if (!job.account.empty()) script += directive("account", job.account);
  if (!job.time_limit.empty()) script += directive("time", job.time_limit);
  script += directive("output", job.output);
  script += "\nset -euo pipefail\n";
  script += "# The recipe's relative paths (run directory, data) resolve from where dsx launch ran.\n";
  script += "cd " + shell_quote(job.working_dir) + "\n";
  for (const RankEnv& variable : job.env) {
    script += fmt::format("export {}={}\n", variable.name, shell_quote(variable.value));
  }
  script += "srun " + shell_join(job.rank) + "\n";
  return script;
}

std::string shell_quote(std::string_view text) {
  const auto plain = [](unsigned char c) {
    return std::isalnum(c) || std::string_view("_@%+=:,./-").find(c) != std::string_view::npos;
  };
  if (!text.empty() && std::all_of(text.begin(), text.end(), plain)) return std::string(text);
  std::string quoted = "'";
  for (char c : text) {
    if (c == '\'') {
      quoted += "'\\''";  // close the quotes, an escaped quote, reopen
    } else {
      quoted += c;
    }
  }
  quoted += "'";
  return quoted;
}

std::string shell_join(const std::vector<std::string>& words) {
  std::string line;
  for (const std::string& word : words) {
    if (!line.empty()) line += ' ';
    line += shell_quote(word);
  }
  return line;
}

}  // namespace dsx::cli::launch
