#include "trainer/model/moe.h"

#include <algorithm>
#include <cmath>

#include "kernels/ops/elementwise.h"

namespace dsx {

Moe::Moe(ParameterStore& params, const std::string& prefix, int64_t layer, const ModelConfig& config,
         const RecomputePolicy& recompute, const ModelParallel& parallel)
    : layer_(layer),
      balance_alpha_(config.seq_aux_loss_alpha),
      gate_(&params.at(prefix + "gate.weight")),
      bias_(&params.at(prefix + "gate.e_score_correction_bias")),
      parallel_(parallel),
      routes_(config.n_routed_experts, parallel),
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
  const LocalExperts& local = routes_.local();
  for (int64_t e = local.first; e < local.first + local.count; ++e) {
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

namespace {

// Token ranges of the chunks of the rows [rows.begin, rows.end) this rank routes: two halves with
// overlap (when there are two tokens), else one.
std::vector<ExpertRouter::TokenRange> chunk_ranges(RowRange rows, bool overlap) {
  const int64_t n = rows.end - rows.begin, mid = rows.begin + n / 2;
  if (!overlap || n < 2) return {{rows.begin, rows.end}};
  return {{rows.begin, mid}, {mid, rows.end}};
}

}  // namespace

// Lets every chunk's transfer in flight advance (between pieces of compute).
void Moe::progress(MoeContext& ctx) const {
  for (MoeChunk& c : ctx.chunks) routes_.progress(c.dispatch);
}

// Each local expert computes its contiguous rows of chunk.expert_x.
void Moe::run_experts(MoeChunk& chunk, MoeContext& ctx) const {
  const std::vector<int64_t>& off = chunk.dispatch.local_offsets;
  Tensor expert_y = empty_like(chunk.expert_x, chunk.expert_x.shape());
  chunk.experts.assign(experts_.size(), MlpContext{});
  for (size_t j = 0; j < experts_.size(); ++j) {
    if (off[j] == off[j + 1]) continue;  // no token chose this expert
    Tensor rows_out = expert_y.slice(off[j], off[j + 1]);
    experts_[j].forward(chunk.expert_x.slice(off[j], off[j + 1]), chunk.experts[j], rows_out);
    progress(ctx);
  }
  chunk.in_flight = routes_.start_from_experts(expert_y, chunk.dispatch);
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

  // dispatch every chunk, then compute each as its rows arrive and send the outputs back
  // Under TP every rank routed all T tokens (identically); each sends its share to the experts.
  const std::vector<ExpertRouter::TokenRange> ranges =
      chunk_ranges(tp_rows(T, parallel_.tp_size(), parallel_.tp_rank()), parallel_.overlap_a2a);
  std::vector<Dispatch> routes = routes_.plan(ctx.expert_ids, ranges);
  ctx.chunks.resize(ranges.size());
  for (size_t i = 0; i < ranges.size(); ++i) {
    MoeChunk& c = ctx.chunks[i];
    c.begin = ranges[i].begin;
    c.end = ranges[i].end;
    c.dispatch = std::move(routes[i]);
    c.permuted_x = empty_like(x, {(c.end - c.begin) * K, x.dim(1)});
    ops::moe_permute(x.slice(c.begin, c.end), c.dispatch.plan, c.permuted_x);
    c.in_flight = routes_.start_to_experts(c.permuted_x, c.dispatch, Transfer::dispatch);
  }
  Tensor shared_y;
  if (shared_) {  // while the dispatches are in flight
    shared_y = empty_like(x, x.shape());
    shared_->forward(x, ctx.shared, shared_y);
  }
  for (MoeChunk& c : ctx.chunks) {
    c.expert_x = routes_.finish_to_experts(c.dispatch, c.in_flight);
    c.permuted_x = Tensor();  // sent: the backward needs only the rows the experts received
    run_experts(c, ctx);      // starts the combine
  }
  // rows another TP rank routes stay zero here: the sum over TP fills them
  Tensor y = parallel_.tp_size() > 1 ? Tensor::zeros(x.shape(), x.dtype(), x.device()) : empty_like(x, x.shape());
  for (MoeChunk& c : ctx.chunks) {
    c.permuted_y = routes_.finish_from_experts(c.dispatch, c.in_flight, x.dtype());
    c.in_flight = Tensor();
    Tensor y_rows = y.slice(c.begin, c.end);
    ops::moe_unpermute(c.permuted_y, ctx.weights.slice(c.begin, c.end), c.dispatch.plan, y_rows);
  }
  if (shared_) ops::add_(y, shared_y);
  y = sum_over_tp(parallel_, y);  // the shared experts' row-parallel parts and the routed rows

  if (record_load) {
    Tensor counts = Tensor::empty({E}, DType::i64, x.device());
    ops::expert_counts(ctx.expert_ids, E, counts);
    const std::vector<double> c = counts.to_vector();
    for (size_t e = 0; e < load_.size(); ++e) load_[e] += static_cast<int64_t>(c[e]);
    last_expert_ids_ = ctx.expert_ids;
  }
  return y;
}

// Gradient of the local experts' input rows; starts sending it back to the tokens' ranks.
Tensor Moe::experts_backward_input(MoeChunk& chunk, const Tensor& d_expert_y, MoeContext& ctx) const {
  const std::vector<int64_t>& off = chunk.dispatch.local_offsets;
  Tensor d_expert_x = empty_like(d_expert_y, d_expert_y.shape());
  for (size_t j = 0; j < experts_.size(); ++j) {
    if (off[j] == off[j + 1]) continue;
    Tensor rows_dx = d_expert_x.slice(off[j], off[j + 1]);
    experts_[j].backward_input(d_expert_y.slice(off[j], off[j + 1]), chunk.experts[j], rows_dx);
    progress(ctx);
  }
  return routes_.start_from_experts(d_expert_x, chunk.dispatch);
}

Tensor Moe::backward_input(const Tensor& dy, const SequenceInfo& seq, double balance_loss_grad, MoeContext& ctx) const {
  const int64_t T = dy.dim(0), K = router_.top_k;
  Tensor d_weights = Tensor::zeros({T, K}, dy.dtype(), dy.device());  // rows routed by another TP rank: 0
  for (MoeChunk& c : ctx.chunks) {  // the combine's backward: output gradients to the experts
    Tensor d_permuted_y = empty_like(dy, {(c.end - c.begin) * K, dy.dim(1)});
    Tensor d_weight_rows = d_weights.slice(c.begin, c.end);
    ops::moe_unpermute_backward(dy.slice(c.begin, c.end), c.permuted_y, ctx.weights.slice(c.begin, c.end),
                                c.dispatch.plan, d_permuted_y, d_weight_rows);
    c.permuted_y = Tensor();
    c.in_flight = routes_.start_to_experts(d_permuted_y, c.dispatch, Transfer::combine);
  }
  Tensor dx = Tensor::zeros(dy.shape(), dy.dtype(), dy.device());
  if (shared_) shared_->backward_input(dy, ctx.shared, dx);  // while the gradients travel to the experts
  for (MoeChunk& c : ctx.chunks) {                           // the experts' backward, then the dispatch's backward
    const Tensor d_expert_y = routes_.finish_to_experts(c.dispatch, c.in_flight);
    c.in_flight = experts_backward_input(c, d_expert_y, ctx);
  }
  for (MoeChunk& c : ctx.chunks) {
    const Tensor d_permuted_x = routes_.finish_from_experts(c.dispatch, c.in_flight, dy.dtype());
    Tensor d_routed = empty_like(dy, {c.end - c.begin, dy.dim(1)});
    ops::moe_permute_backward(d_permuted_x, c.dispatch.plan, d_routed);
    c.in_flight = Tensor();
    Tensor dx_rows = dx.slice(c.begin, c.end);
    ops::add_(dx_rows, d_routed);
  }
  // Under TP: the shared experts' column-parallel parts and each rank's routed rows sum to the
  // input gradient; the gate weights' gradients are summed too, so every rank runs the same
  // (replicated) router backward on complete gradients.
  dx = sum_over_tp(parallel_, dx);  // this rank's token rows under sequence parallelism
  all_reduce_over_tp(parallel_, d_weights);

  // The router: gradient through the chosen experts' gate weights and the balance loss.
  ctx.d_logits = empty_like(dy, ctx.scores.shape());
  ops::router_backward(router_, ctx.scores, ctx.expert_ids, d_weights, ctx.d_logits);
  if (balance_alpha_ > 0) {
    ops::balance_loss_backward(router_, ctx.scores, ctx.expert_ids, seq.batch, balance_alpha_, balance_loss_grad,
                               ctx.d_logits);
  }
  ops::add_(dx, own_tokens(parallel_, linear_input_grad(ctx.d_logits, *gate_)));
  return dx;
}

void Moe::backward_weight(const Tensor& x, MoeContext& ctx) const {
  linear_weight_grad(ctx.d_logits, x, *gate_);
  for (MoeChunk& c : ctx.chunks) {
    const std::vector<int64_t>& off = c.dispatch.local_offsets;
    for (size_t j = 0; j < experts_.size(); ++j) {
      if (off[j] == off[j + 1]) continue;
      experts_[j].backward_weight(c.expert_x.slice(off[j], off[j + 1]), c.experts[j]);
    }
  }
  if (shared_) shared_->backward_weight(x, ctx.shared);
  ctx = {};
}

void Moe::update_bias(double gamma) {
  if (parallel_.dp && parallel_.dp->size() > 1) {
    Tensor global =
        stage_for(*parallel_.dp, Tensor::from<int64_t>(std::span<const int64_t>(load_), {router_.n_experts}));
    CommHandle h = parallel_.dp->all_reduce(global);
    timed_wait(h, parallel_.timer);
    global = unstage(global);
    const int64_t* g = global.data<int64_t>();
    load_.assign(g, g + router_.n_experts);
  }
  Tensor counts = Tensor::from<int64_t>(std::span<const int64_t>(load_), {router_.n_experts});
  if (bias_->value.device() != Device::cpu) counts = counts.to(bias_->value.device());
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
