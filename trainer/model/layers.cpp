#include "trainer/model/layers.h"

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

// ---- Embedding --------------------------------------------------------------------------

Tensor Embedding::forward(const Tensor& ids) const {
  Tensor out = empty_like(table_->value, {ids.dim(0), table_->value.dim(1)});
  ops::embedding_forward(ids, table_->value, out);
  round_output(*table_, out);
  return out;
}

void Embedding::backward_weight(const Tensor& ids, const Tensor& dout) const {
  ops::embedding_backward_weight(ids, dout, table_->grad);
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
  ctx.logits = linear(ctx.normed, *head_);
  ctx.lse = empty_like(ctx.logits, {ctx.logits.dim(0)});
  ctx.targets = targets;
  ctx.ce = ops::cross_entropy_forward(ctx.logits, targets, kIgnoreIndex, ctx.lse);
}

Tensor OutputHead::backward_input(const Tensor& h, double loss_grad, const Tensor& d_normed_extra,
                                  HeadContext& ctx) const {
  ctx.d_logits = empty_like(ctx.logits, ctx.logits.shape());
  ops::cross_entropy_backward(ctx.logits, ctx.targets, ctx.lse, kIgnoreIndex, loss_grad, ctx.d_logits);
  Tensor d_normed = linear_input_grad(ctx.d_logits, *head_);
  if (d_normed_extra.defined()) ops::add_(d_normed, d_normed_extra);
  ctx.logits = Tensor();  // the largest activation: not needed any more
  ctx.lse = Tensor();
  return norm_.backward_input(h, d_normed, ctx.norm);
}

void OutputHead::backward_weight(const Tensor& h, HeadContext& ctx) const {
  linear_weight_grad(ctx.d_logits, ctx.normed, *head_);
  norm_.backward_weight(h, ctx.norm);
  ctx = {};
}

}  // namespace dsx
