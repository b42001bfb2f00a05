#include "trainer/model/moe.h"

#include <algorithm>
#include <cmath>

#include "kernels/ops/elementwise.h"

namespace dsx {

Moe::Moe(ParameterStore& params, const std::string& prefix, int64_t layer, const ModelConfig& config,
         const RecomputePolicy& recompute)
    : layer_(layer),
      balance_alpha_(config.seq_aux_loss_alpha),
      gate_(&params.at(prefix + "gate.weight")),
      bias_(&params.at(prefix + "gate.e_score_correction_bias")),
      load_(static_cast<size_t>(config.n_routed_experts), 0),
      last_load_(static_cast<size_t>(config.n_routed_experts), 0) {
  router_.n_experts = config.n_routed_experts;
  router_.top_k = config.num_experts_per_tok;
  router_.n_group = config.n_group;
  router_.topk_group = config.topk_group;
  router_.scoring =
      config.scoring_func == "softmax" ? ops::RouterConfig::Scoring::softmax : ops::RouterConfig::Scoring::sigmoid;
  router_.norm_topk_prob = config.norm_topk_prob;
  router_.routed_scaling_factor = config.routed_scaling_factor;
  for (int64_t e = 0; e < config.n_routed_experts; ++e) {
    const std::string p = prefix + "experts." + std::to_string(e) + ".";
    experts_.emplace_back(params.at(p + "gate_proj.weight"), params.at(p + "up_proj.weight"),
                          params.at(p + "down_proj.weight"), recompute.moe_act);
  }
  if (config.n_shared_experts > 0) {
    const std::string p = prefix + "shared_experts.";
    shared_.emplace(params.at(p + "gate_proj.weight"), params.at(p + "up_proj.weight"),
                    params.at(p + "down_proj.weight"), recompute.moe_act);
  }
}

Tensor Moe::forward(const Tensor& x, const SequenceInfo& seq, MoeContext& ctx, bool record_load) {
  const int64_t T = x.dim(0), K = router_.top_k, E = router_.n_experts;
  const Tensor logits = linear(x, *gate_);
  ctx.scores = empty_like(logits, logits.shape());
  ctx.expert_ids = Tensor::empty({T, K}, DType::i32, x.device());
  ctx.weights = empty_like(logits, {T, K});
  ops::router_forward(router_, logits, bias_->value, ctx.scores, ctx.expert_ids, ctx.weights);
  ctx.balance_loss = balance_alpha_ > 0
                         ? ops::balance_loss_forward(router_, ctx.scores, ctx.expert_ids, seq.batch, balance_alpha_)
                         : 0.0;

  ctx.plan = ops::moe_plan(ctx.expert_ids, E);
  ctx.permuted_x = empty_like(x, {T * K, x.dim(1)});
  ops::moe_permute(x, ctx.plan, ctx.permuted_x);
  ctx.permuted_y = empty_like(x, {T * K, x.dim(1)});
  ctx.experts.assign(static_cast<size_t>(E), MlpContext{});
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = ctx.plan.expert_offsets[e], end = ctx.plan.expert_offsets[e + 1];
    if (begin == end) continue;  // no token chose this expert
    Tensor rows_out = ctx.permuted_y.slice(begin, end);
    experts_[e].forward(ctx.permuted_x.slice(begin, end), ctx.experts[e], rows_out);
  }
  Tensor y = empty_like(x, x.shape());
  ops::moe_unpermute(ctx.permuted_y, ctx.weights, ctx.plan, y);
  if (shared_) {
    Tensor shared_y = empty_like(x, x.shape());
    shared_->forward(x, ctx.shared, shared_y);
    ops::add_(y, shared_y);
  }

  if (record_load) {
    Tensor counts = Tensor::empty({E}, DType::i64, x.device());
    ops::expert_counts(ctx.expert_ids, E, counts);
    const std::vector<double> c = counts.to_vector();
    for (size_t e = 0; e < load_.size(); ++e) load_[e] += static_cast<int64_t>(c[e]);
    last_expert_ids_ = ctx.expert_ids;
  }
  return y;
}

