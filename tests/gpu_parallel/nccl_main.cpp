// Main of the NCCL communicator tests (ctest gpu.nccl_*, label gpu), run under mpirun. Prints
// why and exits 77 ("Skipped") where no CUDA device is present, or fewer than one per rank on
// this node (NCCL drives one GPU per rank). Every rank runs the same Catch cases in the same
// order, so collectives match across ranks; the cases use CHECK, not REQUIRE, around them.
//
// `--fault-timeout` instead runs the timeout scenario: a barrier stuck behind a long kernel on
// the communication stream must end the job after the 3 s timeout with a message naming the
// operation and the rank (checked by ctest's PASS_REGULAR_EXPRESSION).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include "kernels/cuda/runtime.h"
#include "nccl_env.h"
#include "parallel/comm_mpi.h"
#include "parallel/launch_env.h"
#include "sleep_kernel.h"

namespace dsx::test {
NcclTestEnv& nccl_env() {
  static NcclTestEnv env;
  return env;
}
}  // namespace dsx::test

namespace {

int run_timeout_fault() {
  {  // The first NCCL communicator of a process loads and probes a lot: not under the 3 s timeout.
    auto mpi_warm = dsx::make_mpi_world_communicator(dsx::test::kTestCommTimeoutS);
    auto warm = dsx::make_nccl_communicator(*mpi_warm);
    warm->barrier().wait();
  }
  auto mpi_world = dsx::make_mpi_world_communicator(3.0);
  auto nccl = dsx::make_nccl_communicator(*mpi_world);
  // 12 s: long past the 3 s timeout, short enough that ncclCommAbort, which may wait for the
  // queued NCCL work behind it, returns soon after.
  dsx::test::gpu_sleep(nccl->stream(), 12000);
  nccl->barrier().wait();
  std::printf("FAIL: the barrier returned instead of timing out\n");
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  dsx::MpiSession mpi;
  const dsx::LaunchEnv launch = dsx::read_launch_env();
  std::string why;
  const int devices = dsx::cuda::device_count(&why);
  if (devices == 0) {
    std::printf("SKIPPED: no CUDA device (%s); the NCCL tests run on a machine with one\n", why.c_str());
    return 77;
  }
  if (devices < launch.local_size) {
    std::printf("SKIPPED: %d ranks on this node need as many GPUs (NCCL drives one per rank), %d visible\n",
                launch.local_size, devices);
    return 77;
  }
  const int device = dsx::cuda::select_device(launch.local_rank);
  std::printf("NCCL tests: world rank %d of %d on %s\n", mpi.world_rank(), mpi.world_size(),
              dsx::cuda::device_description(device).c_str());
  if (argc > 1 && std::string(argv[1]) == "--fault-timeout") return run_timeout_fault();

  int rc = 0;
  {
    auto mpi_world = dsx::make_mpi_world_communicator(dsx::test::kTestCommTimeoutS);
    auto nccl_world = dsx::make_nccl_communicator(*mpi_world);
    dsx::test::nccl_env() = {mpi_world.get(), nccl_world.get()};
    rc = Catch::Session().run(argc, argv);
    dsx::test::nccl_env() = {};
  }  // communicators go before MPI
  return rc;
}
