// Helpers of the row-wise CUDA ops (see rows_common.h): device checks and index validation.
// Index validation: one thread per index (grid-stride), i32|i64 indices.
#include <climits>
#include <string>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"

namespace dsx::cuda::rows {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

// first[0] = min position i with indices[i] neither ignore (when has_ignore) nor in [0, bound).
// first[0] starts at ULLONG_MAX ("none").
template <class Index>
__global__ void first_bad_index_kernel(const Index* indices, int64_t n, int64_t bound, bool has_ignore, int64_t ignore,
                                       unsigned long long* first) {
  DSX_GRID_STRIDE_LOOP(i, n) {
    const int64_t v = static_cast<int64_t>(indices[i]);
    const bool ok = (has_ignore && v == ignore) || (v >= 0 && v < bound);
    if (!ok) atomicMin(first, static_cast<unsigned long long>(i));
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// launchers

std::optional<BadIndex> first_bad_index(const Tensor& indices, int64_t bound, std::optional<int64_t> ignore,
                                        std::string_view op) {
  return dispatch_index(indices.dtype(), op, [&]<class Index>() -> std::optional<BadIndex> {
    const int64_t n = indices.numel();
    if (n == 0) return std::nullopt;
    // -1 as i64 is ULLONG_MAX as the kernel's unsigned word: "no bad index yet".
    Tensor first = Tensor::empty({1}, DType::i64, Device::cuda);
    first.fill(-1.0);
    first_bad_index_kernel<Index><<<grid_for(n), kBlock, 0, current_stream()>>>(
        indices.data<Index>(), n, bound, ignore.has_value(), ignore.value_or(0),
        reinterpret_cast<unsigned long long*>(first.data<int64_t>()));
    DSX_CUDA_CHECK_LAUNCH("first_bad_index_kernel");
    const int64_t position = first.to(Device::cpu).data<int64_t>()[0];
    if (position < 0) return std::nullopt;
    const Tensor value = indices.slice(position, position + 1).to(Device::cpu);
    return BadIndex{position, static_cast<int64_t>(value.data<Index>()[0])};
  });
}

}  // namespace dsx::cuda::rows
