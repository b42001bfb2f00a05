// Host-side helpers shared by the row-wise and elementwise CUDA ops (elementwise.cu,
// embedding.cu, swiglu.cu, rmsnorm.cu, rope.cu, cross_entropy.cu): the
// validation of index tensors (ids, positions, targets) and the block size of row kernels.
#pragma once
#include <cstdint>
#include <optional>
#include <string_view>

#include "kernels/tensor.h"

namespace dsx::cuda::rows {

// The first entry of a 1-D i32|i64 device tensor that is neither `ignore` (when given) nor
// in [0, bound), if any. An indices dtype other than i32|i64 throws op's "dtype ... is not
// supported", as the CPU ops' dispatch_index does.
//
// How the check works: one grid-stride kernel tests every entry and records the smallest
// offending position with atomicMin in a device word (the minimum, so the answer does not
// depend on scheduling); that word is copied back to the host, which synchronises with the
// current stream. Callers run it BEFORE their main kernel, so a bad index throws with nothing
// written, as the CPU ops do, and no kernel ever reads out of bounds. Cost: one tiny kernel
// and one 8-byte device-to-host copy per call (the copy drains the stream).
struct BadIndex {
  int64_t position;
  int64_t value;
};
std::optional<BadIndex> first_bad_index(const Tensor& indices, int64_t bound, std::optional<int64_t> ignore,
                                        std::string_view op);

// Threads of a block that owns one row of `cols` elements: about 4 elements per thread, a
// multiple of 32 (block_sum/block_max need whole warps), between 32 and 1024.
inline int threads_for_row(int64_t cols) {
  const int64_t wanted = ((cols + 3) / 4 + 31) / 32 * 32;
  return static_cast<int>(wanted < 32 ? 32 : (wanted > 1024 ? 1024 : wanted));
}

}  // namespace dsx::cuda::rows
