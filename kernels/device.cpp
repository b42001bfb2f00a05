#include "kernels/device.h"

#include <malloc.h>

#include "kernels/error.h"
#include "kernels/tensor.h"
#if DSX_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace dsx {

std::string use_device(Device device, int local_rank) {
  if (device == Device::cpu) return "cpu";
#if DSX_HAVE_CUDA
  std::string why;
  if (!cuda::device_available(&why)) throw UserError("device cuda: no usable GPU on this machine (" + why + ")");
  const int index = cuda::select_device(local_rank);
  return "cuda:" + std::to_string(index) + " " + cuda::device_description(index);
#else
  (void)local_rank;
  throw UserError("device cuda: this dsx was built without CUDA (configure with -DDSX_CUDA=ON on a machine with nvcc)");
#endif
}

DeviceMemoryStats device_memory_stats(Device device) {
  DeviceMemoryStats out;
  if (device == Device::cpu) {
    // malloc keeps freed buffers (kernels/tensor.cpp): what it holds from the system is the
    // host's "reserved" (heap arenas + separately mapped chunks; all of the process's mallocs).
    const struct mallinfo2 info = mallinfo2();
    out.peak_used_bytes = host_tensor_memory().peak_bytes;
    out.reserved_bytes = static_cast<int64_t>(info.arena + info.hblkhd);
    return out;
  }
#if DSX_HAVE_CUDA
  if (device == Device::cuda) {
    const cuda::MemoryStats s = cuda::memory_stats();
    out.peak_used_bytes = static_cast<int64_t>(s.peak_used_bytes);
    out.reserved_bytes = static_cast<int64_t>(s.reserved_bytes);
  }
#else
  (void)device;
#endif
  return out;
}

void reset_device_peak_memory(Device device) {
  if (device == Device::cpu) reset_host_tensor_peak();
#if DSX_HAVE_CUDA
  if (device == Device::cuda) cuda::reset_peak_memory();
#else
  (void)device;
#endif
}

void synchronize_device(Device device) {
#if DSX_HAVE_CUDA
  if (device == Device::cuda) cuda::synchronize_current_stream();
#else
  (void)device;
#endif
}

}  // namespace dsx
