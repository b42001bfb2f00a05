// A stand-in for compute in the NCCL tests: keeps a stream busy for a given GPU wall-clock time
// with one thread, leaving the SMs free for the transfers that should overlap it.
#pragma once
#include <cuda_runtime_api.h>

namespace dsx::test {

// Enqueues a single-thread kernel on `stream` that returns after `ms` milliseconds.
void gpu_sleep(cudaStream_t stream, double ms);

}  // namespace dsx::test
