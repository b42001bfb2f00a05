// Main of the NCCL communicator tests (ctest gpu.nccl_*, label gpu), run under mpirun. Prints
// why and exits 77 ("Skipped") where no CUDA device is present, or fewer than one per rank on
// this node (NCCL drives one GPU per rank). Every rank runs the same Catch cases in the same
// order, so collectives match across ranks; the cases use CHECK, not REQUIRE, around them.
//
// `--fault-timeout` instead runs the timeout scenario: a barrier stuck behind a long kernel on
// the communication stream must end the job after the 3 s timeout with a message naming the
// operation and the rank (checked by ctest's PASS_REGULAR_EXPRESSION).
//
// DSX_NCCL_TEST_ONE_GPU=1 (ctest gpu.nccl_comm_np2_one_gpu): every rank of this node shares device
// 0. NCCL refuses two ranks of one communicator on one GPU of one host ("Duplicate GPU
// detected"), so each rank gets a host id of its own (NCCL_HOSTID, read when NCCL first
// initialises) and NCCL connects the ranks as separate hosts, over its socket transport. That is
// how the multi-rank sums, all-to-all and splits run on a machine with a single GPU.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
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
  const char* one_gpu_env = std::getenv("DSX_NCCL_TEST_ONE_GPU");
  const bool one_gpu = one_gpu_env != nullptr && std::string(one_gpu_env) == "1";
  if (one_gpu) {
    int mode = 0;
    DSX_CUDA_CHECK(cudaDeviceGetAttribute(&mode, cudaDevAttrComputeMode, 0));
    if (launch.local_size > 1 && mode != cudaComputeModeDefault) {
      std::printf("SKIPPED: device 0 is not in the default compute mode (%d): %d processes cannot share it\n", mode,
                  launch.local_size);
      return 77;
    }
    const std::string host_id = "dsx-nccl-test-rank-" + std::to_string(mpi.world_rank());
    setenv("NCCL_HOSTID", host_id.c_str(), 1);
  } else if (devices < launch.local_size) {
    std::printf("SKIPPED: %d ranks on this node need as many GPUs (NCCL drives one per rank), %d visible\n",
                launch.local_size, devices);
    return 77;
  }
  const int device = dsx::cuda::select_device(one_gpu ? 0 : launch.local_rank);
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
