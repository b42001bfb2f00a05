#include "trainer/model/layers.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kernels/ops/elementwise.h"
#include "kernels/ops/embedding.h"
#include "kernels/ops/rmsnorm.h"
#include "kernels/ops/swiglu.h"
#include "trainer/model/precision.h"

namespace dsx {

void round_output(const Parameter& weight, Tensor& out) {
  if (weight.precision.bf16_output) round_to_bf16_(out);
}

void linear_into(const Tensor& x, const Parameter& weight, Tensor& y) {
  linear_forward_in(weight.precision.gemm, x, weight.gemm_operand(), y);
  round_output(weight, y);
}

Tensor linear(const Tensor& x, const Parameter& weight) {
  Tensor y = empty_like(x, {x.dim(0), weight.value.dim(0)});
  linear_into(x, weight, y);
  return y;
}

void linear_input_grad_into(const Tensor& dy, const Parameter& weight, Tensor& dx) {
  linear_backward_input_in(weight.precision.gemm, dy, weight.gemm_operand(), dx);
}

Tensor linear_input_grad(const Tensor& dy, const Parameter& weight) {
  Tensor dx = empty_like(dy, {dy.dim(0), weight.value.dim(1)});
  linear_input_grad_into(dy, weight, dx);
  return dx;
}

void linear_weight_grad(const Tensor& dy, const Tensor& x, Parameter& weight) {
  linear_backward_weight_in(weight.precision.gemm, dy, x, weight.grad);
}

Tensor add(const Tensor& a, const Tensor& b) {
  Tensor sum = a.clone();
  ops::add_(sum, b);
  return sum;
}

// ---- RmsNorm ----------------------------------------------------------------------------

Tensor RmsNorm::forward(const Tensor& x, RmsNormContext& ctx) const {
  Tensor y = empty_like(x, x.shape());
  ctx.rstd = empty_like(x, {x.dim(0)});
  ops::rmsnorm_forward(x, weight_->value, eps_, y, ctx.rstd);
  round_output(*weight_, y);
  return y;
}

Tensor RmsNorm::backward_input(const Tensor& x, const Tensor& dy, RmsNormContext& ctx) const {
  Tensor dx = empty_like(x, x.shape());
  ops::rmsnorm_backward_input(x, weight_->value, ctx.rstd, dy, dx);
  ctx.dy = dy;
  return dx;
}

void RmsNorm::backward_weight(const Tensor& x, RmsNormContext& ctx) const {
  ops::rmsnorm_backward_weight(x, ctx.rstd, ctx.dy, weight_->grad);
  ctx = {};
}

// ---- Vocab-parallel helpers ------------------------------------------------------------

namespace {

// Token ids seen from a TP rank holding vocabulary rows [first, first + rows).
struct VocabShard {
  Tensor local;                   // id - first for the ids held here, `elsewhere` for the others (ids' dtype, device)
  std::vector<RowRange> foreign;  // runs of positions whose id is held by another rank (ignore_index excluded)
  int64_t counted = 0;            // positions whose id is not ignore_index
};

VocabShard vocab_shard(const Tensor& ids, int64_t first, int64_t rows, int64_t elsewhere, int64_t ignore_index) {
  const std::vector<double> all = ids.to_vector();
  std::vector<int64_t> local(all.size());
  VocabShard out;
  for (size_t n = 0; n < all.size(); ++n) {
    const auto id = static_cast<int64_t>(all[n]);
    const bool ignored = id == ignore_index, held = id >= first && id < first + rows;
    local[n] = held ? id - first : ignored ? ignore_index : elsewhere;
    if (!ignored) ++out.counted;
    if (held || ignored) continue;
    const auto pos = static_cast<int64_t>(n);
    if (!out.foreign.empty() && out.foreign.back().end == pos) {
      ++out.foreign.back().end;
    } else {
      out.foreign.push_back({pos, pos + 1});
    }
  }
  out.local = Tensor::from<int64_t>(std::span<const int64_t>(local), ids.shape()).to(ids.dtype());
  if (ids.device() != Device::cpu) out.local = out.local.to(ids.device());
  return out;
}

void zero_rows(Tensor& t, const std::vector<RowRange>& runs) {
  for (const RowRange& r : runs) {
    Tensor rows = t.slice(r.begin, r.end);
    ops::scale_(rows, 0.0);
  }
}

constexpr int64_t kNoIgnore = std::numeric_limits<int64_t>::min();  // embedding ids have no ignore_index

}  // namespace

// ---- Embedding --------------------------------------------------------------------------

Tensor Embedding::forward(const Tensor& ids) const {
  Tensor out = empty_like(table_->value, {ids.dim(0), table_->value.dim(1)});
  if (parallel_.tp_size() == 1) {
    ops::embedding_forward(ids, table_->value, out);
    round_output(*table_, out);
    return out;
  }
  // the rows of the ids held elsewhere look up row 0, then become zeros: one rank adds each row
  const VocabShard shard = vocab_shard(ids, table_->offset.at(0), table_->value.dim(0), 0, kNoIgnore);
  ops::embedding_forward(shard.local, table_->value, out);
  zero_rows(out, shard.foreign);
  round_output(*table_, out);
  all_reduce_over_tp(parallel_, out);
  return out;
}

void Embedding::backward_weight(const Tensor& ids, const Tensor& dout) const {
  if (parallel_.tp_size() == 1) {
    ops::embedding_backward_weight(ids, dout, table_->grad);
    return;
  }
  const VocabShard shard = vocab_shard(ids, table_->offset.at(0), table_->value.dim(0), 0, kNoIgnore);
  Tensor own = empty_like(dout, dout.shape());
  own.copy_from(dout);
  zero_rows(own, shard.foreign);  // the rows of ids held elsewhere add nothing to row 0
  ops::embedding_backward_weight(shard.local, own, table_->grad);
}

// ---- Mlp --------------------------------------------------------------------------------

void Mlp::forward(const Tensor& x, MlpContext& ctx, Tensor& y) const {
  ctx.gate = linear(x, *gate_);
  ctx.up = linear(x, *up_);
  ctx.act = empty_like(ctx.gate, ctx.gate.shape());
  ops::swiglu_forward(ctx.gate, ctx.up, ctx.act);
  round_output(*down_, ctx.act);  // the down projection's stored input
  linear_into(ctx.act, *down_, y);
  if (recompute_act_) ctx.act = Tensor();
}

void Mlp::backward_input(const Tensor& dy, MlpContext& ctx, Tensor& dx) const {
  if (!ctx.act.defined()) {  // recompute: the down projection's weight gradient needs it
    ctx.act = empty_like(ctx.gate, ctx.gate.shape());
    ops::swiglu_forward(ctx.gate, ctx.up, ctx.act);
    round_output(*down_, ctx.act);
  }
  const Tensor d_act = linear_input_grad(dy, *down_);
  ctx.d_gate = empty_like(ctx.gate, ctx.gate.shape());
  ctx.d_up = empty_like(ctx.up, ctx.up.shape());
  ops::swiglu_backward(ctx.gate, ctx.up, d_act, ctx.d_gate, ctx.d_up);
  linear_input_grad_into(ctx.d_gate, *gate_, dx);
  ops::add_(dx, linear_input_grad(ctx.d_up, *up_));
  ctx.d_out = dy;
}

void Mlp::backward_weight(const Tensor& x, MlpContext& ctx) const {
  linear_weight_grad(ctx.d_out, ctx.act, *down_);
  linear_weight_grad(ctx.d_gate, x, *gate_);
  linear_weight_grad(ctx.d_up, x, *up_);
  ctx = {};
}

// ---- OutputHead -------------------------------------------------------------------------

void OutputHead::forward(const Tensor& h, const Tensor& targets, HeadContext& ctx) const {
  ctx.normed = norm_.forward(h, ctx.norm);
  ctx.normed_all = gather_tokens(parallel_, ctx.normed);
  ctx.logits = linear(ctx.normed_all, *head_);
  ctx.targets = targets;
  if (parallel_.tp_size() > 1) {
    vocab_parallel_cross_entropy(ctx);
    return;
  }
  ctx.lse = empty_like(ctx.logits, {ctx.logits.dim(0)});
  ctx.ce = ops::cross_entropy_forward(ctx.logits, targets, kIgnoreIndex, ctx.lse);
}

// loss_n = lse_n - logit_n[target] with lse_n = log Σ_r exp(lse_{r,n}) over the TP ranks' vocabulary
// rows; the rank holding the target adds (lse_{r,n} - logit) + (lse_n - lse_{r,n}).
void OutputHead::vocab_parallel_cross_entropy(HeadContext& ctx) const {
  const int64_t N = ctx.logits.dim(0), tp = parallel_.tp_size();
  const Device device = ctx.logits.device();
  const VocabShard shard =
      vocab_shard(ctx.targets, head_->offset.at(0), head_->value.dim(0), kIgnoreIndex, kIgnoreIndex);
  Tensor own_lse = Tensor::empty({N}, DType::f64, device);
  const ops::CrossEntropyResult own = ops::cross_entropy_forward(ctx.logits, shard.local, kIgnoreIndex, own_lse);
  Tensor every_lse = Tensor::empty({tp * N}, DType::f64, device);
  CommHandle gather = parallel_.tp->all_gather(own_lse, every_lse);
  timed_wait(gather, parallel_.timer);
  const std::vector<double> mine = own_lse.to_vector(), every = every_lse.to_vector();
  const std::vector<double> targets = shard.local.to_vector();
  std::vector<double> lse(static_cast<size_t>(N));
  double loss_sum = own.loss_sum;
  for (int64_t n = 0; n < N; ++n) {
    double top = -INFINITY;
    for (int64_t r = 0; r < tp; ++r) top = std::max(top, every[static_cast<size_t>(r * N + n)]);
    double sum = 0;
    for (int64_t r = 0; r < tp; ++r) sum += std::exp(every[static_cast<size_t>(r * N + n)] - top);
    const auto i = static_cast<size_t>(n);
    lse[i] = top + std::log(sum);
    if (targets[i] != static_cast<double>(kIgnoreIndex)) loss_sum += lse[i] - mine[i];  // a target held here
  }
  Tensor total = stage_for(*parallel_.tp, Tensor::full({1}, loss_sum, DType::f64));
  CommHandle reduce = parallel_.tp->all_reduce(total);
  timed_wait(reduce, parallel_.timer);
  ctx.ce = {unstage(total).item(), shard.counted};
  ctx.lse = Tensor::from<double>(std::span<const double>(lse), {N});
  if (device != Device::cpu) ctx.lse = ctx.lse.to(device);
}

// scale · (softmax - onehot) on this rank's columns: targets held elsewhere get the softmax part
// only (the op subtracts a one-hot at column 0, added back here).
void OutputHead::vocab_parallel_backward(double loss_grad, HeadContext& ctx) const {
  const int64_t N = ctx.logits.dim(0);
  const VocabShard shard = vocab_shard(ctx.targets, head_->offset.at(0), head_->value.dim(0), 0, kIgnoreIndex);
  ops::cross_entropy_backward(ctx.logits, shard.local, ctx.lse, kIgnoreIndex, loss_grad, ctx.d_logits);
  if (shard.foreign.empty()) return;
  std::vector<double> column(static_cast<size_t>(N), 0.0);
  for (const RowRange& r : shard.foreign) std::fill(column.begin() + r.begin, column.begin() + r.end, loss_grad);
  Tensor add_back = Tensor::from<double>(std::span<const double>(column), {N, 1}).to(ctx.d_logits.dtype());
  if (ctx.d_logits.device() != Device::cpu) add_back = add_back.to(ctx.d_logits.device());
  ops::set_columns(ctx.d_logits, 0, add_back, /*accumulate=*/true);
}

Tensor OutputHead::gather_logits(const HeadContext& ctx) const {
  if (parallel_.tp_size() == 1) return ctx.logits;
  const int64_t N = ctx.logits.dim(0), cols = ctx.logits.dim(1), tp = parallel_.tp_size();
  Tensor every = empty_like(ctx.logits, {tp * N, cols});
  CommHandle gather = parallel_.tp->all_gather(ctx.logits, every);
  timed_wait(gather, parallel_.timer);
  Tensor out = empty_like(ctx.logits, {N, tp * cols});
  for (int64_t r = 0; r < tp; ++r) ops::set_columns(out, r * cols, every.slice(r * N, (r + 1) * N));
  return out;
}

Tensor OutputHead::backward_input(const Tensor& h, double loss_grad, const Tensor& d_normed_extra,
                                  HeadContext& ctx) const {
  ctx.d_logits = empty_like(ctx.logits, ctx.logits.shape());
  if (parallel_.tp_size() > 1) {
    vocab_parallel_backward(loss_grad, ctx);
  } else {
    ops::cross_entropy_backward(ctx.logits, ctx.targets, ctx.lse, kIgnoreIndex, loss_grad, ctx.d_logits);
  }
  // each rank's vocabulary rows add their part (this rank's tokens of it under sequence parallelism)
  Tensor d_normed = sum_over_tp(parallel_, linear_input_grad(ctx.d_logits, *head_));
  if (d_normed_extra.defined()) ops::add_(d_normed, d_normed_extra);
  ctx.logits = Tensor();  // the largest activation: not needed any more
  ctx.lse = Tensor();
  return norm_.backward_input(h, d_normed, ctx.norm);
}

void OutputHead::backward_weight(const Tensor& h, HeadContext& ctx) const {
  linear_weight_grad(ctx.d_logits, ctx.normed_all, *head_);
  norm_.backward_weight(h, ctx.norm);
  ctx = {};
}

}  // namespace dsx
