#include "trainer/model/decoder_layer.h"

#include <string>

#include "kernels/ops/elementwise.h"
#include "trainer/model/precision.h"

namespace dsx {

namespace {
std::string layer_prefix(int64_t layer) {
  return "model.layers." + std::to_string(layer) + ".";
}
}  // namespace

DecoderLayer::DecoderLayer(ParameterStore& params, int64_t layer, const ModelConfig& config,
                           const RecomputePolicy& recompute, const ModelParallel& parallel)
    : recompute_(recompute),
      input_norm_(params.at(layer_prefix(layer) + "input_layernorm.weight"), config.rms_norm_eps),
      post_attention_norm_(params.at(layer_prefix(layer) + "post_attention_layernorm.weight"), config.rms_norm_eps),
      attention_(params, layer_prefix(layer) + "self_attn.", config, recompute, parallel),
      bf16_residual_(params.at(layer_prefix(layer) + "input_layernorm.weight").precision.bf16_output),
      parallel_(parallel) {
  const std::string p = layer_prefix(layer) + "mlp.";
  if (config.is_moe_layer(layer)) {
    moe_.emplace(params, p, layer, config, recompute, parallel);
  } else {
    mlp_.emplace(params.at(p + "gate_proj.weight"), params.at(p + "up_proj.weight"), params.at(p + "down_proj.weight"),
                 /*recompute_act=*/false);
  }
}

Tensor DecoderLayer::ffn_forward(const Tensor& h, const SequenceInfo& seq, DecoderLayerContext& ctx, bool record_load) {
  const Tensor h_all = gather_tokens(parallel_, h);  // sequence parallelism: every TP rank's tokens
  if (moe_) {
    Tensor y = moe_->forward(h_all, seq, ctx.moe, record_load);
    ctx.balance_loss = ctx.moe.balance_loss;
    return y;
  }
  Tensor y = empty_like(h_all, h_all.shape());
  mlp_->forward(h_all, ctx.mlp, y);
  ctx.balance_loss = 0;
  return sum_over_tp(parallel_, y);  // down_proj is row-parallel
}

Tensor DecoderLayer::run_forward(const Tensor& x, const SequenceInfo& seq, DecoderLayerContext& ctx, bool record_load) {
  ctx.attn_in = input_norm_.forward(x, ctx.input_norm);
  ctx.mid = attention_.forward(gather_tokens(parallel_, ctx.attn_in), seq, ctx.attn);
  ops::add_(ctx.mid, x);
  if (bf16_residual_) round_to_bf16_(ctx.mid);  // the residual stream is a stored activation too
  ctx.ffn_in = post_attention_norm_.forward(ctx.mid, ctx.post_attention_norm);
  Tensor out = ffn_forward(ctx.ffn_in, seq, ctx, record_load);
  ops::add_(out, ctx.mid);
  if (bf16_residual_) round_to_bf16_(out);
  return out;
}

Tensor DecoderLayer::forward(const Tensor& x, const SequenceInfo& seq, DecoderLayerContext& ctx, bool record_load) {
  Tensor out = run_forward(x, seq, ctx, record_load);
  if (recompute_.full) {
    const double balance_loss = ctx.balance_loss;
    ctx = {};  // only x (owned by the caller) survives until backward
    ctx.balance_loss = balance_loss;
  } else if (recompute_.rmsnorm) {
    ctx.attn_in = Tensor();
    ctx.ffn_in = Tensor();
  }
  return out;
}

Tensor DecoderLayer::backward_input(const Tensor& x, const Tensor& dy, const SequenceInfo& seq, double loss_scale,
                                    DecoderLayerContext& ctx) {
  if (!ctx.mid.defined()) {
    run_forward(x, seq, ctx, /*record_load=*/false);  // full recompute: the same ops on the same input
  } else if (!ctx.attn_in.defined()) {
    ctx.attn_in = input_norm_.forward(x, ctx.input_norm);
    ctx.ffn_in = post_attention_norm_.forward(ctx.mid, ctx.post_attention_norm);
  }
  ctx.attn_in_all = gather_tokens(parallel_, ctx.attn_in);
  ctx.ffn_in_all = gather_tokens(parallel_, ctx.ffn_in);
  const Tensor dy_all = gather_tokens(parallel_, dy);
  Tensor d_ffn_in;
  if (moe_) {
    d_ffn_in = moe_->backward_input(dy_all, seq, loss_scale, ctx.moe);
  } else {
    Tensor d_ffn_in_all = empty_like(dy_all, dy_all.shape());
    mlp_->backward_input(dy_all, ctx.mlp, d_ffn_in_all);
    d_ffn_in = sum_over_tp(parallel_, d_ffn_in_all);  // gate_proj and up_proj are column-parallel
  }
  Tensor d_mid = post_attention_norm_.backward_input(ctx.mid, d_ffn_in, ctx.post_attention_norm);
  ops::add_(d_mid, dy);  // residual
  const Tensor d_attn_in = attention_.backward_input(ctx.attn_in_all, gather_tokens(parallel_, d_mid), seq, ctx.attn);
  Tensor dx = input_norm_.backward_input(x, d_attn_in, ctx.input_norm);
  ops::add_(dx, d_mid);  // residual
  return dx;
}

void DecoderLayer::backward_weight(const Tensor& x, DecoderLayerContext& ctx) const {
  if (moe_) {
    moe_->backward_weight(ctx.ffn_in_all, ctx.moe);
  } else {
    mlp_->backward_weight(ctx.ffn_in_all, ctx.mlp);
  }
  post_attention_norm_.backward_weight(ctx.mid, ctx.post_attention_norm);
  attention_.backward_weight(ctx.attn_in_all, ctx.attn);
  input_norm_.backward_weight(x, ctx.input_norm);
  ctx = {};
}

}  // namespace dsx
