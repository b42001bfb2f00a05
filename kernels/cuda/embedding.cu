// Embedding lookup and its weight gradient for device tensors (kernels/ops/embedding.h).
//
// dtypes: as the CPU op: table/out/dout/dtable f32|f64, ids i32|i64.
// Out-of-range ids: rows::first_bad_index checks every id BEFORE any kernel writes (one small
// kernel and an 8-byte device-to-host copy, which synchronises), so a bad id throws the CPU's
// message with the output untouched, and the main kernels only ever see ids in [0, V).
//
// Thread mapping:
//  - forward: one thread per output element (grid-stride over N·D); consecutive threads copy
//    consecutive columns of one row, so both the table row read and the write are coalesced.
//  - backward: deterministic without atomics. The ids are sorted with their token positions
//    (CUB's radix sort is stable, so tokens of one id stay in token order); block (k, y) owns
//    the run of equal ids starting at sorted position k (blocks not at a run's start exit) and
//    columns y·256 + threadIdx.x (+ gridDim.y·256 ...). Each dtable element is written by exactly
//    one thread, which adds its tokens' gradients in token order: bit for bit the CPU's sums.
#include <cub/device/device_radix_sort.cuh>

#include <algorithm>
#include <bit>
#include <climits>
#include <string>
#include <type_traits>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

template <class T, class Index>
__global__ void embedding_forward_kernel(const Index* ids, const T* table, T* out, int64_t n, int64_t d) {
  DSX_GRID_STRIDE_LOOP(e, n * d) {
    const int64_t row = e / d, col = e - row * d;
    out[e] = table[static_cast<int64_t>(ids[row]) * d + col];
  }
}

__global__ void iota_kernel(int32_t* out, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) out[i] = static_cast<int32_t>(i);
}

// See the header comment: block (k, y) accumulates the run of sorted ids starting at k.
template <class T, class Key>
__global__ void embedding_backward_kernel(const Key* sorted_ids, const int32_t* sorted_tokens, const T* dout, T* dtable,
                                          int64_t n, int64_t d) {
  const int64_t k = blockIdx.x;
  const Key id = sorted_ids[k];
  if (k > 0 && sorted_ids[k - 1] == id) return;  // the block of the run's first entry does the run
  T* row = dtable + static_cast<int64_t>(id) * d;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.x;
  for (int64_t col = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x; col < d; col += step) {
    T acc = row[col];
    for (int64_t r = k; r < n && sorted_ids[r] == id; ++r) {
      acc += dout[static_cast<int64_t>(sorted_tokens[r]) * d + col];
    }
    row[col] = acc;
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

constexpr int kBackwardThreads = 256;

// The CPU's check_ids_in_range: the first offending id, named with its position.
void check_ids_in_range(const Tensor& ids, int64_t vocab, std::string_view op) {
  const auto bad = rows::first_bad_index(ids, vocab, std::nullopt, op);
  check(!bad, op, [&] {
    return "id " + std::to_string(bad->value) + " at position " + std::to_string(bad->position) +
           " is outside the table [0, " + std::to_string(vocab) + ")";
  });
}

// Tensor of at least `bytes` bytes of device scratch (i64 elements keep it 8-byte aligned).
Tensor device_scratch(size_t bytes) {
  return Tensor::empty({static_cast<int64_t>((bytes + 7) / 8 + 1)}, DType::i64, Device::cuda);
}

// Sorts the ids (as unsigned words: all are in [0, V) by now, so the order is the same) with
// their token positions, then launches the accumulation.
template <class T, class Index>
void embedding_backward_sorted(const Tensor& ids, const Tensor& dout, Tensor& dtable, int64_t n, int64_t d,
                               int64_t vocab) {
  using Key = std::make_unsigned_t<Index>;
  const cudaStream_t stream = current_stream();
  Tensor tokens = Tensor::empty({n}, DType::i32, Device::cuda);
  Tensor sorted_tokens = Tensor::empty({n}, DType::i32, Device::cuda);
  Tensor sorted_ids = Tensor::empty({n}, ids.dtype(), Device::cuda);
  iota_kernel<<<grid_for(n), kBlock, 0, stream>>>(tokens.data<int32_t>(), n);
  DSX_CUDA_CHECK_LAUNCH("iota_kernel");

  const auto* keys_in = reinterpret_cast<const Key*>(ids.data<Index>());
  auto* keys_out = reinterpret_cast<Key*>(sorted_ids.data<Index>());
  const int items = static_cast<int>(n);
  // Only the bits that ids below V can use: ceil(log2 V) radix passes instead of 32 or 64.
  const int end_bit = std::max(1, static_cast<int>(std::bit_width(static_cast<uint64_t>(vocab - 1))));
  size_t scratch_bytes = 0;
  DSX_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, scratch_bytes, keys_in, keys_out, tokens.data<int32_t>(),
                                                 sorted_tokens.data<int32_t>(), items, 0, end_bit, stream));
  Tensor scratch = device_scratch(scratch_bytes);
  DSX_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(scratch.raw(), scratch_bytes, keys_in, keys_out,
                                                 tokens.data<int32_t>(), sorted_tokens.data<int32_t>(), items, 0,
                                                 end_bit, stream));

  const int64_t column_blocks = std::min<int64_t>((d + kBackwardThreads - 1) / kBackwardThreads, 65535);
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(column_blocks));
  embedding_backward_kernel<T, Key><<<grid, kBackwardThreads, 0, stream>>>(keys_out, sorted_tokens.data<int32_t>(),
                                                                           dout.data<T>(), dtable.data<T>(), n, d);
  DSX_CUDA_CHECK_LAUNCH("embedding_backward_kernel");
}

}  // namespace

void embedding_forward(const Tensor& ids, const Tensor& table, Tensor& out) {
  constexpr std::string_view op = "embedding_forward";
  const auto dims = ops::checks::embedding(op, Device::cuda, ids, table, "table", out, "out");
  const int64_t n = dims.n, vocab = dims.vocab, d = dims.d;
  dispatch_float(table.dtype(), op, [&]<class T>() {
    check_ids_in_range(ids, vocab, op);
    if (n * d == 0) return;
    dispatch_index(ids.dtype(), op, [&]<class Index>() {
      embedding_forward_kernel<T, Index>
          <<<grid_for(n * d), kBlock, 0, current_stream()>>>(ids.data<Index>(), table.data<T>(), out.data<T>(), n, d);
      DSX_CUDA_CHECK_LAUNCH("embedding_forward_kernel");
    });
  });
}

void embedding_backward_weight(const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  constexpr std::string_view op = "embedding_backward_weight";
  const auto dims = ops::checks::embedding(op, Device::cuda, ids, dtable, "dtable", dout, "dout");
  const int64_t n = dims.n, vocab = dims.vocab, d = dims.d;
  dispatch_float(dtable.dtype(), op, [&]<class T>() {
    check_ids_in_range(ids, vocab, op);
    if (n * d == 0) return;
    check(n <= INT_MAX, op, [&] { return "at most 2^31 - 1 ids per call on the GPU, got " + std::to_string(n); });
    dispatch_index(ids.dtype(), op,
                   [&]<class Index>() { embedding_backward_sorted<T, Index>(ids, dout, dtable, n, d, vocab); });
  });
}

}  // namespace dsx::cuda
