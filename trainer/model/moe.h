// DeepSeekMoE layer: shared experts always on, routed experts chosen per token by the router
// (DEEPSEEK_FACTS.md "Router"), dropless.
//
//   logits = x · W_gateᵀ (activation dtype) -> router -> expert_ids, weights [T, K]
//   permute the T·K (token, choice) rows by expert; dispatch them to the EP ranks holding their
//   experts (trainer/model/moe_dispatch.h); each local expert runs its SwiGLU MLP on its
//   contiguous rows; combine (the reverse route); unpermute:
//   y[t] = Σ_k weights[t, k] · expert_out[row of (t, k)];  y += shared_experts(x)
//
// The shared experts compute while the dispatch is in flight. With parallel.overlap_a2a the
// tokens are processed as two chunks: chunk 1's dispatch is in flight while chunk 0's experts
// compute, chunk 0's combine while chunk 1's experts compute; the backward mirrors it.
//
// Tensor parallelism: the router runs on every token on every TP rank (same input, same weights,
// same routing and loads); TP rank t sends only its share of the tokens (tp_rows) to the routed
// experts, which the EP × TP group splits, and the shared experts are split by their width. The
// output sums over TP; so do the input gradient and the gate weights' gradients in the backward.
// Under sequence parallelism x and dy are all the tokens (the caller gathers them) and the output
// and the input gradient this rank's token rows.
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
#include "trainer/model/expert_parallel.h"
#include "trainer/model/layers.h"
#include "trainer/model/moe_dispatch.h"
#include "trainer/model/parameters.h"
#include "trainer/model/recompute.h"
#include "trainer/model/sequence.h"

namespace dsx {

// One chunk of the micro-batch's tokens on its way through the routed experts.
struct MoeChunk {
  int64_t begin = 0, end = 0;  // token rows [begin, end) of the micro-batch
  Dispatch dispatch;
  Tensor permuted_x;                // [Tc·K, D] this rank's (token, choice) rows sorted by expert, until sent
  Tensor in_flight;                 // receive buffer of the transfer under way
  Tensor expert_x;                  // [R, D] rows this rank's experts compute, expert-major
  Tensor permuted_y;                // [Tc·K, D] expert outputs back in permuted_x's order
  std::vector<MlpContext> experts;  // one per local expert
};

struct MoeContext {
  Tensor scores, expert_ids, weights;  // router outputs: [T, E], [T, K] i32, [T, K]
  std::vector<MoeChunk> chunks;
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
  // The store holds only this EP rank's routed experts (parallel.ep; all of them without EP).
  Moe(ParameterStore& params, const std::string& prefix, int64_t layer, const ModelConfig& config,
      const RecomputePolicy& recompute, const ModelParallel& parallel = {});
  // record_load: false when the forward is a recompute, so the load is counted once per micro-batch.
  Tensor forward(const Tensor& x, const SequenceInfo& seq, MoeContext& ctx, bool record_load);
  // balance_loss_grad: d(objective)/d(balance loss), i.e. the backward's loss scale.
  Tensor backward_input(const Tensor& dy, const SequenceInfo& seq, double balance_loss_grad, MoeContext& ctx) const;
  void backward_weight(const Tensor& x, MoeContext& ctx) const;

  // Aux-loss-free bias update from the load counted since the last call; then resets the load.
  // With data parallelism the loads are first summed over the DP group, so every replica
  // applies the update of the whole global batch.
  void update_bias(double gamma);
  ExpertLoad load() const;
  const Tensor& last_expert_ids() const { return last_expert_ids_; }

 private:
  const std::vector<int64_t>& reported_load() const;
  void progress(MoeContext& ctx) const;
  void run_experts(MoeChunk& chunk, MoeContext& ctx) const;
  Tensor experts_backward_input(MoeChunk& chunk, const Tensor& d_expert_y, MoeContext& ctx) const;

  int64_t layer_;
  ops::RouterConfig router_;
  double balance_alpha_;
  Parameter* gate_;
  Parameter* bias_;
  ModelParallel parallel_;
  ExpertRouter routes_;
  std::vector<Mlp> experts_;  // the local experts, routes_.local().first onwards
  std::optional<Mlp> shared_;
  std::vector<int64_t> load_;       // tokens per expert since the last update_bias
  std::vector<int64_t> last_load_;  // the load the last update_bias used
  Tensor last_expert_ids_;          // routing of the last recorded forward (for tests and debugging)
};

}  // namespace dsx
