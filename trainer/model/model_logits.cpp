// Model::logits (model.h): the logits of the main head at every position, for references and
// tools (the KV-cached generator is tested against it). It runs the very modules Model::forward
// runs (embedding, decoder layers, the output head) with contexts local to the call, so a
// forward/backward pair in progress is left untouched and nothing is kept. Unlike a training
// forward, the MoE layers do not count these tokens into their expert loads, so looking at the
// model never moves its router biases.
#include <stdexcept>
#include <string>

#include "trainer/model/model.h"

namespace dsx {

namespace {

void check_ids(const Tensor& t, const char* name) {
  if (!t.defined() || t.ndim() != 2 || t.dtype() != DType::i32) {
    throw std::invalid_argument(std::string("Model::logits: batch.") + name + " must be a [B, S] i32 tensor, got " +
                                (t.defined() ? t.describe() : std::string("undefined")));
  }
}

}  // namespace

Tensor Model::logits(const Batch& batch) {
  require_whole_model("Model::logits");
  check_ids(batch.inputs, "inputs");  // targets are not needed
  if (batch.segment_ids.defined()) {
    check_ids(batch.segment_ids, "segment_ids");
    check_shape(batch.segment_ids, batch.inputs.shape(), "Model::logits", "batch.segment_ids");
  }
  const SequenceInfo seq = sequence_info(batch);
  const int64_t T = seq.tokens();
  Tensor h = own_tokens(parallel_, embedding_->forward(batch.inputs.view({T})));
  for (DecoderLayer& layer : layers_) {
    DecoderLayerContext ctx;
    h = layer.forward(h, seq, ctx, /*record_load=*/false);  // inference: the router loads stay untouched
  }
  // The head computes its logits on the way to the loss; with every target ignored the loss is
  // empty and the logits are all that is left.
  const Tensor no_targets = Tensor::full({T}, static_cast<double>(OutputHead::kIgnoreIndex), DType::i32);
  HeadContext head;
  head_->forward(h, no_targets, head);
  return head_->gather_logits(head);  // the whole vocabulary's under tensor parallelism
}

}  // namespace dsx
