// Data-parallel gradient synchronisation: DistributedAdamW's step (bucketed reduction, norm, clip,
// AdamW, and with ZeRO-1 the all-gather of the updated shard) against a bare blocking
// MPI_Allreduce of the same gradient bytes, in the same run. Run under mpirun:
//
//   mpirun -np 4 --oversubscribe --bind-to none build/release/bench/bench_grad_sync --mparams 16
//
// Measured per repetition, as the slowest rank's time, medians reported:
//   bare       one MPI_Allreduce over the whole gradient (the transfer alone)
//   step       DistributedAdamW::step with nothing reported before it (no overlap), ZeRO off / on
//   overlapped a simulated backward (fixed CPU work per tensor, grad_ready after each) then step;
//              the blocked time it reports (take_exposed_comm_s) is the communication not hidden
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_mpi.h"
#include "kernels/ops/elementwise.h"
#include "parallel/comm_mpi.h"
#include "trainer/optim/distributed_optimizer.h"

using namespace dsx;
using dsx::bench::median;
using dsx::bench::now_s;
using dsx::bench::timed;

namespace {

struct Options {
  double mparams = 16;  // millions of parameters
  int tensors = 64;
  double bucket_mb = 8;
  int64_t work = 200000;  // simulated backward: elements scaled per tensor, 8 passes
  int reps = 10;
  int warmup = 2;
};

double slowest(double mine) {
  double out = 0;
  MPI_Allreduce(&mine, &out, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return out;
}

void fill_store(ParameterStore& store, const Options& opt) {
  const int64_t per_tensor = static_cast<int64_t>(opt.mparams * 1e6) / opt.tensors;
  for (int i = 0; i < opt.tensors; ++i) {
    ParamSpec s;
    s.name = "model.layers." + std::to_string(i) + ".mlp.weight";
    s.shape = {per_tensor};
    s.init_std = 0.02;
    store.add(s);
  }
  store.initialize(1);
}

void fill_gradients(ParameterStore& store, int rank) {
  for (Parameter& p : store) p.grad.fill(1e-4 * (rank + 1));
}

struct Result {
  double step_s = 0, exposed_s = 0;
};

// Median step time and blocked time over the repetitions; with overlap, `work` runs per tensor
// before its grad_ready.
Result measure(DistributedAdamW& optimizer, ParameterStore& store, const Options& opt, int rank, bool overlap,
               Tensor& scratch) {
  std::vector<Parameter*> backward;
  for (Parameter& p : store) backward.push_back(&p);
  std::reverse(backward.begin(), backward.end());
  std::vector<double> steps, exposed;
  for (int i = 0; i < opt.warmup + opt.reps; ++i) {
    fill_gradients(store, rank);
    optimizer.take_exposed_comm_s();
    const double t = timed([&] {
      if (overlap) {
        for (Parameter* p : backward) {
          for (int k = 0; k < 8; ++k) ops::scale_(scratch, 1.0000001);
          optimizer.grad_ready(*p);
        }
      }
      optimizer.step(1e-4);
    });
    const double blocked = slowest(optimizer.take_exposed_comm_s());
    if (i >= opt.warmup) {
      steps.push_back(t);
      exposed.push_back(blocked);
    }
  }
  return {median(steps), median(exposed)};
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi;
  Options opt;
  CLI::App app{"gradient sync: DistributedAdamW step (bucketed reduction, ZeRO-1) vs bare MPI_Allreduce (mpirun)"};
  app.add_option("--mparams", opt.mparams, "millions of fp32 parameters per rank")->check(CLI::PositiveNumber);
  app.add_option("--tensors", opt.tensors, "parameter tensors (equal sizes)")->check(CLI::PositiveNumber);
  app.add_option("--bucket-mb", opt.bucket_mb, "gradient bucket size, MB")->check(CLI::PositiveNumber);
  app.add_option("--work", opt.work, "simulated backward: elements scaled 8x per tensor")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--reps", opt.reps, "timed repetitions of each kind")->check(CLI::PositiveNumber);
  app.add_option("--warmup", opt.warmup, "untimed repetitions first")->check(CLI::NonNegativeNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return mpi.world_rank() == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
  }
  const int rank = mpi.world_rank(), n = mpi.world_size();
  auto world = make_mpi_world_communicator(600.0);
  OptimSection config;
  config.grad_clip = 1.0;
  const int64_t bucket_bytes = static_cast<int64_t>(opt.bucket_mb * (1 << 20));
  Tensor scratch = Tensor::full({std::max<int64_t>(opt.work, 1)}, 1.0, DType::f32);

  ParameterStore bare_store(DType::f32);
  fill_store(bare_store, opt);
  Tensor flat = Tensor::zeros({bare_store.numel()}, DType::f32);
  std::vector<double> bare;
  for (int i = 0; i < opt.warmup + opt.reps; ++i) {
    flat.fill(1e-4 * (rank + 1));
    const double t = timed([&] {
      MPI_Allreduce(MPI_IN_PLACE, flat.raw(), static_cast<int>(flat.numel()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
    });
    if (i >= opt.warmup) bare.push_back(t);
  }
  const double t_bare = median(bare);

  auto run = [&](bool zero1, bool overlap) {
    ParameterStore store(DType::f32);
    fill_store(store, opt);
    DistributedAdamW optimizer(store, config, *world, *world, *world, {.zero1 = zero1, .bucket_bytes = bucket_bytes});
    return measure(optimizer, store, opt, rank, overlap, scratch);
  };
  const Result plain = run(false, false), zero = run(true, false), hidden = run(true, true);
  std::vector<double> work_times;
  for (int i = 0; i < opt.reps; ++i) {
    work_times.push_back(timed([&] {
      for (int t = 0; t < opt.tensors; ++t) {
        for (int k = 0; k < 8; ++k) ops::scale_(scratch, 1.0000001);
      }
    }));
  }
  const double t_work = median(work_times);

  if (rank == 0) {
    const double mb = static_cast<double>(flat.nbytes()) / 1e6;
    std::printf("ranks %d, %.1f M fp32 parameters in %d tensors (%.1f MB of gradient), buckets of %.1f MB, %d reps\n",
                n, opt.mparams, opt.tensors, mb, opt.bucket_mb, opt.reps);
    std::printf("bare MPI_Allreduce, whole gradient       median %9.3f ms\n", t_bare * 1e3);
    std::printf("step, ZeRO off, no overlap               median %9.3f ms  blocked on comm %9.3f ms\n",
                plain.step_s * 1e3, plain.exposed_s * 1e3);
    std::printf("step, ZeRO-1,  no overlap                median %9.3f ms  blocked on comm %9.3f ms\n",
                zero.step_s * 1e3, zero.exposed_s * 1e3);
    std::printf("backward work alone                      median %9.3f ms\n", t_work * 1e3);
    std::printf("backward work + step, ZeRO-1, overlapped median %9.3f ms  blocked on comm %9.3f ms\n",
                hidden.step_s * 1e3, hidden.exposed_s * 1e3);
    std::printf("ratio bare allreduce / ZeRO-off blocked time: %.3f; ZeRO-1 blocked time overlapped / not: %.3f\n",
                plain.exposed_s > 0 ? t_bare / plain.exposed_s : 0.0,
                zero.exposed_s > 0 ? hidden.exposed_s / zero.exposed_s : 0.0);
  }
  return 0;
}
