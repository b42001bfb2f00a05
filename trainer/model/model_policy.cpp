// The policy view of the model for RL (model.h, "Policy log-probabilities"): per-token
// log-probabilities and entropies of the main head, and a backward driven by an arbitrary
// per-token gradient d objective / d logp (GRPO weights every token by its advantage and
// importance ratio, which the mean cross-entropy of Model::backward cannot express).
//
// The forward is Model::forward's trunk (embedding, layers, final norm and head) without the
// MTP modules; the backward replaces the head's uniform cross-entropy gradient by
//   d logits[t] = −g_t · (softmax(logits[t]) − onehot(target_t)),   g_t = d objective / d logp_t
// (ops::cross_entropy_backward_weighted) and then runs the head, layers and embedding exactly
// as Model::backward does.
#include <stdexcept>
#include <string>

#include "kernels/ops/cross_entropy.h"
#include "trainer/model/model.h"

namespace dsx {
Model::PolicyOutput Model::policy_forward(const Batch& batch) {
  require_whole_model("Model::policy_forward");
  if (parallel_.tp_size() >
      1) {  // token_logprobs would need the vocab-parallel log-sum-exp (the GRPO stage refuses tp)
    throw std::invalid_argument(
        "Model::policy_forward: not built for tensor parallelism (tp = " + std::to_string(parallel_.tp_size()) + ")");
  }
  PolicyOutput out;
  MicroBatch& mb = start_micro_batch(0, 0, batch, "Model::policy_forward");
  const int64_t B = mb.seq.batch, S = mb.seq.seq_len, T = mb.seq.tokens();
  mb.ids = on_device(batch.inputs.view({T}));
  out.balance = forward_layers(mb, embedding_->forward(mb.ids));
  head_->forward(mb.hidden.back(), on_device(batch.targets.view({T})), mb.head);
  out.tokens = mb.head.ce.count;
  // Computed where the logits are; returned on the host (the RL loop's arithmetic is host code).
  Tensor logp = Tensor::empty({T}, DType::f64, mb.head.logits.device());
  Tensor entropy = Tensor::empty({T}, DType::f64, mb.head.logits.device());
  ops::token_logprobs(mb.head.logits, mb.head.targets, mb.head.lse, OutputHead::kIgnoreIndex, logp, entropy);
  out.logp = logp.to(Device::cpu).view({B, S});
  out.entropy = entropy.to(Device::cpu).view({B, S});
  return out;
}

Model::PolicyOutput Model::policy_logprobs(const Batch& batch) {
  PolicyOutput out = policy_forward(batch);
  micro_batches_.erase({0, 0});
  return out;
}

void Model::policy_backward(const Tensor& grad_logp, double balance_scale) {
  require_whole_model("Model::policy_backward");
  MicroBatch& mb = micro_batch(0, 0, "Model::policy_backward");
  const int64_t T = mb.seq.tokens(), L = config_.num_hidden_layers;
  check_shape(grad_logp, {mb.seq.batch, mb.seq.seq_len}, "Model::policy_backward", "grad_logp");
  HeadContext& head = mb.head;
  if (!head.logits.defined()) throw std::logic_error("Model::policy_backward: the last forward kept no logits");

  // The MTP modules took no part: their gradients are complete as they are.
  for (size_t k = 0; k < mtp_.size(); ++k) grads_ready(layer_params_[static_cast<size_t>(L) + k]);

  Tensor row_scale = Tensor::empty({T}, DType::f64);
  const std::vector<double> g = grad_logp.to_vector();
  double* scale = row_scale.data<double>();
  for (int64_t t = 0; t < T; ++t) scale[t] = -g[static_cast<size_t>(t)];

  // The head's backward with per-row weights; the same steps as OutputHead::backward_input and
  // backward_weight (its norm and projection are the parameters below).
  Parameter& head_weight = params_.at(config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  const RmsNorm final_norm(params_.at("model.norm.weight"), config_.rms_norm_eps);
  head.d_logits = empty_like(head.logits, head.logits.shape());
  ops::cross_entropy_backward_weighted(head.logits, head.targets, head.lse, OutputHead::kIgnoreIndex,
                                       on_device(row_scale), head.d_logits);
  head.logits = Tensor();
  head.lse = Tensor();
  const Tensor d_normed = linear_input_grad(head.d_logits, head_weight);
  Tensor dh = final_norm.backward_input(mb.hidden.back(), d_normed, head.norm);
  linear_weight_grad(head.d_logits, head.normed, head_weight);
  final_norm.backward_weight(mb.hidden.back(), head.norm);
  head = {};
  grads_ready(head_params_);

  backward_layers(mb, dh, balance_scale);
  backward_embedding(mb, dh, Tensor());
  micro_batches_.erase({0, 0});
}

}  // namespace dsx
