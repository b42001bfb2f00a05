#include "trainer/model/model.h"

#include <stdexcept>
#include <string>

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
  const LocalExperts local = config_.n_routed_experts > 0
                                 ? local_experts(config_.n_routed_experts, parallel.ep_size(), parallel.ep_rank())
                                 : LocalExperts{};
  for (ParamSpec& spec : model_param_specs(config_)) {
    if (spec.shard.axis == ShardAxis::expert && !local.holds(spec.shard.expert_index)) continue;  // another EP rank's
    params_.add(std::move(spec));
  }
  params_.initialize(seed);
  // before the modules are built: they read their weights' precision
  for (Parameter& p : params_) p.precision = precision.for_parameter(p.spec.name);

  embedding_.emplace(params_.at("model.embed_tokens.weight"));
  Parameter& head_weight = params_.at(config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  layers_.reserve(static_cast<size_t>(config_.num_hidden_layers));
  mtp_.reserve(static_cast<size_t>(config_.num_nextn_predict_layers));
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l)
    layers_.emplace_back(params_, l, config_, recompute, parallel);
  head_.emplace(params_.at("model.norm.weight"), head_weight, config_.rms_norm_eps);
  for (int64_t k = 0; k < config_.num_nextn_predict_layers; ++k) {
    mtp_.emplace_back(params_, config_.num_hidden_layers + k, config_, recompute, *embedding_, head_weight, parallel);
  }
  group_params_by_module();
}

