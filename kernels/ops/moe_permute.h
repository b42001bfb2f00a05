#pragma once
#include <cstdint>
#include <vector>

#include "kernels/tensor.h"

namespace dsx::ops {

// Dropless MoE token permutation: the T·K (token, choice) assignments sorted by expert,
// stable in assignment order (t·K + k), so expert e's rows are
// [expert_offsets[e], expert_offsets[e+1]) of the permuted buffer.
struct MoePlan {
  int64_t n_tokens = 0;
  int64_t top_k = 0;
  Tensor assignment;                    // [T·K] i64: permuted row r holds assignment t·K + k
  std::vector<int64_t> expert_offsets;  // [E + 1]
};
// expert_ids [T, K] i32|i64; an id outside [0, n_experts) throws. A token may pick an expert twice.
MoePlan moe_plan(const Tensor& expert_ids, int64_t n_experts);

// Every op below checks that plan.assignment is a permutation of [0, T·K) before touching data.
// xp[r] = x[assignment[r] / K]. x [T, D] -> xp [T·K, D]; a row copy, so any dtype (bf16, fp8 for
// dispatch) works. The other three compute in f32|f64, all tensors of one call sharing the dtype.
void moe_permute(const Tensor& x, const MoePlan& plan, Tensor& xp);
// dx [T, D] (overwritten) = Σ over the token's K rows of dxp.
void moe_permute_backward(const Tensor& dxp, const MoePlan& plan, Tensor& dx);
// y[t] = Σ_k weights[t, k] · yp[row of (t, k)]. yp [T·K, D], weights [T, K] -> y [T, D].
void moe_unpermute(const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& y);
// dyp [T·K, D], dweights [T, K] (both overwritten).
void moe_unpermute_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& dyp,
                            Tensor& dweights);

}  // namespace dsx::ops
