// gpu_sleep: one thread polls the global nanosecond timer (%globaltimer) until the time has
// passed, napping between polls (__nanosleep, sm_70+) so it costs nothing but its stream slot.
#include <cstdint>

#include "kernels/cuda/runtime.h"
#include "sleep_kernel.h"

namespace dsx::test {
namespace {

__device__ uint64_t global_ns() {
  uint64_t t = 0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void sleep_kernel(uint64_t ns) {
  const uint64_t start = global_ns();
  while (global_ns() - start < ns) __nanosleep(10000);
}

}  // namespace

void gpu_sleep(cudaStream_t stream, double ms) {
  sleep_kernel<<<1, 1, 0, stream>>>(static_cast<uint64_t>(ms * 1e6));
  DSX_CUDA_CHECK_LAUNCH("sleep_kernel");
}

}  // namespace dsx::test
