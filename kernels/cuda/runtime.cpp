#include "kernels/cuda/runtime.h"

#include <array>
#include <cstdio>
#include <limits>
#include <memory>
#include <mutex>

namespace dsx::cuda {

void throw_cuda_error(cudaError_t status, const char* call, const char* file, int line) {
  // A failed call is also the thread's last error; clear it, or the next launch check
  // (cudaGetLastError) would report it against a good launch after the caller handled this one.
  cudaGetLastError();
  throw CudaError(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                  cudaGetErrorString(status) + " (" + cudaGetErrorName(status) + ")");
}

int device_count(std::string* why_not) {
  int count = 0;
  const cudaError_t status = cudaGetDeviceCount(&count);
  if (status != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error so later queries start clean
    if (why_not) *why_not = std::string("cudaGetDeviceCount: ") + cudaGetErrorString(status);
    return 0;
  }
  if (count == 0 && why_not) *why_not = "cudaGetDeviceCount reports 0 devices";
  return count;
}

bool device_available(std::string* why_not) {
  return device_count(why_not) > 0;
}

int select_device(int local_rank) {
  std::string why;
  const int count = device_count(&why);
  if (count == 0) throw CudaError("select_device: no CUDA device (" + why + ")");
  const int device = local_rank % count;
  DSX_CUDA_CHECK(cudaSetDevice(device));
  return device;
}

int current_device() {
  int device = 0;
  DSX_CUDA_CHECK(cudaGetDevice(&device));
  return device;
}

std::string device_description(int device) {
  cudaDeviceProp prop{};
  DSX_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  char memory[32];
  std::snprintf(memory, sizeof memory, "%.1f GiB", static_cast<double>(prop.totalGlobalMem) / (1ull << 30));
  return std::string(prop.name) + " (sm_" + std::to_string(prop.major) + std::to_string(prop.minor) + ", " +
         std::to_string(prop.multiProcessorCount) + " SMs, " + memory + ")";
}

// ---- streams and events -----------------------------------------------------------------
Stream::Stream() {
  DSX_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
}
Stream::~Stream() {
  if (stream_) cudaStreamDestroy(stream_);  // no throw from a destructor; errors surface elsewhere
}
void Stream::synchronize() const {
  DSX_CUDA_CHECK(cudaStreamSynchronize(stream_));
}

Event::Event(bool timing) {
  DSX_CUDA_CHECK(cudaEventCreateWithFlags(&event_, timing ? cudaEventDefault : cudaEventDisableTiming));
}
Event::~Event() {
  if (event_) cudaEventDestroy(event_);
}
void Event::record(cudaStream_t stream) {
  DSX_CUDA_CHECK(cudaEventRecord(event_, stream));
}
void Event::wait_on(cudaStream_t stream) const {
  DSX_CUDA_CHECK(cudaStreamWaitEvent(stream, event_, 0));
}
bool Event::query() const {
  const cudaError_t status = cudaEventQuery(event_);
  if (status == cudaErrorNotReady) {
    // Not an error, but the runtime may still record it as the thread's last error, which the
    // next DSX_CUDA_CHECK_LAUNCH (cudaGetLastError) would then report against a good launch.
    cudaGetLastError();
    return false;
  }
  DSX_CUDA_CHECK(status);
  return true;
}
void Event::synchronize() const {
  DSX_CUDA_CHECK(cudaEventSynchronize(event_));
}
float Event::elapsed_ms_since(const Event& start) const {
  float ms = 0;
  DSX_CUDA_CHECK(cudaEventElapsedTime(&ms, start.event_, event_));
  return ms;
}

namespace {
constexpr int kMaxDevices = 64;
thread_local cudaStream_t t_stream_override = nullptr;
thread_local bool t_has_override = false;

// One compute stream per device, created on first use and kept for the process.
cudaStream_t compute_stream(int device) {
  static std::array<std::unique_ptr<Stream>, kMaxDevices> streams;
  static std::mutex mutex;
  if (device < 0 || device >= kMaxDevices) throw CudaError("compute_stream: device index out of range");
  std::lock_guard lock(mutex);
  if (!streams[device]) streams[device] = std::make_unique<Stream>();
  return streams[device]->get();
}
}  // namespace

cudaStream_t current_stream() {
  if (t_has_override) return t_stream_override;
  return compute_stream(current_device());
}

StreamGuard::StreamGuard(cudaStream_t stream) : had_override_(t_has_override), previous_(t_stream_override) {
  t_stream_override = stream;
  t_has_override = true;
}
StreamGuard::~StreamGuard() {
  t_stream_override = previous_;
  t_has_override = had_override_;
}

void synchronize_current_stream() {
  DSX_CUDA_CHECK(cudaStreamSynchronize(current_stream()));
}

// ---- memory -------------------------------------------------------------------------------
namespace {
cudaMemPool_t device_pool(int device) {
  static std::array<bool, kMaxDevices> configured{};
  static std::mutex mutex;
  cudaMemPool_t pool = nullptr;
  DSX_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device));
  std::lock_guard lock(mutex);
  if (!configured[device]) {
    // Keep every freed block: without this the pool returns memory to the device at each
    // synchronisation and the next step pays for cudaMalloc-like mapping again.
    uint64_t threshold = std::numeric_limits<uint64_t>::max();
    DSX_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &threshold));
    configured[device] = true;
  }
  return pool;
}

