// The ranks of a training run as the loop sees them: started from the launcher's variables
// (mpirun or srun), the recipe's layout checked against the world size before any work, the
// mesh's communicators, and the few collectives the loop itself needs (metrics, checkpoints).
//
// A run whose recipe asks for one rank and that was not launched as several processes has no
// TrainParallel at all (start_train_parallel returns null) and never initialises MPI.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>

#include "parallel/comm.h"
#include "parallel/comm_mpi.h"
#include "parallel/launch_env.h"
#include "parallel/mesh.h"
#include "trainer/model/expert_parallel.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

struct TrainParallel {
  std::unique_ptr<MpiSession> mpi;  // declared first: finalised after the communicators are gone
  LaunchEnv launch;
  Mesh mesh;
  MeshComms comms;         // MPI: host tensors (metrics, flags, router loads, checkpoints)
  MeshComms device_comms;  // NCCL, same groups, when the model is on the GPU; empty otherwise
  CommTimer timer;

  // The groups that move the model's tensors (gradients, token rows): NCCL for a GPU model.
  MeshComms& tensor_comms() { return device_comms.world ? device_comms : comms; }

  int world_rank() const { return mesh.rank; }
  int world_size() const { return mesh.sizes.world(); }
  // What the model's MoE layers use: the EP group (when ep > 1) and the DP group for the loads.
  // The wire formats of the MoE all-to-alls follow precision.dispatch / precision.combine; the
  // pipeline stage(s) of this rank follow parallel.pp, pp_schedule (V-shaped for dualpipev) and pp_split.
  ModelParallel model_parallel(const Recipe& recipe);

  // Element-wise sums over the data-parallel group (blocking).
  void sum_over_dp(std::span<double> values);
  // ... over the data-parallel group, then the pipeline stages: every stage's part of every
  // replica's value (blocking).
  void sum_over_dp_and_pp(std::span<double> values);
  void sum_over(Communicator& group, std::span<double> values);
  // Rank 0's value on every rank (blocking).
  int64_t broadcast_from_rank0(int64_t value);
  void barrier();
  // True on every rank when `flag` is true on any rank (blocking).
  bool any_rank(bool flag);
};

// checkpoint.resume: auto. Rank 0 picks the newest complete checkpoint under `root` (and removes
// stale temporary directories, which only one rank may do); every rank gets the same answer.
// parallel may be null (one process).
std::optional<std::filesystem::path> newest_checkpoint_on_every_rank(const std::filesystem::path& root,
                                                                     TrainParallel* parallel);

// Null for a single process (except model.device: cuda under mpirun/srun, see the .cpp); otherwise initialises MPI,
// checks the world size against the recipe's layout (dsx::UserError on every rank when they differ), builds the mesh
// and its communicators (plus NCCL ones for model.device: cuda — select the GPU first). Throws dsx::UserError for
// layouts this build cannot train yet (check_layout_is_built).
std::unique_ptr<TrainParallel> start_train_parallel(const Recipe& recipe);

// Throws dsx::UserError for a layout this build cannot train on the recipe's device yet (tp > 1
// on GPUs, a pipeline schedule not built, dualpipev from 3 ranks on GPUs); `dsx plan` asks too.
void check_layout_is_built(const Recipe& recipe);

}  // namespace dsx
