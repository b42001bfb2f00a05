// DeepSeekMoE layer: shared experts always on, routed experts chosen per token by the router
// (DEEPSEEK_FACTS.md "Router"), dropless.
//
//   logits = x · W_gateᵀ (activation dtype) -> router -> expert_ids, weights [T, K]
//   permute the T·K (token, choice) rows by expert; expert e runs its SwiGLU MLP on its
//   contiguous rows; unpermute: y[t] = Σ_k weights[t, k] · expert_out[row of (t, k)]
//   y += shared_experts(x)
//
// Aux-loss-free balancing: each (non-recompute) forward adds the tokens each expert received to
// the layer's load; update_bias(γ) moves the selection bias by ±γ from that load and resets it.
// The optional sequence-wise balance loss α·Σ_i f_i·P_i is computed per sequence of the batch.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "kernels/ops/moe_permute.h"
#include "kernels/ops/router.h"
#include "trainer/model/config.h"
#include "trainer/model/layers.h"
#include "trainer/model/parameters.h"
#include "trainer/model/recompute.h"
#include "trainer/model/sequence.h"

namespace dsx {

struct MoeContext {
  Tensor scores, expert_ids, weights;  // router outputs: [T, E], [T, K] i32, [T, K]
  ops::MoePlan plan;
  Tensor permuted_x;  // [T·K, D], rows grouped by expert
  Tensor permuted_y;  // expert outputs in the same order
  std::vector<MlpContext> experts;
  MlpContext shared;
  double balance_loss = 0;
  Tensor d_logits;  // kept by backward_input for the gate's weight gradient
};

// Tokens per expert and selection-bias spread of one MoE layer.
struct ExpertLoad {
  int64_t layer = 0;
  int64_t min_tokens = 0;
  int64_t max_tokens = 0;
  double cv = 0;           // coefficient of variation of tokens per expert (std / mean)
  double bias_spread = 0;  // max - min of e_score_correction_bias
  std::vector<int64_t> tokens_per_expert;
};

class Moe {
 public:
  Moe(ParameterStore& params, const std::string& prefix, int64_t layer, const ModelConfig& config,
      const RecomputePolicy& recompute);
  // record_load: false when the forward is a recompute, so the load is counted once per micro-batch.
  Tensor forward(const Tensor& x, const SequenceInfo& seq, MoeContext& ctx, bool record_load);
  // balance_loss_grad: d(objective)/d(balance loss), i.e. the backward's loss scale.
  Tensor backward_input(const Tensor& dy, const SequenceInfo& seq, double balance_loss_grad, MoeContext& ctx) const;
  void backward_weight(const Tensor& x, MoeContext& ctx) const;

  // Aux-loss-free bias update from the load counted since the last call; then resets the load.
  void update_bias(double gamma);
  ExpertLoad load() const;
  const Tensor& last_expert_ids() const { return last_expert_ids_; }

 private:
  const std::vector<int64_t>& reported_load() const;

  int64_t layer_;
  ops::RouterConfig router_;
  double balance_alpha_;
  Parameter* gate_;
  Parameter* bias_;
  std::vector<Mlp> experts_;
  std::optional<Mlp> shared_;
  std::vector<int64_t> load_;       // tokens per expert since the last update_bias
  std::vector<int64_t> last_load_;  // the load the last update_bias used
  Tensor last_expert_ids_;          // routing of the last recorded forward (for tests and debugging)
};

}  // namespace dsx
