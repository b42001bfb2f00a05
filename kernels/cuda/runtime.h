// The CUDA device runtime of dsx: device selection, error checks, streams, events and the
// device allocator. Plain C++ (no kernels): host code includes it to move tensors.
//
// Streams: every host thread has a *current stream* on which ops enqueue their kernels
// (default: one non-blocking compute stream per device, created on first use). Communication
// runs on its own stream and is ordered against compute with Events, never with device-wide
// synchronisation.
//
// Memory: device tensors come from CUDA's stream-ordered pool allocator (cudaMallocAsync on
// the device's default pool) with the release threshold raised to "never": freed blocks stay
// reserved and are reused by later allocations of the step, so after the first step the loop
// makes no cudaMalloc and no synchronising free. A block freed on stream S is reusable by S at
// once and by other streams only after an event orders them (the pool's default policies).
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels/tensor.h"

namespace dsx::cuda {

// A failed CUDA call: the message names the call, its file and line, and CUDA's error string.
class CudaError : public std::runtime_error {
 public:
  explicit CudaError(const std::string& what) : std::runtime_error(what) {}
};

[[noreturn]] void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line);
inline void check_status(cudaError_t status, const char* call, const char* file, int line) {
  if (status != cudaSuccess) throw_cuda_error(status, call, file, line);
}
// DSX_CUDA_CHECK(cudaMemcpyAsync(...)) throws CudaError("cudaMemcpyAsync(...) failed at
// kernels/cuda/x.cu:12: invalid argument").
#define DSX_CUDA_CHECK(call) ::dsx::cuda::check_status((call), #call, __FILE__, __LINE__)
// After a kernel launch: a bad launch configuration shows up here, naming the kernel.
#define DSX_CUDA_CHECK_LAUNCH(kernel_name) \
  ::dsx::cuda::check_status(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)

// Every tensor of a CUDA op must live on the GPU (kernels/tensor.h: check_device).
inline void check_on_gpu(const Tensor& t, std::string_view op, std::string_view name) {
  check_device(t, Device::cuda, op, name);
}

// Number of usable devices; 0 (with the reason in *why_not when given) where the driver
// reports none or is missing — what GPU tests print when they skip.
int device_count(std::string* why_not = nullptr);
bool device_available(std::string* why_not = nullptr);
// Picks device local_rank % device_count() for this process (one GPU per local rank) and
// makes it current on the calling thread. Returns the device index.
int select_device(int local_rank);
int current_device();
std::string device_description(int device);  // "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)"

// An owned CUDA stream (non-blocking with respect to the legacy default stream).
class Stream {
 public:
  Stream();
  ~Stream();
  Stream(const Stream&) = delete;
  Stream& operator=(const Stream&) = delete;
  cudaStream_t get() const { return stream_; }
  void synchronize() const;

 private:
  cudaStream_t stream_ = nullptr;
};

// An owned CUDA event; timing is off unless asked for (timing events cost a little).
class Event {
 public:
  explicit Event(bool timing = false);
  ~Event();
  Event(const Event&) = delete;
  Event& operator=(const Event&) = delete;
  cudaEvent_t get() const { return event_; }
  void record(cudaStream_t stream);
  // Work enqueued on `stream` after this call waits for the recorded work.
  void wait_on(cudaStream_t stream) const;
  bool query() const;  // true when the recorded work has finished
  void synchronize() const;
  // Milliseconds between two recorded timing events.
  float elapsed_ms_since(const Event& start) const;

 private:
  cudaEvent_t event_ = nullptr;
};

// The stream ops enqueue on, per thread (default: the device's compute stream).
cudaStream_t current_stream();
// Makes `stream` current for the calling thread for the guard's lifetime.
class StreamGuard {
 public:
  explicit StreamGuard(cudaStream_t stream);
  ~StreamGuard();
  StreamGuard(const StreamGuard&) = delete;
  StreamGuard& operator=(const StreamGuard&) = delete;

 private:
  bool had_override_;
  cudaStream_t previous_;
};
// Waits for everything enqueued on the current stream.
void synchronize_current_stream();

// Device memory of the caching pool (see the header comment). Allocation failures throw
// std::bad_alloc-like CudaError naming the size and the pool's reserved/used bytes.
Allocator& device_allocator();

struct MemoryStats {
  uint64_t used_bytes = 0;       // held by live tensors
  uint64_t peak_used_bytes = 0;  // since the last reset_peak_memory()
  uint64_t reserved_bytes = 0;   // taken from the device by the pool (used + cached)
  uint64_t peak_reserved_bytes = 0;
};
MemoryStats memory_stats();
void reset_peak_memory();

// Byte copies between any two devices, ordered on the current stream. A copy whose destination
// is host memory waits for its completion before returning (the host may read it at once).
void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes);
void zero_bytes(void* dst, size_t bytes);  // device memory, on the current stream

// Device-side element conversion and fill (kernels/cuda/tensor_kernels.cu): the same rounding
// as the host codecs (kernels/codecs.h), which they share.
void convert_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n);
void fill_elements(void* dst, DType dtype, double value, int64_t n);

}  // namespace dsx::cuda
