#include "trainer/model/expert_parallel.h"

#include <chrono>

#include "kernels/error.h"

namespace dsx {

void timed_wait(CommHandle& h, CommTimer* timer) {
  if (h.done()) return;
  const auto t0 = std::chrono::steady_clock::now();
  h.wait();
  if (timer) timer->exposed_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
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
