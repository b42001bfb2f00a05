// Where this process sits in the job, as the launcher says (before MPI is initialised): for
// choosing a GPU (local rank) and naming log files. OpenMPI's mpirun sets OMPI_COMM_WORLD_*;
// Slurm's srun sets SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS. When mpirun runs inside a
// Slurm allocation both are present and OpenMPI's describe the MPI job, so they win.
#pragma once
#include <functional>
#include <string>

namespace dsx {

struct LaunchEnv {
  std::string launcher = "none";  // "openmpi", "slurm" or "none" (a single process)
  int rank = 0;
  int local_rank = 0;
  int world_size = 1;
  int local_size = 1;
};

// Reads the variables through `getenv` (std::getenv by default; tests pass a map). A variable
// that is set but is not a number in range throws dsx::UserError naming it.
using GetEnv = std::function<const char*(const char*)>;
LaunchEnv read_launch_env(const GetEnv& getenv);
LaunchEnv read_launch_env();

// The device this rank drives: local rank modulo the devices on its node.
int select_device(const LaunchEnv& env, int device_count);

// "rank 3/8 (local 1/4, openmpi)" for log lines.
std::string describe_launch(const LaunchEnv& env);

}  // namespace dsx
