// Device selection and memory statistics for host code that must not care whether this build
// has CUDA (the trainer, the CLI): Device::cpu answers trivially, Device::cuda goes to the
// CUDA runtime (kernels/cuda/runtime.h) or, in a build without it, throws UserError.
#pragma once
#include <cstdint>
#include <string>

#include "kernels/dtype.h"

namespace dsx {

// Makes `device` ready for this process: for cuda, picks GPU local_rank % (GPUs visible) and
// makes it current. Returns a description ("cpu", "cuda:0 NVIDIA H100 ... (sm_90, ...)").
// Throws UserError naming the reason when there is no usable GPU or no CUDA in this build.
std::string use_device(Device device, int local_rank);

struct DeviceMemoryStats {
  int64_t peak_used_bytes = 0;  // most tensor bytes live at once since the last reset
  int64_t reserved_bytes = 0;   // held by the allocator (cuda: CUDA's pool; cpu: malloc's heap)
};
DeviceMemoryStats device_memory_stats(Device device);
void reset_device_peak_memory(Device device);
// Waits for the device's queued work (no-op on the CPU): for timings.
void synchronize_device(Device device);

}  // namespace dsx