Tensor Moe::backward_input(const Tensor& dy, const SequenceInfo& seq, double balance_loss_grad, MoeContext& ctx) const {
  const int64_t T = dy.dim(0), K = router_.top_k, E = router_.n_experts;
  Tensor dx = Tensor::zeros(dy.shape(), dy.dtype(), dy.device());
  if (shared_) shared_->backward_input(dy, ctx.shared, dx);

  Tensor d_permuted_y = empty_like(dy, {T * K, dy.dim(1)});
  Tensor d_weights = empty_like(dy, {T, K});
  ops::moe_unpermute_backward(dy, ctx.permuted_y, ctx.weights, ctx.plan, d_permuted_y, d_weights);
  Tensor d_permuted_x = empty_like(dy, {T * K, dy.dim(1)});
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = ctx.plan.expert_offsets[e], end = ctx.plan.expert_offsets[e + 1];
    if (begin == end) continue;
    Tensor rows_dx = d_permuted_x.slice(begin, end);
    experts_[e].backward_input(d_permuted_y.slice(begin, end), ctx.experts[e], rows_dx);
  }
  Tensor d_routed = empty_like(dy, dy.shape());
  ops::moe_permute_backward(d_permuted_x, ctx.plan, d_routed);
  ops::add_(dx, d_routed);

  // The router: gradient through the chosen experts' gate weights and the balance loss.
  ctx.d_logits = empty_like(dy, ctx.scores.shape());
  ops::router_backward(router_, ctx.scores, ctx.expert_ids, d_weights, ctx.d_logits);
  if (balance_alpha_ > 0) {
    ops::balance_loss_backward(router_, ctx.scores, ctx.expert_ids, seq.batch, balance_alpha_, balance_loss_grad,
                               ctx.d_logits);
  }
  ops::add_(dx, linear_input_grad(ctx.d_logits, *gate_));
  ctx.permuted_y = Tensor();
  return dx;
}

void Moe::backward_weight(const Tensor& x, MoeContext& ctx) const {
  linear_weight_grad(ctx.d_logits, x, *gate_);
  for (size_t e = 0; e < experts_.size(); ++e) {
    const int64_t begin = ctx.plan.expert_offsets[e], end = ctx.plan.expert_offsets[e + 1];
    if (begin == end) continue;
    experts_[e].backward_weight(ctx.permuted_x.slice(begin, end), ctx.experts[e]);
  }
  if (shared_) shared_->backward_weight(x, ctx.shared);
  ctx = {};
}

void Moe::update_bias(double gamma) {
  Tensor counts = Tensor::from<int64_t>(std::span<const int64_t>(load_), {router_.n_experts});
  ops::router_update_bias(counts, gamma, bias_->value);
  last_load_ = load_;
  std::fill(load_.begin(), load_.end(), 0);
}

// The load since the last update, or, right after an update, the load that update used.
const std::vector<int64_t>& Moe::reported_load() const {
  const bool any = std::any_of(load_.begin(), load_.end(), [](int64_t n) { return n > 0; });
  return any ? load_ : last_load_;
}

ExpertLoad Moe::load() const {
  const std::vector<int64_t>& counts = reported_load();
  ExpertLoad stats;
  stats.layer = layer_;
  stats.tokens_per_expert = counts;
  stats.min_tokens = *std::min_element(counts.begin(), counts.end());
  stats.max_tokens = *std::max_element(counts.begin(), counts.end());
  double sum = 0, sum_sq = 0;
  for (int64_t n : counts) {
    sum += static_cast<double>(n);
    sum_sq += static_cast<double>(n) * static_cast<double>(n);
  }
  const double count = static_cast<double>(counts.size());
  const double mean = sum / count;
  stats.cv = mean > 0 ? std::sqrt(std::max(0.0, sum_sq / count - mean * mean)) / mean : 0.0;
  const std::vector<double> bias = bias_->value.to_vector();
  stats.bias_spread = *std::max_element(bias.begin(), bias.end()) - *std::min_element(bias.begin(), bias.end());
  return stats;
}

}  // namespace dsx
