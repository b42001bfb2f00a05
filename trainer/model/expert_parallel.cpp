#include "trainer/model/expert_parallel.h"

#include <algorithm>
#include <chrono>

#include "kernels/error.h"

namespace dsx {

void timed_wait(CommHandle& h, CommTimer* timer) {
  if (h.done()) return;
  const auto t0 = std::chrono::steady_clock::now();
  h.wait();
  if (timer) timer->exposed_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void all_reduce_over_tp(const ModelParallel& parallel, Tensor& t) {
  if (parallel.tp_size() == 1) return;
  CommHandle h = parallel.tp->all_reduce(t);
  timed_wait(h, parallel.timer);
}

namespace {
bool sequence_parallel(const ModelParallel& parallel) {
  return parallel.sequence_parallel && parallel.tp_size() > 1;
}

// An empty tensor like t with `rows` rows.
Tensor with_rows(const Tensor& t, int64_t rows) {
  Shape shape = t.shape();
  shape[0] = rows;
  return Tensor::empty(shape, t.dtype(), t.device());
}
}  // namespace

Tensor sum_over_tp(const ModelParallel& parallel, Tensor partial) {
  if (!sequence_parallel(parallel)) {
    all_reduce_over_tp(parallel, partial);
    return partial;
  }
  Tensor out = with_rows(partial, partial.dim(0) / parallel.tp_size());
  CommHandle h = parallel.tp->reduce_scatter(partial, out);
  timed_wait(h, parallel.timer);
  return out;
}

Tensor gather_tokens(const ModelParallel& parallel, const Tensor& t) {
  if (!sequence_parallel(parallel)) return t;
  Tensor out = with_rows(t, t.dim(0) * parallel.tp_size());
  CommHandle h = parallel.tp->all_gather(t, out);
  timed_wait(h, parallel.timer);
  return out;
}

Tensor own_tokens(const ModelParallel& parallel, const Tensor& t) {
  if (!sequence_parallel(parallel)) return t;
  const RowRange r = tp_rows(t.dim(0), parallel.tp_size(), parallel.tp_rank());
  Tensor out = with_rows(t, r.end - r.begin);
  out.copy_from(t.slice(r.begin, r.end));
  return out;
}

RowRange tp_rows(int64_t n, int size, int rank) {
  const int64_t base = n / size, extra = n % size;
  const int64_t begin = rank * base + std::min<int64_t>(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

LocalExperts local_experts(int64_t n_routed_experts, int ep_size, int ep_rank) {
  if (ep_size < 1 || n_routed_experts % ep_size != 0) {
    throw UserError("parallel.ep: " + std::to_string(n_routed_experts) +
                    " routed experts cannot be split evenly over " + std::to_string(ep_size) +
                    " expert-parallel ranks");
  }
  const int64_t count = n_routed_experts / ep_size;
  return {count * ep_rank, count};
}

}  // namespace dsx
