// The per-device error record of kernels/cuda/device_checks.h and the host-side device checks.
#include <array>
#include <atomic>
#include <stdexcept>
#include <string>

#include "kernels/cuda/device_checks.h"
#include "kernels/cuda/runtime.h"

namespace dsx::cuda {
namespace {

// One record per device: a module global exists once in every device's context.
__device__ DeviceErrorRecord g_device_error;

constexpr int kMaxDevices = 64;

std::string describe(const DeviceErrorRecord& r) {
  const auto s = [](int64_t v) { return std::to_string(v); };
  const std::string range = "out of range [0, " + s(r.detail) + ")";
  const std::string not_permutation =
      "plan.assignment is not a permutation of [0, T·K): row " + s(r.detail) + " holds " + s(r.value);
  switch (static_cast<DeviceErrorCode>(r.code)) {
    case DeviceErrorCode::expert_counts_id:
      return "expert_counts: expert id " + s(r.value) + " " + range;
    case DeviceErrorCode::router_backward_id:
      return "router_backward: expert id " + s(r.value) + " " + range;
    case DeviceErrorCode::balance_loss_backward_id:
      return "balance_loss_backward: expert id " + s(r.value) + " " + range;
    case DeviceErrorCode::moe_permute_plan:
      return "moe_permute: " + not_permutation;
    case DeviceErrorCode::moe_permute_backward_plan:
      return "moe_permute_backward: " + not_permutation;
    case DeviceErrorCode::moe_unpermute_plan:
      return "moe_unpermute: " + not_permutation;
    case DeviceErrorCode::moe_unpermute_backward_plan:
      return "moe_unpermute_backward: " + not_permutation;
    case DeviceErrorCode::none:
      break;
  }
  return "a CUDA kernel recorded unknown error code " + std::to_string(r.code);
}

}  // namespace

DeviceErrorRecord* device_error_record() {
  static std::array<std::atomic<DeviceErrorRecord*>, kMaxDevices> records{};
  const int device = current_device();
  if (device < 0 || device >= kMaxDevices) {
    throw CudaError("device_error_record: device index " + std::to_string(device) + " is not supported");
  }
  DeviceErrorRecord* record = records[device].load(std::memory_order_acquire);
  if (record == nullptr) {
    void* address = nullptr;
    DSX_CUDA_CHECK(cudaGetSymbolAddress(&address, g_device_error));
    record = static_cast<DeviceErrorRecord*>(address);
    records[device].store(record, std::memory_order_release);
  }
  return record;
}

void check_device_errors() {
  DeviceErrorRecord* record = device_error_record();
  DeviceErrorRecord host{};
  copy_bytes(&host, Device::cpu, record, Device::cuda, sizeof(host));  // waits for the stream
  if (host.code == 0) return;
  zero_bytes(record, sizeof(DeviceErrorRecord));
  throw std::invalid_argument(describe(host) + " (found on the GPU by an earlier call)");
}

}  // namespace dsx::cuda