void Model::group_params_by_module() {
  const std::string layer_prefix = "model.layers.";
  layer_params_.assign(static_cast<size_t>(config_.num_hidden_layers + config_.num_nextn_predict_layers), {});
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

SequenceInfo Model::sequence_info(const Batch& batch) {
  SequenceInfo seq;
  seq.batch = batch.inputs.dim(0);
  seq.seq_len = batch.inputs.dim(1);
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

// Depth k reads token t_{i+k} and predicts targets[i + k] (= t_{i+k+1}). Positions whose
// shifted token lies past the end of the row, or in another document of a packed row, have no
// target: their ids are set to 0 (embedded like any token) and their targets to -100, so the loss drops them.
void Model::prepare_mtp_inputs(const Batch& batch, int64_t depth, MtpContext& ctx) const {
  const int64_t B = batch.inputs.dim(0), S = batch.inputs.dim(1);
  const auto on_host = [](const Tensor& t) {
    return !t.defined() || t.device() == Device::cpu ? t : t.to(Device::cpu);
  };
  const Tensor inputs = on_host(batch.inputs), all_targets = on_host(batch.targets),
               segments = on_host(batch.segment_ids);
  Tensor shifted_ids = Tensor::empty({B * S}, DType::i32);
  Tensor shifted_targets = Tensor::empty({B * S}, DType::i32);
  const int32_t* in = inputs.data<int32_t>();
  const int32_t* tg = all_targets.data<int32_t>();
  const int32_t* segment = segments.defined() ? segments.data<int32_t>() : nullptr;
  int32_t* ids = shifted_ids.data<int32_t>();
  int32_t* targets = shifted_targets.data<int32_t>();
  for (int64_t t = 0; t < B * S; ++t) {
    const int64_t shifted = t + depth;
    const bool inside = t % S + depth < S && (!segment || segment[shifted] == segment[t]);
    ids[t] = inside ? in[shifted] : 0;
    targets[t] = inside ? tg[shifted] : static_cast<int32_t>(OutputHead::kIgnoreIndex);
  }
  ctx.ids = on_device(shifted_ids);
  ctx.targets = on_device(shifted_targets);
}

// Starts a micro-batch and runs embedding, decoder layers and the main head (what forward and
// policy_forward share); returns the layers' summed balance loss.
double Model::forward_trunk(const Batch& batch, const char* op) {
  check_batch(batch, op);
  micro_batch_.emplace();
  MicroBatch& mb = *micro_batch_;
  mb.seq = sequence_info(batch);
  if (mb.seq.seq_len != last_seq_len_) {
    last_seq_len_ = mb.seq.seq_len;
    flops_per_token_ = model_flops_per_token(config_, last_seq_len_);
  }
  const int64_t T = mb.seq.tokens(), L = config_.num_hidden_layers;
  mb.ids = on_device(batch.inputs.view({T}));
  double balance = 0;
  mb.hidden.push_back(embedding_->forward(mb.ids));
  mb.layers.resize(static_cast<size_t>(L));
  for (int64_t l = 0; l < L; ++l) {
    mb.hidden.push_back(layers_[l].forward(mb.hidden[l], mb.seq, mb.layers[l]));
    balance += mb.layers[l].balance_loss;
  }
  head_->forward(mb.hidden[L], on_device(batch.targets.view({T})), mb.head);
  return balance;
}

Losses Model::forward(const Batch& batch) {
  Losses losses;
  losses.balance = forward_trunk(batch, "Model::forward");
  MicroBatch& mb = *micro_batch_;
  losses.lm = mean_loss(mb.head.ce);
  losses.tokens = mb.head.ce.count;

  mb.mtp.resize(mtp_.size());
  const Tensor* h_prev = &mb.head.normed;
  for (size_t k = 0; k < mtp_.size(); ++k) {
    prepare_mtp_inputs(batch, static_cast<int64_t>(k) + 1, mb.mtp[k]);
    mtp_[k].forward(*h_prev, mb.seq, mb.mtp[k]);
    losses.mtp += mean_loss(mb.mtp[k].head.ce) / static_cast<double>(mtp_.size());
    losses.balance += mb.mtp[k].block.balance_loss;
    h_prev = &mb.mtp[k].head.normed;
  }
  losses.total = losses.lm + config_.mtp_loss_weight * losses.mtp + losses.balance;
  return losses;
}

void Model::backward(double loss_scale) {
  if (!micro_batch_) throw std::logic_error("Model::backward: no forward to differentiate (call forward first)");
  MicroBatch& mb = *micro_batch_;
  const int64_t L = config_.num_hidden_layers;
  const double mtp_weight =
      mtp_.empty() ? 0.0 : loss_scale * config_.mtp_loss_weight / static_cast<double>(mtp_.size());

  // MTP modules, deepest first: each passes the gradient of its h input to the depth before.
  Tensor d_next;
  for (size_t k = mtp_.size(); k-- > 0;) {
    const Tensor& h_prev = k == 0 ? mb.head.normed : mb.mtp[k - 1].head.normed;
    MtpContext& ctx = mb.mtp[k];
    d_next = mtp_[k].backward_input(h_prev, mean_loss_grad(ctx.head.ce, mtp_weight), d_next, mb.seq, loss_scale, ctx);
    mtp_[k].backward_weight(h_prev, ctx);
    grads_ready(layer_params_[static_cast<size_t>(L) + k]);
  }

  Tensor dh = head_->backward_input(mb.hidden[L], mean_loss_grad(mb.head.ce, loss_scale), d_next, mb.head);
  head_->backward_weight(mb.hidden[L], mb.head);
  grads_ready(head_params_);
  backward_trunk(dh, loss_scale);
}

// From the gradient of the last layer's output: the decoder layers, last first, then the
// embedding; ends the micro-batch. balance_scale: d objective / d balance losses.
void Model::backward_trunk(Tensor dh, double balance_scale) {
  MicroBatch& mb = *micro_batch_;
  for (int64_t l = config_.num_hidden_layers - 1; l >= 0; --l) {
    dh = layers_[l].backward_input(mb.hidden[l], dh, mb.seq, balance_scale, mb.layers[l]);
    layers_[l].backward_weight(mb.hidden[l], mb.layers[l]);
    grads_ready(layer_params_[static_cast<size_t>(l)]);
  }
  embedding_->backward_weight(mb.ids, dh);
  grads_ready(embedding_params_);
  micro_batch_.reset();
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
