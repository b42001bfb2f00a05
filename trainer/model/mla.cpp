#include "trainer/model/mla.h"

#include <cmath>

#include "kernels/ops/attention.h"
#include "kernels/ops/elementwise.h"
#include "kernels/ops/rope.h"

namespace dsx {

ops::RopeConfig rope_config(const ModelConfig& config) {
  ops::RopeConfig r;
  r.dim = config.qk_rope_head_dim;
  r.theta = config.rope_theta;
  const RopeScalingConfig& s = config.rope_scaling;
  if (s.type == "yarn") {
    r.scaling = ops::RopeConfig::Scaling::yarn;
    r.factor = s.factor;
    r.original_max_position_embeddings = s.original_max_position_embeddings;
    r.beta_fast = s.beta_fast;
    r.beta_slow = s.beta_slow;
    r.mscale = s.mscale;
    r.mscale_all_dim = s.mscale_all_dim;
  }
  return r;
}

Mla::Mla(ParameterStore& params, const std::string& prefix, const ModelConfig& config, const RecomputePolicy& recompute,
         const ModelParallel& parallel)
    : heads_(config.num_attention_heads / parallel.tp_size()),
      nope_dim_(config.qk_nope_head_dim),
      rope_dim_(config.qk_rope_head_dim),
      v_dim_(config.v_head_dim),
      kv_lora_rank_(config.kv_lora_rank),
      q_lora_(config.q_lora_rank > 0),
      recompute_(recompute),
      parallel_(parallel),
      kv_a_proj_(&params.at(prefix + "kv_a_proj_with_mqa.weight")),
      kv_b_proj_(&params.at(prefix + "kv_b_proj.weight")),
      o_proj_(&params.at(prefix + "o_proj.weight")),
      kv_a_norm_(params.at(prefix + "kv_a_layernorm.weight"), config.rms_norm_eps) {
  if (q_lora_) {
    q_a_proj_ = &params.at(prefix + "q_a_proj.weight");
    q_b_proj_ = &params.at(prefix + "q_b_proj.weight");
    q_a_norm_.emplace(params.at(prefix + "q_a_layernorm.weight"), config.rms_norm_eps);
  } else {
    q_proj_ = &params.at(prefix + "q_proj.weight");
  }
  const double mscale = ops::rope_softmax_scale_factor(rope_config(config));
  softmax_scale_ = mscale * mscale / std::sqrt(static_cast<double>(config.qk_head_dim()));
}

Tensor Mla::attention_4d(const Tensor& t, const SequenceInfo& seq, int64_t head_dim) const {
  return t.view({seq.batch, seq.seq_len, heads_, head_dim});
}

bool Mla::bf16_core() const {
  return kv_b_proj_->precision.bf16_output;
}

namespace {
Tensor in_dtype(const Tensor& t, DType dtype) {
  return t.dtype() == dtype ? t : t.to(dtype);
}
}  // namespace

void Mla::project_down(const Tensor& x, MlaContext& ctx) const {
  if (q_lora_) {
    ctx.q_latent = linear(x, *q_a_proj_);
    ctx.q_latent_normed = q_a_norm_->forward(ctx.q_latent, ctx.q_norm);
  }
  const Tensor kv_a = linear(x, *kv_a_proj_);  // [T, kv_lora_rank + dr]
  ctx.kv_latent = empty_like(x, {x.dim(0), kv_lora_rank_});
  ctx.k_pe = empty_like(x, {x.dim(0), rope_dim_});
  ops::copy_columns(kv_a, 0, ctx.kv_latent);
  ops::copy_columns(kv_a, kv_lora_rank_, ctx.k_pe);
  ctx.kv_latent_normed = kv_a_norm_.forward(ctx.kv_latent, ctx.kv_norm);
}

void Mla::project_up(const Tensor& x, const SequenceInfo& seq, MlaContext& ctx) const {
  const int64_t T = x.dim(0), qk_dim = nope_dim_ + rope_dim_;
  // queries: rotate the rope part of every head in place of a copy
  const Tensor q = q_lora_ ? linear(ctx.q_latent_normed, *q_b_proj_) : linear(x, *q_proj_);
  ctx.q_states = q.view({T * heads_, qk_dim});
  Tensor q_pe = empty_like(x, {T * heads_, rope_dim_});
  ops::copy_columns(ctx.q_states, nope_dim_, q_pe);
  Tensor q_pe_rotated = empty_like(x, {T, heads_, rope_dim_});
  ops::rope_forward(q_pe.view({T, heads_, rope_dim_}), seq.positions, seq.rope, q_pe_rotated);
  ops::set_columns(ctx.q_states, nope_dim_, q_pe_rotated.view({T * heads_, rope_dim_}));

  // keys and values: per-head k_nope and v from the latent, one rotated rope key for all heads
  const Tensor kv = linear(ctx.kv_latent_normed, *kv_b_proj_).view({T * heads_, nope_dim_ + v_dim_});
  Tensor k_nope = empty_like(x, {T * heads_, nope_dim_});
  ctx.v_states = empty_like(x, {T * heads_, v_dim_});
  ops::copy_columns(kv, 0, k_nope);
  ops::copy_columns(kv, nope_dim_, ctx.v_states);
  Tensor k_pe_rotated = empty_like(x, {T, 1, rope_dim_});
  ops::rope_forward(ctx.k_pe.view({T, 1, rope_dim_}), seq.positions, seq.rope, k_pe_rotated);
  ctx.k_states = empty_like(x, {T * heads_, qk_dim});
  ops::set_columns(ctx.k_states, 0, k_nope);
  Tensor k_rows = ctx.k_states.view({T, heads_ * qk_dim});
  const Tensor k_pe_2d = k_pe_rotated.view({T, rope_dim_});
  for (int64_t h = 0; h < heads_; ++h) ops::set_columns(k_rows, h * qk_dim + nope_dim_, k_pe_2d);
  if (bf16_core()) {  // the stored attention inputs become bf16 tensors (rotated q and k rounded here)
    ctx.q_states = ctx.q_states.to(DType::bf16);
    ctx.k_states = ctx.k_states.to(DType::bf16);
    ctx.v_states = ctx.v_states.to(DType::bf16);
  }
}

Tensor Mla::forward(const Tensor& x, const SequenceInfo& seq, MlaContext& ctx) const {
  const int64_t T = x.dim(0);
  project_down(x, ctx);
  project_up(x, seq, ctx);
  const DType core = ctx.q_states.dtype();  // bf16 with bf16 activations, else the compute dtype
  ctx.attn_out = Tensor::empty({seq.batch, seq.seq_len, heads_, v_dim_}, core, x.device());
  ctx.lse = Tensor::empty({seq.batch, heads_, seq.seq_len}, core == DType::bf16 ? DType::f32 : core, x.device());
  ops::attention_forward(
      attention_4d(ctx.q_states, seq, nope_dim_ + rope_dim_), attention_4d(ctx.k_states, seq, nope_dim_ + rope_dim_),
      attention_4d(ctx.v_states, seq, v_dim_), softmax_scale_, seq.segment_ids, ctx.attn_out, ctx.lse);
  // o_proj is row-parallel: each TP rank's heads add their part (this rank's tokens of the sum
  // under sequence parallelism)
  Tensor y = sum_over_tp(parallel_, linear(in_dtype(ctx.attn_out, x.dtype()).view({T, heads_ * v_dim_}), *o_proj_));
  if (recompute_.rmsnorm) {
    ctx.q_latent_normed = Tensor();
    ctx.kv_latent_normed = Tensor();
  }
  if (recompute_.mla_up_proj) {
    ctx.q_states = Tensor();
    ctx.k_states = Tensor();
    ctx.v_states = Tensor();
  }
  return y;
}

void Mla::recompute(const Tensor& x, const SequenceInfo& seq, MlaContext& ctx) const {
  if (!ctx.kv_latent_normed.defined()) {
    ctx.kv_latent_normed = kv_a_norm_.forward(ctx.kv_latent, ctx.kv_norm);
    if (q_lora_) ctx.q_latent_normed = q_a_norm_->forward(ctx.q_latent, ctx.q_norm);
  }
  if (!ctx.q_states.defined()) project_up(x, seq, ctx);
}

Tensor Mla::backward_input(const Tensor& x, const Tensor& dy, const SequenceInfo& seq, MlaContext& ctx) const {
  const int64_t T = x.dim(0), qk_dim = nope_dim_ + rope_dim_;
  recompute(x, seq, ctx);
  ctx.d_o_proj = dy;
  // The attention core's gradients have its dtype (bf16 with bf16 activations); the rest of the
  // backward runs in the compute dtype.
  const DType core = ctx.q_states.dtype();
  const Tensor d_attn = in_dtype(linear_input_grad(dy, *o_proj_), core);
  Tensor dq_core = Tensor::empty(ctx.q_states.shape(), core, x.device());
  Tensor dk_core = Tensor::empty(ctx.k_states.shape(), core, x.device());
  Tensor dv_core = Tensor::empty(ctx.v_states.shape(), core, x.device());
  Tensor dq4 = attention_4d(dq_core, seq, qk_dim), dk4 = attention_4d(dk_core, seq, qk_dim),
         dv4 = attention_4d(dv_core, seq, v_dim_);
  ops::attention_backward(attention_4d(ctx.q_states, seq, qk_dim), attention_4d(ctx.k_states, seq, qk_dim),
                          attention_4d(ctx.v_states, seq, v_dim_), ctx.attn_out, ctx.lse,
                          attention_4d(d_attn, seq, v_dim_), softmax_scale_, seq.segment_ids, dq4, dk4, dv4);
  ctx.q_states = ctx.k_states = ctx.v_states = ctx.lse = Tensor();
  Tensor dq_states = in_dtype(dq_core, x.dtype());
  const Tensor dk_states = in_dtype(dk_core, x.dtype()), dv_states = in_dtype(dv_core, x.dtype());

  // queries: un-rotate the rope part's gradient
  Tensor dq_pe_rotated = empty_like(x, {T * heads_, rope_dim_});
  ops::copy_columns(dq_states, nope_dim_, dq_pe_rotated);
  Tensor dq_pe = empty_like(x, {T, heads_, rope_dim_});
  ops::rope_backward(dq_pe_rotated.view({T, heads_, rope_dim_}), seq.positions, seq.rope, dq_pe);
  ops::set_columns(dq_states, nope_dim_, dq_pe.view({T * heads_, rope_dim_}));
  ctx.d_q = dq_states.view({T, heads_ * qk_dim});

  // keys and values: [dk_nope, dv] per head for kv_b_proj; the shared rope key sums over heads
  ctx.d_kv_b = empty_like(x, {T * heads_, nope_dim_ + v_dim_});
  Tensor dk_nope = empty_like(x, {T * heads_, nope_dim_});
  ops::copy_columns(dk_states, 0, dk_nope);
  ops::set_columns(ctx.d_kv_b, 0, dk_nope);
  ops::set_columns(ctx.d_kv_b, nope_dim_, dv_states);
  ctx.d_kv_b = ctx.d_kv_b.view({T, heads_ * (nope_dim_ + v_dim_)});
  const Tensor dk_rows = dk_states.view({T, heads_ * qk_dim});
  Tensor dk_pe_rotated = Tensor::zeros({T, rope_dim_}, x.dtype(), x.device());
  Tensor dk_pe_head = empty_like(x, {T, rope_dim_});
  for (int64_t h = 0; h < heads_; ++h) {
    ops::copy_columns(dk_rows, h * qk_dim + nope_dim_, dk_pe_head);
    ops::add_(dk_pe_rotated, dk_pe_head);
  }

  // down-projections (their inputs' gradients summed over the TP ranks' heads first)
  Tensor d_kv_normed = linear_input_grad(ctx.d_kv_b, *kv_b_proj_);
  Tensor d_q_normed = q_lora_ ? linear_input_grad(ctx.d_q, *q_b_proj_) : Tensor();
  sum_latent_grads_over_tp(d_kv_normed, dk_pe_rotated, d_q_normed);
  Tensor dk_pe = empty_like(x, {T, 1, rope_dim_});
  ops::rope_backward(dk_pe_rotated.view({T, 1, rope_dim_}), seq.positions, seq.rope, dk_pe);
  const Tensor d_kv_latent = kv_a_norm_.backward_input(ctx.kv_latent, d_kv_normed, ctx.kv_norm);
  ctx.d_kv_a = empty_like(x, {T, kv_lora_rank_ + rope_dim_});
  ops::set_columns(ctx.d_kv_a, 0, d_kv_latent);
  ops::set_columns(ctx.d_kv_a, kv_lora_rank_, dk_pe.view({T, rope_dim_}));
  Tensor dx = linear_input_grad(ctx.d_kv_a, *kv_a_proj_);
  if (q_lora_) {
    ctx.d_q_a = q_a_norm_->backward_input(ctx.q_latent, d_q_normed, ctx.q_norm);
    ops::add_(dx, linear_input_grad(ctx.d_q_a, *q_a_proj_));
  } else {
    Tensor dx_q = linear_input_grad(ctx.d_q, *q_proj_);  // q_proj is column-parallel: a part per TP rank
    all_reduce_over_tp(parallel_, dx_q);
    ops::add_(dx, dx_q);
  }
  return own_tokens(parallel_, dx);  // complete on every rank: under sequence parallelism, this rank's rows
}

void Mla::sum_latent_grads_over_tp(Tensor& d_kv_normed, Tensor& dk_pe_rotated, Tensor& d_q_normed) const {
  if (parallel_.tp_size() == 1) return;
  const int64_t T = d_kv_normed.dim(0), q_cols = d_q_normed.defined() ? d_q_normed.dim(1) : 0;
  Tensor packed = empty_like(d_kv_normed, {T, kv_lora_rank_ + rope_dim_ + q_cols});
  ops::set_columns(packed, 0, d_kv_normed);
  ops::set_columns(packed, kv_lora_rank_, dk_pe_rotated);
  if (q_cols > 0) ops::set_columns(packed, kv_lora_rank_ + rope_dim_, d_q_normed);
  all_reduce_over_tp(parallel_, packed);
  ops::copy_columns(packed, 0, d_kv_normed);
  ops::copy_columns(packed, kv_lora_rank_, dk_pe_rotated);
  if (q_cols > 0) ops::copy_columns(packed, kv_lora_rank_ + rope_dim_, d_q_normed);
}

void Mla::backward_weight(const Tensor& x, MlaContext& ctx) const {
  const int64_t T = x.dim(0);
  linear_weight_grad(ctx.d_o_proj, in_dtype(ctx.attn_out, x.dtype()).view({T, heads_ * v_dim_}), *o_proj_);
  linear_weight_grad(ctx.d_kv_b, ctx.kv_latent_normed, *kv_b_proj_);
  kv_a_norm_.backward_weight(ctx.kv_latent, ctx.kv_norm);
  linear_weight_grad(ctx.d_kv_a, x, *kv_a_proj_);
  if (q_lora_) {
    linear_weight_grad(ctx.d_q, ctx.q_latent_normed, *q_b_proj_);
    q_a_norm_->backward_weight(ctx.q_latent, ctx.q_norm);
    linear_weight_grad(ctx.d_q_a, x, *q_a_proj_);
  } else {
    linear_weight_grad(ctx.d_q, x, *q_proj_);
  }
  ctx = {};
}

}  // namespace dsx