class DeviceAllocator final : public Allocator {
 public:
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    const int device = current_device();
    cudaMemPool_t pool = device_pool(device);
    void* p = nullptr;
    const cudaError_t status = cudaMallocFromPoolAsync(&p, bytes, pool, current_stream());
    if (status != cudaSuccess) {
      cudaGetLastError();
      const MemoryStats s = memory_stats();
      throw CudaError("device allocation of " + std::to_string(bytes) + " bytes on device " + std::to_string(device) +
                      " failed (" + cudaGetErrorString(status) + "); pool reserved " +
                      std::to_string(s.reserved_bytes) + " bytes, used " + std::to_string(s.used_bytes));
    }
    return p;
  }
  void deallocate(void* p, size_t) override {
    if (!p) return;
    // Called from Storage's destructor, which must not throw: a tensor that outlives the CUDA
    // runtime (destroyed after its exit handler) has nothing left to free.
    try {
      cudaFreeAsync(p, current_stream());
    } catch (const CudaError&) {
    }
  }
  Device device() const override { return Device::cuda; }
};

uint64_t pool_attribute(cudaMemPool_t pool, cudaMemPoolAttr attr) {
  uint64_t value = 0;
  DSX_CUDA_CHECK(cudaMemPoolGetAttribute(pool, attr, &value));
  return value;
}
}  // namespace

Allocator& device_allocator() {
  static DeviceAllocator alloc;
  return alloc;
}

MemoryStats memory_stats() {
  cudaMemPool_t pool = device_pool(current_device());
  MemoryStats s;
  s.used_bytes = pool_attribute(pool, cudaMemPoolAttrUsedMemCurrent);
  s.peak_used_bytes = pool_attribute(pool, cudaMemPoolAttrUsedMemHigh);
  s.reserved_bytes = pool_attribute(pool, cudaMemPoolAttrReservedMemCurrent);
  s.peak_reserved_bytes = pool_attribute(pool, cudaMemPoolAttrReservedMemHigh);
  return s;
}

void reset_peak_memory() {
  cudaMemPool_t pool = device_pool(current_device());
  uint64_t zero = 0;  // the only value these attributes accept: resets the high-water marks
  DSX_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &zero));
  DSX_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReservedMemHigh, &zero));
}

void copy_bytes(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) {
  if (bytes == 0) return;
  const cudaStream_t stream = current_stream();
  DSX_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream));
  // The host may read a device-to-host result at once; host-to-device copies from pageable
  // memory are staged by the driver before cudaMemcpyAsync returns, so they need no wait.
  if (dst_device == Device::cpu && src_device == Device::cuda) DSX_CUDA_CHECK(cudaStreamSynchronize(stream));
}

void zero_bytes(void* dst, size_t bytes) {
  if (bytes == 0) return;
  DSX_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, current_stream()));
}

}  // namespace dsx::cuda
