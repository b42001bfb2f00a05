// Multi-token prediction module k (DEEPSEEK_FACTS.md "MTP"), at layer index L + k - 1:
//
//   u   = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_{k-1,i})])      eh_proj: [D, 2D]
//   h_k = decoder block(u)
//   logits_k = head(shared_head.norm(h_k))   predicting t_{i+k+1}
//
// The concatenation order (embedding first) is that of the released DeepSeek-V3 weights as
// vLLM/SGLang load them. h_{k-1} is the representation that feeds the previous depth's output
// head: the main model's final-norm output for k = 1, module k-1's shared_head.norm output
// after that. The embedding and the output head are the main model's, shared. The model looks up
// Emb(t_{i+k}) itself (under pipeline parallelism the table lives on another stage) and hands it
// in as ctx.embedded; backward_weight returns its gradient for the model to apply.
#pragma once
#include <cstdint>

#include "trainer/model/decoder_layer.h"
#include "trainer/model/layers.h"

namespace dsx {

struct MtpContext {
  Tensor targets;  // [T] targets shifted by k (positions past the end hold -100)
  RmsNormContext enorm, hnorm;
  Tensor embedded;   // [T, D] Emb(tokens shifted by k), set by the caller; enorm's input
  Tensor concat;     // [T, 2D]: eh_proj's input
  Tensor block_in;   // eh_proj output
  Tensor block_out;  // the head's input
  DecoderLayerContext block;
  HeadContext head;
  Tensor d_embedded;  // d loss / d embedded, computed by backward_input
  Tensor d_block_in;  // kept by backward_input for eh_proj's gradient
};

class MtpModule {
 public:
  MtpModule(ParameterStore& params, int64_t layer, const ModelConfig& config, const RecomputePolicy& recompute,
            Parameter& head_weight, const ModelParallel& parallel = {});
  // h_prev [T, D]; ctx.embedded and ctx.targets must be set. The loss is in ctx.head.ce.
  void forward(const Tensor& h_prev, const SequenceInfo& seq, MtpContext& ctx);
  // Returns the gradient for h_prev. loss_grad as for OutputHead; d_normed_extra: gradient from
  // module k+1 reaching this module's head-norm output (undefined for the last module).
  Tensor backward_input(const Tensor& h_prev, double loss_grad, const Tensor& d_normed_extra, const SequenceInfo& seq,
                        double loss_scale, MtpContext& ctx);
  // Accumulates the module's weight gradients, ends the micro-batch (ctx is cleared) and returns
  // the gradient of ctx.embedded, for the embedding table.
  Tensor backward_weight(const Tensor& h_prev, MtpContext& ctx) const;

  DecoderLayer& block() { return block_; }
  const DecoderLayer& block() const { return block_; }

 private:
  int64_t hidden_;
  RmsNorm enorm_, hnorm_;
  Parameter* eh_proj_;
  DecoderLayer block_;
  OutputHead head_;
};

}  // namespace dsx
