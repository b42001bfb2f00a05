// Input checks of the router, MoE and optimizer CUDA ops.
//
// Host side: check_on_gpu (the CUDA twin of check_cpu) for every tensor of a call.
//
// Device side: some inputs can only be validated by reading device data (expert ids in range,
// a MoE plan's assignment being a permutation). Ops that return nothing to the host must not
// synchronise for that, so their kernels stay memory-safe on bad values (an out-of-range index
// is skipped, never dereferenced) and record the first problem they meet in a per-device error
// record. The record is read, cleared and thrown as std::invalid_argument (with the op's name,
// as the CPU op would) by check_device_errors(), which the ops that synchronise anyway call
// after their own copy to the host (moe_plan, balance_loss_forward, sum_of_squares,
// global_norm, clip_grad_norm): an error is therefore reported at the latest at the next
// such op, i.e. within the same training step. Tests call check_device_errors() directly.
#pragma once
#include <cstdint>
#include <string_view>

#include "kernels/cuda/runtime.h"  // check_on_gpu
#include "kernels/tensor.h"

namespace dsx::cuda {

// What a kernel found wrong. The op that found it is part of the code, so the message can name it.
enum class DeviceErrorCode : uint32_t {
  none = 0,
  expert_counts_id,           // value = id, detail = n_experts
  router_backward_id,         // value = id, detail = n_experts
  balance_loss_backward_id,   // value = id, detail = n_experts
  moe_permute_plan,           // value = the assignment, detail = the permuted row holding it
  moe_permute_backward_plan,  //   (the four MoE ops: plan.assignment is not a permutation)
  moe_unpermute_plan,
  moe_unpermute_backward_plan,
};

struct DeviceErrorRecord {
  uint32_t code;  // DeviceErrorCode; 0 while no error was recorded
  uint32_t padding;
  int64_t value;
  int64_t detail;
};

// The current device's record (device memory, a module global; zero at start).
DeviceErrorRecord* device_error_record();
// Waits for the current stream, and throws std::invalid_argument describing the first recorded
// error (clearing it) if a kernel recorded one.
void check_device_errors();

}  // namespace dsx::cuda

#ifdef __CUDACC__
namespace dsx::cuda {
// Records an error unless one is already pending (the first one wins; its fields are written by
// the thread that claimed the record, and read on the host only after a stream synchronisation).
__device__ __forceinline__ void report_device_error(DeviceErrorRecord* record, DeviceErrorCode code, int64_t value,
                                                    int64_t detail) {
  if (atomicCAS(&record->code, 0u, static_cast<uint32_t>(code)) == 0u) {
    record->value = value;
    record->detail = detail;
  }
}
}  // namespace dsx::cuda
#endif
