// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
#pragma once
#include "kernels/ops/router.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

using ops::RouterConfig;

void router_forward(const RouterConfig& config, const Tensor& logits, const Tensor& bias, Tensor& scores,
                    Tensor& expert_ids, Tensor& weights);
void router_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, const Tensor& dweights,
                     Tensor& dlogits);
// Out-of-range ids are skipped and reported through check_device_errors() (device_checks.h).
void expert_counts(const Tensor& expert_ids, int64_t n_experts, Tensor& counts);
void router_update_bias(const Tensor& counts, double gamma, Tensor& bias);
// Synchronises (returns a host value); throws for out-of-range ids like the CPU op.
double balance_loss_forward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                            double alpha);
void balance_loss_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                           double alpha, double dloss, Tensor& dlogits);

}  // namespace dsx::cuda
