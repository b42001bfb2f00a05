#include "trainer/train/train_parallel.h"

#include <algorithm>
#include <array>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/train/schedule.h"

#include <fmt/core.h>
#if DSX_HAVE_NCCL
#include "parallel/comm_nccl.h"
#endif

namespace dsx {

ModelParallel TrainParallel::model_parallel(const Recipe& recipe) {
  const ParallelSection& p = recipe.parallel;
  const PrecisionSection& precision = recipe.precision;
  ModelParallel mp;
  // Token rows travel where the model lives (NCCL for device: cuda); the router loads are
  // host counters and stay on MPI.
  const bool experts_split = p.ep * p.tp > 1;  // the EP group spans EP × TP ranks (parallel/mesh.h)
  if (experts_split) mp.ep = tensor_comms().ep.get();
  if (p.tp > 1) mp.tp = tensor_comms().tp.get();
  mp.sequence_parallel = p.sequence_parallel && p.tp > 1;
  if (p.dp > 1) mp.dp = comms.dp.get();
  mp.overlap_a2a = p.overlap_a2a && experts_split;
  mp.dispatch = precision.dispatch == DispatchPrecision::fp8    ? WireFormat::fp8_e4m3
                : precision.dispatch == DispatchPrecision::bf16 ? WireFormat::bf16
                                                                : WireFormat::f32;
  mp.combine = precision.combine == CombinePrecision::bf16 ? WireFormat::bf16 : WireFormat::f32;
  mp.timer = &timer;
  mp.pp_size = mesh.sizes.pp;
  mp.pp_rank = mesh.coords.pp;
  const PipelineLayout layout = pipeline_layout(recipe);
  mp.pp_v_shape = layout.v_shape;
  mp.pp_interleave = layout.interleave;
  mp.pp_layers = pipeline_split(recipe);
  return mp;
}

void TrainParallel::sum_over_dp(std::span<double> values) {
  sum_over(*comms.dp, values);
}

void TrainParallel::sum_over_dp_and_pp(std::span<double> values) {
  sum_over(*comms.dp, values);
  if (mesh.sizes.pp > 1) sum_over(*comms.pp, values);
}

void TrainParallel::sum_over(Communicator& group, std::span<double> values) {
  Tensor t = Tensor::from<double>(std::span<const double>(values.data(), values.size()),
                                  {static_cast<int64_t>(values.size())});
  CommHandle h = group.all_reduce(t);
  timed_wait(h, &timer);
  const double* sums = t.data<double>();
  std::copy(sums, sums + values.size(), values.begin());
}

int64_t TrainParallel::broadcast_from_rank0(int64_t value) {
  Tensor t = Tensor::from<int64_t>(std::span<const int64_t>(&value, 1), {1});
  comms.world->broadcast(t, 0).wait();
  return t.data<int64_t>()[0];
}

std::optional<std::filesystem::path> newest_checkpoint_on_every_rank(const std::filesystem::path& root,
                                                                     TrainParallel* parallel) {
  std::optional<std::filesystem::path> dir;
  if (!parallel || parallel->world_rank() == 0) dir = ckpt::latest(root, {.remove_stale = true});
  if (!parallel) return dir;
  const int64_t step = parallel->broadcast_from_rank0(dir ? ckpt::read_manifest(*dir).step : -1);
  if (step < 0) return std::nullopt;
  return root / ckpt::step_dir_name(step);
}

bool TrainParallel::any_rank(bool flag) {
  Tensor t = Tensor::from<int64_t>(std::span<const int64_t>(std::array<int64_t, 1>{flag ? 1 : 0}), {1});
  comms.world->all_reduce(t).wait();
  return t.data<int64_t>()[0] > 0;
}

void TrainParallel::barrier() {
  comms.world->barrier().wait();
}

void check_layout_is_built(const Recipe& recipe) {
  if (recipe.parallel.tp > 1 && recipe.model.device == Device::cuda) {
    throw UserError(
        "parallel.tp: tensor parallelism has run on CPU ranks (MPI) only so far; on GPUs train with pipeline, data "
        "and expert parallelism (parallel.pp, parallel.dp, parallel.ep) and tp = 1, or use device: cpu");
  }
  if (recipe.parallel.pp == 1) return;
  stage_schedule(recipe, 2 * recipe.parallel.pp, 0);  // refuses a schedule that is not built, before any work
  // Several chunks per rank talk to both neighbours (or round the ring) in an order the NCCL
  // communicator's single in-order stream may not keep: a receive waiting for one neighbour holds
  // back the sends to the other. The step is run on the clock under that rule (as schedule.h's
  // checker does for every schedule in the tests) and refused where it would stop.
  if (recipe.model.device != Device::cuda || pipeline_layout(recipe).chunks() == 1) return;
  const int64_t n = recipe.train.accumulation_steps(recipe.train.global_batch, recipe.parallel.dp);
  const std::string stuck = run_recipe_step(recipe, n, ActionCosts{}).run.stuck;
  if (!stuck.empty()) {
    throw UserError(fmt::format(
        "parallel.pp_schedule: {} with parallel.pp = {} cannot run on GPUs (NCCL, one in-order stream per rank): {} "
        "(use 1f1b or zero_bubble, another parallel.pp, or device: cpu, whose MPI transfers complete independently)",
        enum_name(recipe.parallel.pp_schedule), recipe.parallel.pp, stuck));
  }
}

std::unique_ptr<TrainParallel> start_train_parallel(const Recipe& recipe) {
  const ParallelSection& p = recipe.parallel;
  const MeshSizes sizes{.pp = static_cast<int>(p.pp),
                        .dp = static_cast<int>(p.dp),
                        .tp = static_cast<int>(p.tp),
                        .ep = static_cast<int>(p.ep)};
  const LaunchEnv launch = read_launch_env();
  // One process is the plain loop, except a GPU run started by a launcher: that one takes the
  // multi-rank path (MPI + NCCL communicators, distributed optimizer) even with one rank, so the
  // code that runs on many GPUs is exercised on a single one.
  const bool launched_gpu = recipe.model.device == Device::cuda && launch.launcher != "none";
  if (sizes.world() == 1 && launch.world_size == 1 && !launched_gpu) return nullptr;
  if (launch.launcher == "none") {  // started alone: say how to launch before touching MPI
    throw UserError("parallel: the recipe's layout " + describe_mesh(sizes) +
                    " needs that many processes, but this one was started alone; launch it with mpirun -np " +
                    std::to_string(sizes.world()) + " (or srun -n " + std::to_string(sizes.world()) + ")");
  }
  check_layout_is_built(recipe);
  auto tp = std::make_unique<TrainParallel>();
  tp->launch = launch;
  tp->mpi = std::make_unique<MpiSession>();
  check_world_size(sizes, recipe.model.n_routed_experts);
  tp->mesh = build_mesh(sizes, tp->mpi->world_rank());
  tp->comms = make_mpi_mesh_comms(tp->mesh, p.comm_timeout_s);
  if (recipe.model.device == Device::cuda) {  // the caller has selected this rank's GPU
#if DSX_HAVE_NCCL
    tp->device_comms = make_nccl_mesh_comms(tp->mesh, *tp->comms.world);
#else
    throw UserError("model.device: cuda with several ranks needs NCCL, which this build of dsx lacks");
#endif
  }
  return tp;
}

}  // namespace dsx
