// `dsx launch`: the commands that start a recipe's ranks, built as plain data (argument vectors
// and script text) so that the command can print them, and the tests can read them, before
// anything runs. Running them (exec, writing the script) is cmd_launch.cpp's business.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "trainer/recipe/recipe.h"

namespace dsx::cli::launch {

// How the recipe's ranks spread over the machines: world = nodes x ranks_per_node.
struct Layout {
  int64_t world = 1;  // parallel.pp x parallel.dp x parallel.tp
  int64_t nodes = 1;
  int64_t ranks_per_node = 1;
};

// The recipe's world size laid out on `nodes` nodes; `ranks_per_node` 0 = world / nodes. Throws
// dsx::UserError naming the parallel.* keys and the flags when the two do not agree.
Layout resolve_layout(const Recipe& recipe, int64_t nodes, int64_t ranks_per_node);

// "3 ranks" / "1 rank".
std::string count_of(int64_t n, std::string_view noun);
// "4 ranks (2 nodes x 2 ranks per node)" for messages and the script's header.
std::string describe_layout(const Layout& layout);

// What every rank runs: DSX SUBCOMMAND RECIPE [--set key=value]... [--stop-after N].
struct RankCommand {
  std::string dsx;         // absolute path of the dsx binary
  std::string subcommand;  // train | grpo
  std::string recipe;      // absolute path
  std::vector<std::string> overrides;
  int64_t stop_after = 0;  // 0 = not passed
};
std::vector<std::string> rank_argv(const RankCommand& command);

// An environment variable the ranks get: the user's own value (`inherited`) or dsx's default.
struct RankEnv {
  std::string name;
  std::string value;
  bool inherited = false;
};
// CPU ranks run one OpenMP / OpenBLAS thread each (the ranks already fill the cores); a value
// the user has set wins. GPU ranks get nothing extra.
using GetEnv = std::function<const char*(const char*)>;
std::vector<RankEnv> rank_environment(Device device, const GetEnv& getenv);

struct MpirunJob {
  Layout layout;
  Device device = Device::cpu;
  std::string hostfile;  // "" = mpirun's default hosts
  std::vector<RankEnv> env;
  std::vector<std::string> extra_args;  // --mpirun-arg, before the rank command
  std::vector<std::string> rank;        // rank_argv(...)
};
std::vector<std::string> mpirun_argv(const MpirunJob& job);

struct SlurmJob {
  Layout layout;
  Device device = Device::cpu;
  std::string job_name;
  std::string partition;  // "" = not written (the cluster's default)
  std::string account;
  std::string time_limit;
  std::string output;       // Slurm's --output pattern, absolute
  std::string working_dir;  // absolute; relative paths in the recipe resolve from here
  std::vector<RankEnv> env;
  std::vector<std::string> rank;
};
// The sbatch script: #SBATCH directives, then `srun` of the rank command.
std::string sbatch_script(const SlurmJob& job);

// `text` as one word for a POSIX shell: unchanged when it holds only characters no shell treats
// specially, otherwise in single quotes (an embedded ' written as '\'').
std::string shell_quote(std::string_view text);
// The words quoted and joined with spaces: a command line to copy into a shell.
std::string shell_join(const std::vector<std::string>& words);

}  // namespace dsx::cli::launch
