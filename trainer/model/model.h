// The DeepSeek-V3 family model (ARCHITECTURE.md §3): embedding, first_k_dense_replace dense
// layers then MoE layers, final norm and output head (tied or untied), and
// num_nextn_predict_layers MTP modules sharing the embedding and the head.
//
// The training loop drives it one micro-batch at a time:
//   Losses l = model.forward(batch);     // keeps what backward needs
//   model.backward(loss_scale);          // grads of loss_scale · l.total accumulate (+=) into
//                                        // parameters().grad; per module backward_input then
//                                        // backward_weight, last module first
//   ... after the step: model.update_router_biases(gamma);
//
// Expert parallelism (ModelParallel, trainer/model/expert_parallel.h): the store holds only this
// EP rank's routed experts, and the MoE layers exchange tokens over the EP group.
//
// Loss: total = lm + λ · mtp + balance, with lm the token-mean cross entropy of the next token
// (targets equal to -100 are ignored), mtp = (1/D) Σ_k mtp_k where depth k reads the inputs
// shifted by k and predicts the targets shifted by k (positions without a target ignored), and
// balance the sum over MoE layers (MTP blocks included) of the sequence-wise balance losses.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

#include "kernels/tensor.h"
#include "trainer/model/config.h"
#include "trainer/model/decoder_layer.h"
#include "trainer/model/expert_parallel.h"
#include "trainer/model/layers.h"
#include "trainer/model/moe.h"
#include "trainer/model/mtp.h"
#include "trainer/model/parameters.h"
#include "trainer/model/precision.h"
#include "trainer/model/recompute.h"
#include "trainer/model/sequence.h"

namespace dsx {

struct Batch {
  Tensor inputs, targets, segment_ids;  // [B, S] i32 each; segment_ids may be undefined
};

struct Losses {
  double total = 0;
  double lm = 0;
  double mtp = 0;  // mean over the MTP depths of their token-mean losses (before λ)
  double balance = 0;
  int64_t tokens = 0;  // tokens counted by the LM loss
};

struct ExpertLoadStats {
  std::vector<ExpertLoad> layers;  // one per MoE layer, MTP blocks included, in layer order
};

class Model {
 public:
  // precision: FP8 GEMMs / bf16 activations (trainer/model/precision.h); the default is full
  // precision. A non-default policy needs compute dtype f32 (throws std::invalid_argument).
  // device: where parameters, activations and every op live (cuda needs a CUDA build; batches
  // may stay on the host, the model moves them).
  Model(const ModelConfig& config, DType compute_dtype, uint64_t seed, RecomputePolicy recompute = {},
        const PrecisionPolicy& precision = {}, const ModelParallel& parallel = {}, Device device = Device::cpu);
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  ParameterStore& parameters() { return params_; }
  const ParameterStore& parameters() const { return params_; }
  const ModelConfig& config() const { return config_; }

  Losses forward(const Batch& batch);
  Tensor logits(const Batch& batch);  // [B·S, vocab] full-forward logits of the main head, no state kept
  void backward(double loss_scale);
  // Called by backward for every trainable parameter as soon as its gradient for this backward
  // is complete (last module first; the shared embedding and head once nothing else adds to
  // them), so data parallelism can start reducing while the backward goes on. Empty = none.
  void set_grad_ready_hook(std::function<void(Parameter&)> hook) { grad_ready_hook_ = std::move(hook); }
  void update_router_biases(double gamma);
  ExpertLoadStats expert_load() const;
  // Model FLOPs per token of one training step (model_flops_per_token in param_count.h) at the
  // sequence length of the last forward (attention counted as 0 before any forward).
  double flops_per_token() const { return flops_per_token_; }

  // The experts chosen in the last forward, one [T, K] i32 tensor per MoE layer (MTP included):
  // gradient checks use it to confirm a perturbation did not change the routing.
  std::vector<Tensor> routing() const;

  // ---- Policy log-probabilities for RL (GRPO; defined in model_policy.cpp) ----
  // policy_forward runs embedding, layers and the main head (not the MTP modules) on `batch` and
  // returns, per position, log π(targets[b, s] | inputs[b, ≤ s]) = −(cross entropy of the main
  // head) and the entropy of the next-token distribution, both 0 where the target is -100. It
  // keeps what policy_backward needs, in place of a forward's.
  struct PolicyOutput {
    Tensor logp;         // [B, S] f64
    Tensor entropy;      // [B, S] f64
    int64_t tokens = 0;  // positions with a target
    double balance = 0;  // sum of the MoE layers' sequence-wise balance losses
  };
  PolicyOutput policy_forward(const Batch& batch);
  // Accumulates (+=) into parameters().grad the gradient of Σ grad_logp[b, s] · logp[b, s]
  // (grad_logp: [B, S], f32 or f64, d objective / d logp of the last policy_forward) plus
  // balance_scale times the balance losses'. MTP parameters get no gradient.
  void policy_backward(const Tensor& grad_logp, double balance_scale = 0.0);
  // policy_forward's outputs without keeping anything for a backward (reference models, π_old).
  PolicyOutput policy_logprobs(const Batch& batch);

 private:
  // Everything one micro-batch keeps between forward and backward.
  struct MicroBatch {
    SequenceInfo seq;
    Tensor ids;                  // [T]
    std::vector<Tensor> hidden;  // hidden[l]: input of layer l; hidden[L]: the last layer's output
    std::vector<DecoderLayerContext> layers;
    HeadContext head;
    std::vector<MtpContext> mtp;
  };

  SequenceInfo sequence_info(const Batch& batch);
  Tensor on_device(const Tensor& t) const;  // t on the model's device (undefined stays undefined)
  double forward_trunk(const Batch& batch, const char* op);
  void backward_trunk(Tensor dh, double balance_scale);
  void prepare_mtp_inputs(const Batch& batch, int64_t depth, MtpContext& ctx) const;
  std::vector<Moe*> moe_layers();
  std::vector<const Moe*> moe_layers() const;

  ModelConfig config_;
  DType dtype_;
  ParameterStore params_;
  std::optional<Embedding> embedding_;
  std::vector<DecoderLayer> layers_;
  std::optional<OutputHead> head_;
  std::vector<MtpModule> mtp_;
  ops::RopeTable rope_;
  int64_t rope_positions_ = 0;
  int64_t last_seq_len_ = 0;
  double flops_per_token_ = 0;
  std::optional<MicroBatch> micro_batch_;
  std::function<void(Parameter&)> grad_ready_hook_;
  // Trainable parameters by the module whose backward_weight completes their gradient.
  std::vector<Parameter*> embedding_params_, head_params_;
  std::vector<std::vector<Parameter*>> layer_params_;  // main layers, then the MTP modules
  void group_params_by_module();
  void grads_ready(const std::vector<Parameter*>& params) const;
};

}  // namespace dsx
