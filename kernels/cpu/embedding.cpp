#include "kernels/ops/embedding.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::ops {
namespace {

// Below this many copied elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// Every id is validated before anything is written, so a bad id leaves the output untouched
// and the error can name the first offending position (OpenMP regions cannot throw).
template <class Index>
void check_ids_in_range(const Index* ids, int64_t n, int64_t vocab, std::string_view op) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(ids[i]);
    check(id >= 0 && id < vocab, op, [&] {
      return "id " + std::to_string(id) + " at position " + std::to_string(i) + " is outside the table [0, " +
             std::to_string(vocab) + ")";
    });
  }
}

}  // namespace

void embedding_forward(const Tensor& ids, const Tensor& table, Tensor& out) {
  DSX_ROUTE_TO_CUDA(table, embedding_forward(ids, table, out));
  constexpr std::string_view op = "embedding_forward";
  const auto dims = checks::embedding(op, Device::cpu, ids, table, "table", out, "out");
  const int64_t n = dims.n, vocab = dims.vocab, d = dims.d;
  dispatch_float(table.dtype(), op, [&]<class T>() {
    dispatch_index(ids.dtype(), op, [&]<class Index>() {
      const Index* id = ids.data<Index>();
      check_ids_in_range(id, n, vocab, op);
      const T* src = table.data<T>();
      T* dst = out.data<T>();
      const size_t row_bytes = static_cast<size_t>(d) * sizeof(T);
#pragma omp parallel for schedule(static) if (n * d > kParallelElements)
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(dst + i * d, src + static_cast<int64_t>(id[i]) * d, row_bytes);
      }
    });
  });
}

void embedding_backward_weight(const Tensor& ids, const Tensor& dout, Tensor& dtable) {
  DSX_ROUTE_TO_CUDA(dtable, embedding_backward_weight(ids, dout, dtable));
  constexpr std::string_view op = "embedding_backward_weight";
  const auto dims = checks::embedding(op, Device::cpu, ids, dtable, "dtable", dout, "dout");
  const int64_t n = dims.n, vocab = dims.vocab, d = dims.d;
  dispatch_float(dtable.dtype(), op, [&]<class T>() {
    dispatch_index(ids.dtype(), op, [&]<class Index>() {
      const Index* id = ids.data<Index>();
      check_ids_in_range(id, n, vocab, op);
      const T* g = dout.data<T>();
      T* acc = dtable.data<T>();
      // Repeated ids make rows collide, so threads split the columns instead of the tokens:
      // no two threads touch one element, and every element sums its tokens in token order,
      // which keeps the result independent of the thread count.
      constexpr int64_t kBlock = 64;
      const int64_t blocks = (d + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n * d > kParallelElements)
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t begin = b * kBlock, end = std::min(d, begin + kBlock);
        for (int64_t i = 0; i < n; ++i) {
          T* row = acc + static_cast<int64_t>(id[i]) * d;
          const T* grad = g + i * d;
#pragma omp simd
          for (int64_t j = begin; j < end; ++j) row[j] += grad[j];
        }
      }
    });
  });
}

}  // namespace dsx::ops
