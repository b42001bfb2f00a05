#include "parallel/launch_env.h"

#include <charconv>
#include <cstdlib>
#include <optional>
#include <string_view>

#include "kernels/error.h"

namespace dsx {
namespace {

struct Names {
  const char* launcher;
  const char* rank;
  const char* local_rank;
  const char* world_size;
  const char* local_size;
};
constexpr Names kOpenMpi{"openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE",
                         "OMPI_COMM_WORLD_LOCAL_SIZE"};
constexpr Names kSlurm{"slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE"};

std::optional<int> read_int(const GetEnv& getenv, const char* name, int min_value) {
  const char* text = getenv(name);
  if (text == nullptr) return std::nullopt;
  const std::string_view s(text);
  int value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || s.empty() || value < min_value) {
    throw UserError("launcher variable " + std::string(name) + "='" + std::string(s) +
                    "' is not an integer >= " + std::to_string(min_value));
  }
  return value;
}

std::optional<LaunchEnv> read_with(const GetEnv& getenv, const Names& names) {
  const auto rank = read_int(getenv, names.rank, 0);
  if (!rank) return std::nullopt;
  LaunchEnv env;
  env.launcher = names.launcher;
  env.rank = *rank;
  env.world_size = read_int(getenv, names.world_size, 1).value_or(1);
  env.local_rank = read_int(getenv, names.local_rank, 0).value_or(0);
  // SLURM_NTASKS_PER_NODE is absent unless --ntasks-per-node was given; local size then
  // stays unknown and is reported as at least local_rank + 1.
  env.local_size = read_int(getenv, names.local_size, 1).value_or(env.local_rank + 1);
  if (env.rank >= env.world_size) {
    throw UserError(std::string("launcher variables disagree: ") + names.rank + "=" + std::to_string(env.rank) +
                    " but " + names.world_size + "=" + std::to_string(env.world_size));
  }
  if (env.local_rank >= env.local_size) {
    throw UserError(std::string("launcher variables disagree: ") + names.local_rank + "=" +
                    std::to_string(env.local_rank) + " but " + names.local_size + "=" + std::to_string(env.local_size));
  }
  return env;
}

}  // namespace

LaunchEnv read_launch_env(const GetEnv& getenv) {
  if (auto env = read_with(getenv, kOpenMpi)) return *env;
  if (auto env = read_with(getenv, kSlurm)) return *env;
  return LaunchEnv{};
}

LaunchEnv read_launch_env() {
  return read_launch_env([](const char* name) -> const char* { return std::getenv(name); });
}

int select_device(const LaunchEnv& env, int device_count) {
  if (device_count <= 0) {
    throw UserError("rank " + std::to_string(env.rank) + " found no devices to select from");
  }
  return env.local_rank % device_count;
}

std::string describe_launch(const LaunchEnv& env) {
  return "rank " + std::to_string(env.rank) + "/" + std::to_string(env.world_size) + " (local " +
         std::to_string(env.local_rank) + "/" + std::to_string(env.local_size) + ", " + env.launcher + ")";
}

}  // namespace dsx
