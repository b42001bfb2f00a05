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
// Tensor parallelism (ModelParallel::tp): the store holds this TP rank's boxes of the split
// parameters (Parameter::offset); the modules sum over the TP group themselves (expert_parallel.h),
// so forward, backward and the losses are the same calls, with the same values on every TP rank.
// Under sequence parallelism the residual stream between the blocks (Model's hidden tensors,
// StageBackward's gradients) holds this rank's tp_rows of the tokens.
//
// Pipeline parallelism (ModelParallel::pp_size > 1, trainer/model/pipeline_stage.h): the model
// holds one stage's modules and parameters (two stages, its chunks, in a V-shaped layout), and the
// pipeline schedule drives it through forward_stage / backward_stage, several micro-batches in
// flight, passing the tensors they return to the neighbouring stages. forward / backward are the
// one-stage case (micro-batch 0).
//
// Loss: total = lm + λ · mtp + balance, with lm the token-mean cross entropy of the next token
// (targets equal to -100 are ignored), mtp = (1/D) Σ_k mtp_k where depth k reads the inputs
// shifted by k and predicts the targets shifted by k (positions without a target ignored), and
// balance the sum over MoE layers (MTP blocks included) of the sequence-wise balance losses.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
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
#include "trainer/model/pipeline_stage.h"
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

// What a pipeline stage's forward hands on (ModelParallel::pp_size > 1).
struct StageForward {
  Losses losses;  // this stage's part: its layers' balance losses; lm, mtp and tokens on the last
  Tensor hidden;  // all but the last stage: the output of the stage's last layer [T, D], for the next
  // the first stage of a model with MTP (when it is not also the last): Emb(tokens shifted by k)
  // for k = 1..D, [D·T, D], for the last stage's MTP modules
  Tensor mtp_embedded;
};

// What a pipeline stage's backward hands on.
struct StageBackward {
  Tensor d_hidden;        // all but the first stage: d loss / d (the stage's input), for the previous
  Tensor d_mtp_embedded;  // the last stage of a model with MTP (when not also the first), for the first
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

  const PipelineStage& stage() const { return chunks_.front(); }  // chunk 0's
  // The stages this model holds: one, two in a V-shaped layout, v in an interleaved one (chunk 0
  // first), placed by pipeline_layout().
  const std::vector<PipelineStage>& chunks() const { return chunks_; }
  PipelineLayout pipeline_layout() const {
    return {.ranks = parallel_.pp_size, .v_shape = parallel_.pp_v_shape, .interleave = parallel_.pp_interleave};
  }

  // The whole model (one pipeline stage): forward and backward of micro-batch 0.
  Losses forward(const Batch& batch);
  Tensor logits(const Batch& batch);  // [B·S, vocab] full-forward logits of the main head, no state kept
  void backward(double loss_scale);

