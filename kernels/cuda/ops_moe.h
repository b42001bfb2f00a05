// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
#pragma once
#include "kernels/ops/moe_permute.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

using ops::MoePlan;

// The plan's assignment stays on the GPU; expert_offsets come to the host (one small copy, the
// only synchronisation). Out-of-range ids throw, as on the CPU.
MoePlan moe_plan(const Tensor& expert_ids, int64_t n_experts);
// The four ops below check the plan's shape, dtype and device on the host and its contents on
// the device without synchronising: a plan whose assignment is not a permutation is reported
// through cuda::check_device_errors() (kernels/cuda/device_checks.h); the kernels never index
// out of range with it.
void moe_permute(const Tensor& x, const MoePlan& plan, Tensor& xp);
void moe_permute_backward(const Tensor& dxp, const MoePlan& plan, Tensor& dx);
void moe_unpermute(const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& y);
void moe_unpermute_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& dyp,
                            Tensor& dweights);

}  // namespace dsx::cuda
