// The communicators the NCCL tests share (made once in nccl_main.cpp, collective over the job):
// the MPI world, the reference, and the NCCL world bootstrapped over it.
#pragma once
#include "parallel/comm.h"
#include "parallel/comm_nccl.h"

namespace dsx::test {

struct NcclTestEnv {
  Communicator* mpi = nullptr;
  NcclCommunicator* nccl = nullptr;
};
NcclTestEnv& nccl_env();

// Communication timeout of the test communicators: a rank that diverges (a failed check that
// skips a collective) ends the job within a minute instead of hanging until ctest's timeout.
inline constexpr double kTestCommTimeoutS = 60;

}  // namespace dsx::test
