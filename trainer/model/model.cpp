#include "trainer/model/model.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/ops/rope.h"
#include "trainer/model/param_count.h"

namespace dsx {

namespace {

// op names the caller in messages ("Model::forward", "Model::policy_forward").
void check_batch(const Batch& b, const char* op) {
  const auto check_ids = [&](const Tensor& t, const char* name) {
    if (!t.defined() || t.ndim() != 2 || t.dtype() != DType::i32) {
      throw std::invalid_argument(std::string(op) + ": batch." + name + " must be a [B, S] i32 tensor, got " +
                                  (t.defined() ? t.describe() : std::string("undefined")));
    }
  };
  check_ids(b.inputs, "inputs");
  check_ids(b.targets, "targets");
  check_shape(b.targets, b.inputs.shape(), op, "batch.targets");
  if (b.segment_ids.defined()) {
    check_ids(b.segment_ids, "segment_ids");
    check_shape(b.segment_ids, b.inputs.shape(), op, "batch.segment_ids");
  }
}

double mean_loss(const ops::CrossEntropyResult& ce) {
  return ce.count > 0 ? ce.loss_sum / static_cast<double>(ce.count) : 0.0;
}

// d(weight · loss_sum / count)/d(loss_sum) scaled by the backward's loss scale.
double mean_loss_grad(const ops::CrossEntropyResult& ce, double weight) {
  return ce.count > 0 ? weight / static_cast<double>(ce.count) : 0.0;
}

}  // namespace

Model::Model(const ModelConfig& config, DType compute_dtype, uint64_t seed, RecomputePolicy recompute,
             const PrecisionPolicy& precision, const ModelParallel& parallel, Device device)
    : config_(config),
      dtype_(compute_dtype),
      parallel_(parallel),
      params_(compute_dtype, device),
      flops_per_token_(model_flops_per_token(config, 0)) {
  if (compute_dtype != DType::f32 && compute_dtype != DType::f64) {
    throw std::invalid_argument("Model: compute dtype must be f32 or f64, got " +
                                std::string(dtype_name(compute_dtype)));
  }
  if (compute_dtype != DType::f32 && !precision.full_precision()) {
    throw std::invalid_argument(
        "Model: FP8 GEMMs and bf16 activations need compute dtype f32 (f64 is the reference path)");
  }
  const PipelineLayout layout = pipeline_layout();
  if (parallel.pp_rank < 0 || parallel.pp_rank >= layout.ranks) {
    throw std::invalid_argument("Model: pipeline rank " + std::to_string(parallel.pp_rank) + " of " +
                                std::to_string(layout.ranks) + " does not exist");
  }
  const std::vector<int64_t> split =
      parallel.pp_layers.empty() ? even_split(config.num_hidden_layers, layout.stages()) : parallel.pp_layers;
  int64_t layers = 0;
  for (int64_t n : split) layers += n;
  if (static_cast<int>(split.size()) != layout.stages() || layers != config.num_hidden_layers) {
    throw std::invalid_argument("Model: a pipeline split of " + std::to_string(split.size()) + " stages and " +
                                std::to_string(layers) + " layers for " + std::to_string(layout.stages()) +
                                " stages of " + std::to_string(config.num_hidden_layers) + " layers");
  }
  for (int c = 0; c < layout.chunks(); ++c)
    chunks_.push_back(pipeline_stage(split, layout.stage_of(parallel.pp_rank, c)));
  if (layout.stages() > 1 && config_.tie_word_embeddings) {
    throw std::invalid_argument(
        "Model: pipeline parallelism needs an untied output head (tie_word_embeddings: false); the embedding "
        "table lives on the first stage only");
  }
  const LocalExperts local = config_.n_routed_experts > 0
                                 ? local_experts(config_.n_routed_experts, parallel.ep_size(), parallel.ep_rank())
                                 : LocalExperts{};
  const std::string layer_prefix = "model.layers.";
  const auto on_this_stage = [&](const ParamSpec& spec) {
    if (spec.name == "model.embed_tokens.weight") return holds_first() || config_.tie_word_embeddings;
    if (!spec.name.starts_with(layer_prefix)) return holds_last();  // model.norm, lm_head
    const auto layer = static_cast<int64_t>(std::stoul(spec.name.substr(layer_prefix.size())));
    if (layer >= config_.num_hidden_layers) return holds_last();  // an MTP module
    return std::ranges::any_of(
        chunks_, [&](const PipelineStage& st) { return layer >= st.first_layer && layer < st.end_layer; });
  };
  for (ParamSpec& spec : model_param_specs(config_)) {
    if (spec.shard.axis == ShardAxis::expert && !local.holds(spec.shard.expert_index)) continue;  // another EP rank's
    if (!on_this_stage(spec)) continue;  // another pipeline stage's
    params_.add(std::move(spec), TensorShard{parallel.tp_size(), parallel.tp_rank()});
  }
  params_.initialize(seed);
  // before the modules are built: they read their weights' precision
  for (Parameter& p : params_) p.precision = precision.for_parameter(p.spec.name);
  if (parallel.sequence_parallel && parallel.tp_size() > 1) {
    // the replicated weights applied to this rank's token rows only (attention and the MoE router
    // run on every rank's tokens and get complete gradients)
    for (Parameter& p : params_) {
      for (const char* suffix : {"input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight",
                                 ".enorm.weight", ".hnorm.weight", ".eh_proj.weight", "shared_head.norm.weight"}) {
        if (p.spec.trainable && p.spec.name.ends_with(suffix)) p.grad_partial_over_tp = true;
      }
    }
  }

  if (holds_first()) embedding_.emplace(params_.at("model.embed_tokens.weight"), parallel);
  size_t held = 0;
  for (const PipelineStage& st : chunks_) held += static_cast<size_t>(st.layers());
  layers_.reserve(held);  // the layers stay where they are built
  for (const PipelineStage& st : chunks_) {
    chunk_begin_.push_back(layers_.size());
    for (int64_t l = st.first_layer; l < st.end_layer; ++l) {
      layers_.emplace_back(params_, l, config_, recompute, parallel);
      layer_index_.push_back(l);
    }
  }
  chunk_begin_.push_back(layers_.size());
  if (holds_last()) {
    Parameter& head_weight = params_.at(config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
    head_.emplace(params_.at("model.norm.weight"), head_weight, config_.rms_norm_eps, parallel);
    mtp_.reserve(static_cast<size_t>(mtp_depth()));
    for (int64_t k = 0; k < mtp_depth(); ++k)
      mtp_.emplace_back(params_, config_.num_hidden_layers + k, config_, recompute, head_weight, parallel);
  }
  group_params_by_module();
}

void Model::group_params_by_module() {
  const std::string layer_prefix = "model.layers.";
  layer_params_.assign(static_cast<size_t>(config_.num_hidden_layers + mtp_depth()), {});
  for (Parameter& p : params_) {
    if (!p.spec.trainable) continue;
    const std::string& name = p.spec.name;
    if (name == "model.embed_tokens.weight") {
      embedding_params_.push_back(&p);
    } else if (name.starts_with(layer_prefix)) {
      layer_params_.at(std::stoul(name.substr(layer_prefix.size()))).push_back(&p);
    } else {
      head_params_.push_back(&p);  // model.norm, lm_head
    }
  }
}

void Model::grads_ready(const std::vector<Parameter*>& params) const {
  if (!grad_ready_hook_) return;
  for (Parameter* p : params) grad_ready_hook_(*p);
}

Tensor Model::on_device(const Tensor& t) const {
  return !t.defined() || t.device() == params_.device() ? t : t.to(params_.device());
}

int64_t Model::stage_rows(int64_t tokens) const {
  return parallel_.sequence_parallel ? tokens / parallel_.tp_size() : tokens;
}

// Under sequence parallelism: this rank's token rows of each depth's block of [D·T] rows, [D·T/tp].
Tensor Model::own_mtp_rows(const Tensor& all, int64_t tokens) const {
  if (!parallel_.sequence_parallel) return all;
  const int64_t rows = stage_rows(tokens);
  Tensor out = empty_stage_tensor(mtp_depth() * rows);
  for (int64_t k = 0; k < mtp_depth(); ++k)
    out.slice(k * rows, (k + 1) * rows).copy_from(own_tokens(parallel_, all.slice(k * tokens, (k + 1) * tokens)));
  return out;
}

Tensor Model::empty_stage_tensor(int64_t rows) const {
  return Tensor::empty({rows, config_.hidden_size}, dtype_, params_.device());
}

void Model::require_whole_model(const char* op) const {
  if (stage().count != 1) {
    throw std::logic_error(std::string(op) + ": this model holds pipeline " + describe(stage(), mtp_depth()) +
                           "; use forward_stage / backward_stage");
  }
}

const PipelineStage& Model::chunk_stage(int chunk, const char* op) const {
  if (chunk < 0 || chunk >= static_cast<int>(chunks_.size())) {
    throw std::logic_error(std::string(op) + ": chunk " + std::to_string(chunk) + " of a model holding " +
                           std::to_string(chunks_.size()));
  }
  return chunks_[static_cast<size_t>(chunk)];
}

bool Model::mtp_inside() const {
  return chunks_.size() > 1 && holds_first() && holds_last() && mtp_depth() > 0;
}

void Model::check_stage_tensor(const Tensor& t, int64_t rows, const char* op, const char* name) const {
  if (!t.defined() || t.shape() != Shape{rows, config_.hidden_size} || t.dtype() != dtype_ ||
      t.device() != params_.device()) {
    throw std::invalid_argument(std::string(op) + ": " + name + " must be [" + std::to_string(rows) + ", " +
                                std::to_string(config_.hidden_size) + "] " + std::string(dtype_name(dtype_)) +
                                " on the model's device, got " +
                                (t.defined() ? t.describe() : std::string("undefined")));
  }
}

SequenceInfo Model::sequence_info(const Batch& batch) {
  SequenceInfo seq;
  seq.batch = batch.inputs.dim(0);
  seq.seq_len = batch.inputs.dim(1);
  if (parallel_.sequence_parallel && seq.tokens() % parallel_.tp_size() != 0) {
    throw std::invalid_argument("Model: sequence parallelism splits a batch's " + std::to_string(seq.tokens()) +
                                " tokens evenly over " + std::to_string(parallel_.tp_size()) +
                                " tensor-parallel ranks; they do not divide");
  }
  seq.segment_ids = on_device(batch.segment_ids);
  Tensor positions = Tensor::empty({seq.tokens()}, DType::i32);
  int32_t* pos = positions.data<int32_t>();
  for (int64_t t = 0; t < seq.tokens(); ++t) pos[t] = static_cast<int32_t>(t % seq.seq_len);
  seq.positions = on_device(positions);
  if (seq.seq_len > rope_positions_) {
    const ops::RopeTable table = ops::rope_table(rope_config(config_), seq.seq_len, dtype_);
    rope_ = {on_device(table.cos), on_device(table.sin)};
    rope_positions_ = seq.seq_len;
  }
  seq.rope = rope_;
  return seq;
}

namespace {

// Depth k reads token t_{i+k} and predicts targets[i + k] (= t_{i+k+1}). Positions whose
// shifted token lies past the end of the row, or in another document of a packed row, have no
// target: their ids are set to 0 (embedded like any token) and their targets to -100, so the loss
// drops them. Returns host tensors [depth·T] (ids, then targets) for depths 1..depth, depth-major.
std::pair<Tensor, Tensor> shifted_tokens(const Batch& batch, int64_t depth) {
  const int64_t B = batch.inputs.dim(0), S = batch.inputs.dim(1), T = B * S;
  const auto on_host = [](const Tensor& t) {
    return !t.defined() || t.device() == Device::cpu ? t : t.to(Device::cpu);
  };
  const Tensor inputs = on_host(batch.inputs), all_targets = on_host(batch.targets),
               segments = on_host(batch.segment_ids);
  Tensor shifted_ids = Tensor::empty({depth * T}, DType::i32);
  Tensor shifted_targets = Tensor::empty({depth * T}, DType::i32);
  const int32_t* in = inputs.data<int32_t>();
  const int32_t* tg = all_targets.data<int32_t>();
  const int32_t* segment = segments.defined() ? segments.data<int32_t>() : nullptr;
  for (int64_t k = 1; k <= depth; ++k) {
    int32_t* ids = shifted_ids.data<int32_t>() + (k - 1) * T;
    int32_t* targets = shifted_targets.data<int32_t>() + (k - 1) * T;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t shifted = t + k;
      const bool inside = t % S + k < S && (!segment || segment[shifted] == segment[t]);
      ids[t] = inside ? in[shifted] : 0;
      targets[t] = inside ? tg[shifted] : static_cast<int32_t>(OutputHead::kIgnoreIndex);
    }
  }
  return {shifted_ids, shifted_targets};
}

}  // namespace

Model::MicroBatch& Model::start_micro_batch(int chunk, int64_t id, const Batch& batch, const char* op) {
  check_batch(batch, op);
  MicroBatch& mb = micro_batches_[{chunk, id}] = MicroBatch{};
  mb.chunk = chunk;
  mb.seq = sequence_info(batch);
  if (mb.seq.seq_len != last_seq_len_) {
    last_seq_len_ = mb.seq.seq_len;
    flops_per_token_ = model_flops_per_token(config_, last_seq_len_);
  }
  return mb;
}

Model::MicroBatch& Model::micro_batch(int chunk, int64_t id, const char* op) {
  const auto it = micro_batches_.find({chunk, id});
  if (it == micro_batches_.end()) {
    throw std::logic_error(std::string(op) + ": micro-batch " + std::to_string(id) +
                           (chunks_.size() > 1 ? " of chunk " + std::to_string(chunk) : std::string()) +
                           " has no forward to differentiate (call forward first)");
  }
  return it->second;
}

// The chunk's decoder layers from hidden_in; returns their summed balance loss.
double Model::forward_layers(MicroBatch& mb, Tensor hidden_in) {
  double balance = 0;
  const size_t begin = chunk_begin_[static_cast<size_t>(mb.chunk)];
  mb.hidden.push_back(std::move(hidden_in));
  mb.layers.resize(chunk_begin_[static_cast<size_t>(mb.chunk) + 1] - begin);
  for (size_t i = 0; i < mb.layers.size(); ++i) {
    mb.hidden.push_back(layers_[begin + i].forward(mb.hidden[i], mb.seq, mb.layers[i]));
    balance += mb.layers[i].balance_loss;
  }
  return balance;
}

// The MTP modules (last stage), each reading the previous depth's head-norm output and its rows
// of mtp_embedded; returns the mean of their losses.
double Model::forward_mtp(MicroBatch& mb, const Batch& batch, const Tensor& mtp_embedded) {
  const int64_t T = mb.seq.tokens();
  const Tensor targets = on_device(shifted_tokens(batch, mtp_depth()).second);
  mb.mtp.resize(mtp_.size());
  double mtp_loss = 0;
  const Tensor* h_prev = &mb.head.normed;
  for (size_t k = 0; k < mtp_.size(); ++k) {
    const auto at = static_cast<int64_t>(k) * T;
    MtpContext& ctx = mb.mtp[k];
    ctx.targets = targets.slice(at, at + T);
    const int64_t rows = stage_rows(T), own = static_cast<int64_t>(k) * rows;  // this rank's tokens of depth k
    ctx.embedded = mtp_embedded.slice(own, own + rows);
    mtp_[k].forward(*h_prev, mb.seq, ctx);
    mtp_loss += mean_loss(ctx.head.ce) / static_cast<double>(mtp_.size());
    h_prev = &ctx.head.normed;
  }
  return mtp_loss;
}

Losses Model::forward(const Batch& batch) {
  require_whole_model("Model::forward");
  return forward_stage(0, batch).losses;
}

StageForward Model::forward_stage(int64_t id, const Batch& batch, const Tensor& hidden_in,
                                  const Tensor& mtp_embedded_in, int chunk) {
  constexpr const char* op = "Model::forward";
  const PipelineStage& stage = chunk_stage(chunk, op);
  MicroBatch& mb = start_micro_batch(chunk, id, batch, op);
  const int64_t T = mb.seq.tokens(), D = mtp_depth();
  StageForward out;
  Tensor mtp_embedded;  // Emb(shifted tokens) of every MTP depth, [D·T, hidden]
  if (stage.is_first()) {
    mb.ids = on_device(batch.inputs.view({T}));
    out.losses.balance = forward_layers(mb, own_tokens(parallel_, embedding_->forward(mb.ids)));
    if (D > 0) {
      mb.mtp_ids = on_device(shifted_tokens(batch, D).first);
      mtp_embedded = own_mtp_rows(embedding_->forward(mb.mtp_ids), T);
      if (mtp_inside()) {
        mb.mtp_embedded = mtp_embedded;
      } else if (!stage.is_last()) {
        out.mtp_embedded = mtp_embedded;
      }
    }
  } else {
    check_stage_tensor(hidden_in, stage_rows(T), op, "hidden_in (the previous stage's output)");
    out.losses.balance = forward_layers(mb, hidden_in);
    if (stage.is_last() && D > 0 && mtp_inside()) {
      MicroBatch& first = micro_batch(first_chunk(), id, op);
      mtp_embedded = std::exchange(first.mtp_embedded, Tensor());
      if (!mtp_embedded.defined()) {
        throw std::logic_error(std::string(op) + ": micro-batch " + std::to_string(id) +
                               " has no MTP embeddings from the first chunk's forward");
      }
    } else if (stage.is_last() && D > 0) {
      check_stage_tensor(mtp_embedded_in, D * stage_rows(T), op, "mtp_embedded_in (the first stage's MTP embeddings)");
      mtp_embedded = mtp_embedded_in;
    }
  }
  if (!stage.is_last()) {
    out.hidden = mb.hidden.back();
    out.losses.total = out.losses.balance;
    return out;
  }
  Losses& losses = out.losses;
  head_->forward(mb.hidden.back(), on_device(batch.targets.view({T})), mb.head);
  losses.lm = mean_loss(mb.head.ce);
  losses.tokens = mb.head.ce.count;
  if (D > 0) {
    losses.mtp = forward_mtp(mb, batch, mtp_embedded);
    for (const MtpContext& ctx : mb.mtp) losses.balance += ctx.block.balance_loss;
  }
  losses.total = losses.lm + config_.mtp_loss_weight * losses.mtp + losses.balance;
  return out;
}

void Model::backward(double loss_scale) {
  require_whole_model("Model::backward");
  backward_stage(0, loss_scale);
}

StageBackward Model::backward_stage(int64_t id, double loss_scale, const Tensor& d_hidden_out,
                                    const Tensor& d_mtp_embedded_in, int chunk) {
  return backward_pass(chunk, id, loss_scale, d_hidden_out, d_mtp_embedded_in, /*with_weights=*/true);
}

StageBackward Model::backward_stage_input(int64_t id, double loss_scale, const Tensor& d_hidden_out,
                                          const Tensor& d_mtp_embedded_in, int chunk) {
  return backward_pass(chunk, id, loss_scale, d_hidden_out, d_mtp_embedded_in, /*with_weights=*/false);
}

// The input gradients, module by module from the last; with_weights: each module's weight
// gradients right after its input gradient, so its context is released as the pass goes (the
// fused backward's memory profile), else all of them later in backward_stage_weight.
StageBackward Model::backward_pass(int chunk, int64_t id, double loss_scale, const Tensor& d_hidden_out,
                                   const Tensor& d_mtp_embedded_in, bool with_weights) {
  constexpr const char* op = "Model::backward";
  const PipelineStage& stage = chunk_stage(chunk, op);
  MicroBatch& mb = micro_batch(chunk, id, op);
  if (mb.input_grads_done) {
    throw std::logic_error(std::string(op) + ": micro-batch " + std::to_string(id) +
                           " already has its input gradients");
  }
  const int64_t T = mb.seq.tokens();
  StageBackward out;
  Tensor dh;
  if (stage.is_last()) {
    Tensor d_next;  // from the MTP modules into the final norm's output
    backward_mtp(mb, loss_scale, d_next, out, with_weights);
    if (mtp_inside()) micro_batch(first_chunk(), id, op).d_mtp_embedded = std::exchange(out.d_mtp_embedded, Tensor());
    dh = head_->backward_input(mb.hidden.back(), mean_loss_grad(mb.head.ce, loss_scale), d_next, mb.head);
    if (with_weights) head_weight_grads(mb);
  } else {
    check_stage_tensor(d_hidden_out, stage_rows(T), op, "d_hidden_out (the next stage's input gradient)");
    dh = d_hidden_out;
  }
  const size_t begin = chunk_begin_[static_cast<size_t>(chunk)];
  for (size_t i = mb.layers.size(); i-- > 0;) {
    dh = layers_[begin + i].backward_input(mb.hidden[i], dh, mb.seq, loss_scale, mb.layers[i]);
    if (with_weights) layer_weight_grads(mb, i);
  }
  if (stage.is_first()) {
    if (mtp_inside()) {
      check_stage_tensor(mb.d_mtp_embedded, mtp_depth() * stage_rows(T), op,
                         "the MTP gradients of the last chunk's backward (which comes first)");
    } else if (!stage.is_last() && mtp_depth() > 0) {
      check_stage_tensor(d_mtp_embedded_in, mtp_depth() * stage_rows(T), op,
                         "d_mtp_embedded_in (the last stage's MTP gradients)");
      mb.d_mtp_embedded = d_mtp_embedded_in;
    }
    mb.d_embedded = dh;
  } else {
    out.d_hidden = dh;
  }
  mb.input_grads_done = true;
  if (with_weights) finish_weight_grads(id, mb);
  return out;
}

// The weight gradients after a backward_stage_input, in the fused backward's order (MTP modules
// deepest first, the head, the layers last first, the embedding: its MTP rows, then the main
// input's), so every parameter accumulates its micro-batches' contributions in the same order.
void Model::backward_stage_weight(int64_t id, int chunk) {
  const PipelineStage& stage = chunk_stage(chunk, "Model::backward");
  MicroBatch& mb = micro_batch(chunk, id, "Model::backward");
  if (!mb.input_grads_done) {
    throw std::logic_error("Model::backward: micro-batch " + std::to_string(id) +
                           " has no input gradients yet (backward_stage_input first)");
  }
  if (stage.is_last()) {
    for (size_t k = mtp_.size(); k-- > 0;) mtp_weight_grads(mb, k);
    head_weight_grads(mb);
  }
  for (size_t i = mb.layers.size(); i-- > 0;) layer_weight_grads(mb, i);
  finish_weight_grads(id, mb);
}

// MTP modules, deepest first: each passes the gradient of its h input to the depth before; the
// last one's reaches the main head's norm output (d_next). Without the embedding table on this
// stage, the gradients of their embeddings go to the first stage (out.d_mtp_embedded).
void Model::backward_mtp(MicroBatch& mb, double loss_scale, Tensor& d_next, StageBackward& out, bool with_weights) {
  const int64_t T = mb.seq.tokens();
  const double mtp_weight =
      mtp_.empty() ? 0.0 : loss_scale * config_.mtp_loss_weight / static_cast<double>(mtp_.size());
  const bool table_here = chunks_[static_cast<size_t>(mb.chunk)].is_first();  // one stage: the whole model
  const int64_t rows = stage_rows(T);
  if (!mtp_.empty() && !table_here) out.d_mtp_embedded = empty_stage_tensor(mtp_depth() * rows);
  for (size_t k = mtp_.size(); k-- > 0;) {
    const Tensor& h_prev = k == 0 ? mb.head.normed : mb.mtp[k - 1].head.normed;
    MtpContext& ctx = mb.mtp[k];
    d_next = mtp_[k].backward_input(h_prev, mean_loss_grad(ctx.head.ce, mtp_weight), d_next, mb.seq, loss_scale, ctx);
    const auto own = static_cast<int64_t>(k) * rows;
    if (!table_here) out.d_mtp_embedded.slice(own, own + rows).copy_from(ctx.d_embedded);
    if (with_weights) mtp_weight_grads(mb, k);  // clears module k's context, no longer read
  }
}

// MTP module k's weight gradients; with the embedding table on this stage, its embeddings'
// gradient goes into it here (before the main input's, as in one stage).
void Model::mtp_weight_grads(MicroBatch& mb, size_t k) {
  const int64_t T = mb.seq.tokens();
  const Tensor& h_prev = k == 0 ? mb.head.normed : mb.mtp[k - 1].head.normed;
  const Tensor d_embedded = mtp_[k].backward_weight(h_prev, mb.mtp[k]);
  const auto at = static_cast<int64_t>(k) * T;
  if (chunks_[static_cast<size_t>(mb.chunk)].is_first()) {
    embedding_->backward_weight(mb.mtp_ids.slice(at, at + T), gather_tokens(parallel_, d_embedded));
  }
  grads_ready(layer_params_[static_cast<size_t>(config_.num_hidden_layers) + k]);
}

void Model::head_weight_grads(MicroBatch& mb) {
  head_->backward_weight(mb.hidden.back(), mb.head);
  grads_ready(head_params_);
}

// The chunk's layer i.
void Model::layer_weight_grads(MicroBatch& mb, size_t i) {
  const size_t layer = chunk_begin_[static_cast<size_t>(mb.chunk)] + i;
  layers_[layer].backward_weight(mb.hidden[i], mb.layers[i]);
  grads_ready(layer_params_[static_cast<size_t>(layer_index_[layer])]);
}

// The embedding's gradient (first stage) and the end of the micro-batch.
void Model::finish_weight_grads(int64_t id, MicroBatch& mb) {
  if (chunks_[static_cast<size_t>(mb.chunk)].is_first()) backward_embedding(mb, mb.d_embedded, mb.d_mtp_embedded);
  micro_batches_.erase({mb.chunk, id});
}

// From the gradient of the stage's last layer output to that of its input (dh is updated): the
// stage's decoder layers, last first. balance_scale: d objective / d balance losses.
void Model::backward_layers(MicroBatch& mb, Tensor& dh, double balance_scale) {
  const size_t begin = chunk_begin_[static_cast<size_t>(mb.chunk)];
  for (size_t i = mb.layers.size(); i-- > 0;) {
    dh = layers_[begin + i].backward_input(mb.hidden[i], dh, mb.seq, balance_scale, mb.layers[i]);
    layer_weight_grads(mb, i);
  }
}

// The embedding table's gradient (first stage): the MTP depths' rows, deepest first (what the
// last stage sent, or nothing when this stage ran the MTP modules itself), then the main input's
// — the order of the one-stage backward, so the sums agree.
void Model::backward_embedding(MicroBatch& mb, const Tensor& dh, const Tensor& d_mtp_embedded) {
  const int64_t T = mb.seq.tokens();
  if (!chunks_[static_cast<size_t>(mb.chunk)].is_last()) {  // the MTP rows came from another chunk
    for (int64_t k = mtp_depth(); k-- > 0;) {
      const int64_t rows = stage_rows(T);
      embedding_->backward_weight(mb.mtp_ids.slice(k * T, (k + 1) * T),
                                  gather_tokens(parallel_, d_mtp_embedded.slice(k * rows, (k + 1) * rows)));
    }
  }
  embedding_->backward_weight(mb.ids, gather_tokens(parallel_, dh));
  grads_ready(embedding_params_);
}

std::vector<Moe*> Model::moe_layers() {
  std::vector<Moe*> out;
  for (DecoderLayer& layer : layers_) {
    if (layer.moe()) out.push_back(layer.moe());
  }
  for (MtpModule& m : mtp_) {
    if (m.block().moe()) out.push_back(m.block().moe());
  }
  return out;
}

std::vector<const Moe*> Model::moe_layers() const {
  std::vector<const Moe*> out;
  for (const DecoderLayer& layer : layers_) {
    if (layer.moe()) out.push_back(layer.moe());
  }
  for (const MtpModule& m : mtp_) {
    if (m.block().moe()) out.push_back(m.block().moe());
  }
  return out;
}

void Model::update_router_biases(double gamma) {
  for (Moe* moe : moe_layers()) moe->update_bias(gamma);
}

ExpertLoadStats Model::expert_load() const {
  ExpertLoadStats stats;
  for (const Moe* moe : moe_layers()) stats.layers.push_back(moe->load());
  return stats;
}

std::vector<Tensor> Model::routing() const {
  std::vector<Tensor> out;
  for (const Moe* moe : moe_layers()) out.push_back(moe->last_expert_ids());
  return out;
}

}  // namespace dsx
