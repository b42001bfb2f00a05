#include "trainer/model/mtp.h"

#include <string>
#include <utility>

#include "kernels/ops/elementwise.h"

namespace dsx {

MtpModule::MtpModule(ParameterStore& params, int64_t layer, const ModelConfig& config, const RecomputePolicy& recompute,
                     Parameter& head_weight, const ModelParallel& parallel)
    : hidden_(config.hidden_size),
      enorm_(params.at("model.layers." + std::to_string(layer) + ".enorm.weight"), config.rms_norm_eps),
      hnorm_(params.at("model.layers." + std::to_string(layer) + ".hnorm.weight"), config.rms_norm_eps),
      eh_proj_(&params.at("model.layers." + std::to_string(layer) + ".eh_proj.weight")),
      block_(params, layer, config, recompute, parallel),
      head_(params.at("model.layers." + std::to_string(layer) + ".shared_head.norm.weight"), head_weight,
            config.rms_norm_eps, parallel) {}

void MtpModule::forward(const Tensor& h_prev, const SequenceInfo& seq, MtpContext& ctx) {
  ctx.concat = empty_like(h_prev, {h_prev.dim(0), 2 * hidden_});
  ops::set_columns(ctx.concat, 0, enorm_.forward(ctx.embedded, ctx.enorm));
  ops::set_columns(ctx.concat, hidden_, hnorm_.forward(h_prev, ctx.hnorm));
  ctx.block_in = linear(ctx.concat, *eh_proj_);
  ctx.block_out = block_.forward(ctx.block_in, seq, ctx.block);
  head_.forward(ctx.block_out, ctx.targets, ctx.head);
}

Tensor MtpModule::backward_input(const Tensor& h_prev, double loss_grad, const Tensor& d_normed_extra,
                                 const SequenceInfo& seq, double loss_scale, MtpContext& ctx) {
  const Tensor d_block_out = head_.backward_input(ctx.block_out, loss_grad, d_normed_extra, ctx.head);
  ctx.d_block_in = block_.backward_input(ctx.block_in, d_block_out, seq, loss_scale, ctx.block);
  const Tensor d_concat = linear_input_grad(ctx.d_block_in, *eh_proj_);
  Tensor d_e_normed = empty_like(d_concat, {d_concat.dim(0), hidden_});
  Tensor d_h_normed = empty_like(d_concat, {d_concat.dim(0), hidden_});
  ops::copy_columns(d_concat, 0, d_e_normed);
  ops::copy_columns(d_concat, hidden_, d_h_normed);
  ctx.d_embedded = enorm_.backward_input(ctx.embedded, d_e_normed, ctx.enorm);
  return hnorm_.backward_input(h_prev, d_h_normed, ctx.hnorm);
}

Tensor MtpModule::backward_weight(const Tensor& h_prev, MtpContext& ctx) const {
  head_.backward_weight(ctx.block_out, ctx.head);
  block_.backward_weight(ctx.block_in, ctx.block);
  linear_weight_grad(ctx.d_block_in, ctx.concat, *eh_proj_);
  hnorm_.backward_weight(h_prev, ctx.hnorm);
  enorm_.backward_weight(ctx.embedded, ctx.enorm);
  Tensor d_embedded = std::move(ctx.d_embedded);
  ctx = {};
  return d_embedded;
}

}  // namespace dsx
