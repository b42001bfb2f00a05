// One pre-norm decoder layer:
//   mid = x + attention(input_layernorm(x))
//   out = mid + ffn(post_attention_layernorm(mid))      ffn: dense SwiGLU MLP or MoE
#pragma once
#include <cstdint>
#include <optional>

#include "trainer/model/layers.h"
#include "trainer/model/mla.h"
#include "trainer/model/moe.h"

namespace dsx {

struct DecoderLayerContext {
  RmsNormContext input_norm, post_attention_norm;
  Tensor attn_in;  // input_layernorm(x)           (dropped with recompute.rmsnorm)
  Tensor mid;      // x + attention
  Tensor ffn_in;   // post_attention_layernorm(mid) (dropped with recompute.rmsnorm)
  // Sequence parallelism: attn_in and ffn_in of all the TP ranks' tokens (the blocks' inputs),
  // gathered again by backward_input for backward_weight; without it the same tensors as above.
  Tensor attn_in_all, ffn_in_all;
  MlaContext attn;
  MlpContext mlp;
  MoeContext moe;
  double balance_loss = 0;  // this layer's sequence-wise balance loss (MoE with α > 0)
};

class DecoderLayer {
 public:
  DecoderLayer(ParameterStore& params, int64_t layer, const ModelConfig& config, const RecomputePolicy& recompute,
               const ModelParallel& parallel = {});
  // Returns the output; ctx.balance_loss holds the layer's balance loss. record_load: count the
  // routed tokens into the MoE load that drives the router-bias update (false for inference).
  Tensor forward(const Tensor& x, const SequenceInfo& seq, DecoderLayerContext& ctx, bool record_load = true);
  Tensor backward_input(const Tensor& x, const Tensor& dy, const SequenceInfo& seq, double loss_scale,
                        DecoderLayerContext& ctx);
  void backward_weight(const Tensor& x, DecoderLayerContext& ctx) const;

  Moe* moe() { return moe_ ? &*moe_ : nullptr; }
  const Moe* moe() const { return moe_ ? &*moe_ : nullptr; }

 private:
  Tensor run_forward(const Tensor& x, const SequenceInfo& seq, DecoderLayerContext& ctx, bool record_load);
  Tensor ffn_forward(const Tensor& h, const SequenceInfo& seq, DecoderLayerContext& ctx, bool record_load);

  RecomputePolicy recompute_;
  RmsNorm input_norm_, post_attention_norm_;
  Mla attention_;
  bool bf16_residual_;  // round the residual stream to bf16 (precision.activations: bf16)
  ModelParallel parallel_;
  std::optional<Mlp> mlp_;  // dense layers (split over TP by their intermediate width)
  std::optional<Moe> moe_;  // MoE layers
};

}  // namespace dsx
