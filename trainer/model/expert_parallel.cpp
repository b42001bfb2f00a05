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