  // One pipeline stage's part of a micro-batch. Every stage gets the micro-batch's Batch (the
  // first reads the inputs, the last the targets and, for MTP, the inputs). hidden_in: the previous
  // stage's StageForward::hidden (undefined on the first stage); mtp_embedded_in: the first stage's
  // StageForward::mtp_embedded (on the last stage of a model with MTP, pp > 1). A forward of a
  // micro-batch id that is still in flight replaces it. chunk: which of chunks() runs it. When the
  // model holds both the first and the last stage in different chunks (V-shaped, rank 0), the
  // MTP embeddings and their gradients pass between them inside the model: the first chunk's
  // forward of a micro-batch comes before the last chunk's, whose backward comes before the first's.
  StageForward forward_stage(int64_t micro_batch, const Batch& batch, const Tensor& hidden_in = {},
                             const Tensor& mtp_embedded_in = {}, int chunk = 0);
  // d_hidden_out: the next stage's StageBackward::d_hidden (undefined on the last stage);
  // d_mtp_embedded_in: the last stage's StageBackward::d_mtp_embedded (on the first stage of a
  // model with MTP, pp > 1). Ends the micro-batch.
  StageBackward backward_stage(int64_t micro_batch, double loss_scale, const Tensor& d_hidden_out = {},
                               const Tensor& d_mtp_embedded_in = {}, int chunk = 0);
  // backward_stage in two passes, for schedules that split them (zero-bubble): the input
  // gradients (what the previous stage waits for) now, the weight gradients later. Between the
  // two, the micro-batch keeps every module's context (backward_stage releases each as it goes);
  // the gradients are the same bits either way.
  StageBackward backward_stage_input(int64_t micro_batch, double loss_scale, const Tensor& d_hidden_out = {},
                                     const Tensor& d_mtp_embedded_in = {}, int chunk = 0);
  void backward_stage_weight(int64_t micro_batch, int chunk = 0);
  // The [rows, hidden_size] tensor stages exchange (compute dtype, on the model's device).
  Tensor empty_stage_tensor(int64_t rows) const;
  // The rows of a stage tensor for a micro-batch of `tokens` tokens (its MTP embeddings: D times
  // as many): tokens, or this rank's tokens/tp under sequence parallelism.
  int64_t stage_rows(int64_t tokens) const;
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
    int chunk = 0;
    SequenceInfo seq;
    Tensor ids;                  // [T] (first stage)
    Tensor mtp_ids;              // [D·T] tokens shifted by 1..D, the MTP embeddings' (first stage)
    std::vector<Tensor> hidden;  // hidden[i]: input of the stage's layer i; back(): the last one's output
    std::vector<DecoderLayerContext> layers;
    HeadContext head;
    std::vector<MtpContext> mtp;
    // between backward_stage_input and backward_stage_weight (first stage): the gradients of the
    // embedding's outputs, main input and MTP rows
    bool input_grads_done = false;
    Tensor d_embedded, d_mtp_embedded;
    // the first chunk of a model that also holds the last: the MTP embeddings for that chunk
    Tensor mtp_embedded;
  };

  SequenceInfo sequence_info(const Batch& batch);
  Tensor on_device(const Tensor& t) const;  // t on the model's device (undefined stays undefined)
  MicroBatch& start_micro_batch(int chunk, int64_t id, const Batch& batch, const char* op);
  MicroBatch& micro_batch(int chunk, int64_t id, const char* op);
  const PipelineStage& chunk_stage(int chunk, const char* op) const;
  // The model holds the first and the last stage in different chunks and has MTP modules (their
  // embeddings stay here).
  bool mtp_inside() const;
  Tensor own_mtp_rows(const Tensor& all, int64_t tokens) const;
  int first_chunk() const { return 0; }  // a V's chunk 0 holds the first stage, its chunk 1 the last
  void require_whole_model(const char* op) const;
  void check_stage_tensor(const Tensor& t, int64_t rows, const char* op, const char* name) const;
  double forward_layers(MicroBatch& mb, Tensor hidden_in);  // the stage's layers; their balance loss
  double forward_mtp(MicroBatch& mb, const Batch& batch, const Tensor& mtp_embedded);  // last stage
  StageBackward backward_pass(int chunk, int64_t id, double loss_scale, const Tensor& d_hidden_out,
                              const Tensor& d_mtp_embedded_in, bool with_weights);
  void backward_mtp(MicroBatch& mb, double loss_scale, Tensor& d_next, StageBackward& out, bool with_weights);
  void mtp_weight_grads(MicroBatch& mb, size_t k);
  void head_weight_grads(MicroBatch& mb);
  void layer_weight_grads(MicroBatch& mb, size_t i);
  void finish_weight_grads(int64_t id, MicroBatch& mb);
  bool holds_first() const { return chunks_.front().is_first(); }
  bool holds_last() const { return chunks_.back().is_last(); }
  void backward_layers(MicroBatch& mb, Tensor& dh, double balance_scale);
  void backward_embedding(MicroBatch& mb, const Tensor& dh, const Tensor& d_mtp_embedded);
  int64_t mtp_depth() const { return config_.num_nextn_predict_layers; }
  std::vector<Moe*> moe_layers();
  std::vector<const Moe*> moe_layers() const;

  ModelConfig config_;
  DType dtype_;
  ModelParallel parallel_;  // the TP group and sequence parallelism (the rest is in the modules)
  std::vector<PipelineStage> chunks_;
  ParameterStore params_;
  std::optional<Embedding> embedding_;
  std::vector<DecoderLayer> layers_;  // the chunks' decoder layers, chunk 0's first
  std::vector<int64_t> layer_index_;  // layers_[i] is decoder layer layer_index_[i]
  std::vector<size_t> chunk_begin_;   // chunk c's layers: layers_[chunk_begin_[c], chunk_begin_[c + 1])
  std::optional<OutputHead> head_;
  std::vector<MtpModule> mtp_;
  ops::RopeTable rope_;
  int64_t rope_positions_ = 0;
  int64_t last_seq_len_ = 0;
  double flops_per_token_ = 0;
  std::map<std::pair<int, int64_t>, MicroBatch> micro_batches_;  // in flight, by chunk and micro-batch id
  std::function<void(Parameter&)> grad_ready_hook_;
  // Trainable parameters by the module whose backward_weight completes their gradient.
  std::vector<Parameter*> embedding_params_, head_params_;
  std::vector<std::vector<Parameter*>> layer_params_;  // main layers, then the MTP modules
  void group_params_by_module();
  void grads_ready(const std::vector<Parameter*>& params) const;
};

}  // namespace dsx
