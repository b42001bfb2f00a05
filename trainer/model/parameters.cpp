#include "trainer/model/parameters.h"

#include <stdexcept>
#include <string>
#include <utility>

#include "kernels/dispatch.h"
#include "kernels/random.h"

namespace dsx {
namespace {

// Builds the spec list; each add_* call mirrors one Hugging Face module.
class SpecBuilder {
 public:
  explicit SpecBuilder(const ModelConfig& c) : c_(c) {}

  std::vector<ParamSpec> build() {
    const int64_t D = c_.hidden_size;
    add_weight("model.embed_tokens.weight", {c_.vocab_size, D}, ShardSpec::tensor_parallel(0));
    for (int64_t layer = 0; layer < c_.num_hidden_layers; ++layer) add_decoder_layer(layer);
    layer_ = -1;
    add_norm("model.norm.weight", D);
    if (!c_.tie_word_embeddings) {
      add_weight("lm_head.weight", {c_.vocab_size, D}, ShardSpec::tensor_parallel(0));
    }
    for (int64_t k = 0; k < c_.num_nextn_predict_layers; ++k) add_mtp_module(c_.num_hidden_layers + k);
    return std::move(specs_);
  }

 private:
  static std::string layer_prefix(int64_t layer) { return "model.layers." + std::to_string(layer) + "."; }

  ParamSpec& add(std::string name, Shape shape) {
    ParamSpec s;
    s.name = std::move(name);
    s.shape = std::move(shape);
    s.init_std = c_.initializer_range;
    s.layer = layer_;
    s.mtp = layer_ >= c_.num_hidden_layers;
    specs_.push_back(std::move(s));
    return specs_.back();
  }
  void add_weight(std::string name, Shape shape, ShardSpec shard) {
    add(std::move(name), std::move(shape)).shard = shard;
  }
  void add_norm(std::string name, int64_t dim) {
    ParamSpec& s = add(std::move(name), {dim});
    s.init = InitKind::ones;
    s.weight_decay = false;
  }

  void add_decoder_layer(int64_t layer) {
    layer_ = layer;
    const std::string p = layer_prefix(layer);
    add_norm(p + "input_layernorm.weight", c_.hidden_size);
    add_attention(p + "self_attn.");
    add_norm(p + "post_attention_layernorm.weight", c_.hidden_size);
    if (c_.is_moe_layer(layer)) {
      add_moe(p + "mlp.");
    } else {
      add_mlp(p + "mlp.", c_.intermediate_size, ShardSpec::tensor_parallel(0), ShardSpec::tensor_parallel(1));
    }
  }

  void add_attention(const std::string& p) {
    const int64_t D = c_.hidden_size, H = c_.num_attention_heads;
    if (c_.q_lora_rank > 0) {
      add_weight(p + "q_a_proj.weight", {c_.q_lora_rank, D}, ShardSpec::replicated());
      add_norm(p + "q_a_layernorm.weight", c_.q_lora_rank);
      add_weight(p + "q_b_proj.weight", {H * c_.qk_head_dim(), c_.q_lora_rank}, ShardSpec::tensor_parallel(0));
    } else {
      add_weight(p + "q_proj.weight", {H * c_.qk_head_dim(), D}, ShardSpec::tensor_parallel(0));
    }
    add_weight(p + "kv_a_proj_with_mqa.weight", {c_.kv_lora_rank + c_.qk_rope_head_dim, D}, ShardSpec::replicated());
    add_norm(p + "kv_a_layernorm.weight", c_.kv_lora_rank);
    add_weight(p + "kv_b_proj.weight", {H * (c_.qk_nope_head_dim + c_.v_head_dim), c_.kv_lora_rank},
               ShardSpec::tensor_parallel(0));
    add_weight(p + "o_proj.weight", {D, H * c_.v_head_dim}, ShardSpec::tensor_parallel(1));
  }

  // gate_proj/up_proj [F, D] and down_proj [D, F].
  void add_mlp(const std::string& p, int64_t width, ShardSpec in_shard, ShardSpec out_shard, bool routed = false) {
    const int64_t D = c_.hidden_size;
    for (const char* name : {"gate_proj", "up_proj"}) {
      ParamSpec& s = add(p + name + ".weight", {width, D});
      s.shard = in_shard;
      s.routed_expert = routed;
    }
    ParamSpec& down = add(p + "down_proj.weight", {D, width});
    down.shard = out_shard;
    down.routed_expert = routed;
  }

  void add_moe(const std::string& p) {
    const int64_t E = c_.n_routed_experts;
    add_weight(p + "gate.weight", {E, c_.hidden_size}, ShardSpec::replicated());
    ParamSpec& bias = add(p + "gate.e_score_correction_bias", {E});
    bias.init = InitKind::zeros;
    bias.trainable = false;
    bias.weight_decay = false;
    for (int64_t e = 0; e < E; ++e) {
      const ShardSpec ep = ShardSpec::expert_parallel(e, E);
      add_mlp(p + "experts." + std::to_string(e) + ".", c_.moe_intermediate_size, ep, ep, /*routed=*/true);
    }
    if (c_.n_shared_experts > 0) {
      // The shared experts are one MLP of n_shared times the width, as Hugging Face stores them.
      add_mlp(p + "shared_experts.", c_.n_shared_experts * c_.moe_intermediate_size, ShardSpec::tensor_parallel(0),
              ShardSpec::tensor_parallel(1));
    }
  }

  // MTP module k at layer index L + k: enorm, hnorm, eh_proj, a decoder block and its own
  // shared_head.norm; the embedding and the output head are the main model's.
  void add_mtp_module(int64_t layer) {
    layer_ = layer;
    const std::string p = layer_prefix(layer);
    add_norm(p + "enorm.weight", c_.hidden_size);
    add_norm(p + "hnorm.weight", c_.hidden_size);
    add_weight(p + "eh_proj.weight", {c_.hidden_size, 2 * c_.hidden_size}, ShardSpec::replicated());
    add_decoder_layer(layer);
    add_norm(p + "shared_head.norm.weight", c_.hidden_size);
  }

  const ModelConfig& c_;
  std::vector<ParamSpec> specs_;
  int64_t layer_ = -1;
};

}  // namespace

std::vector<ParamSpec> model_param_specs(const ModelConfig& config) {
  validate_model_config(config);
  return SpecBuilder(config).build();
}

double initial_value(const ParamSpec& spec, uint64_t seed, int64_t index) {
  switch (spec.init) {
    case InitKind::ones:
      return 1.0;
    case InitKind::zeros:
      return 0.0;
    case InitKind::normal:
      return spec.init_std * random::normal_double(seed, random::stream_of(spec.name), static_cast<uint64_t>(index));
  }
  return 0.0;
}

int64_t global_element_index(const Shape& global, const Shape& offset, const Shape& local, int64_t local_index) {
  int64_t index = 0;
  int64_t rest = local_index;
  int64_t local_stride = shape_numel(local), global_stride = shape_numel(global);
  for (size_t d = 0; d < local.size(); ++d) {
    local_stride /= local[d];
    global_stride /= global[d];
    index += (rest / local_stride + offset[d]) * global_stride;
    rest %= local_stride;
  }
  return index;
}

namespace {
// The box of `spec` a rank holds: the whole tensor, or its part of a tensor-parallel split.
std::pair<Shape, Shape> held_box(const ParamSpec& spec, TensorShard shard) {
  Shape local = spec.shape, offset(spec.shape.size(), 0);
  if (spec.shard.axis != ShardAxis::tensor || shard.size == 1) return {local, offset};
  const auto dim = static_cast<size_t>(spec.shard.dim);
  if (shard.size < 1 || shard.rank < 0 || shard.rank >= shard.size || dim >= local.size() ||
      local[dim] % shard.size != 0) {
    throw std::invalid_argument("ParameterStore: " + spec.name + " cannot be split into " + std::to_string(shard.size) +
                                " tensor-parallel parts along dimension " + std::to_string(spec.shard.dim));
  }
  local[dim] /= shard.size;
  offset[dim] = local[dim] * shard.rank;
  return {local, offset};
}
}  // namespace

Parameter& ParameterStore::add(ParamSpec spec, TensorShard shard) {
  if (contains(spec.name)) throw std::invalid_argument("ParameterStore: parameter " + spec.name + " added twice");
  Parameter p;
  auto [local, offset] = held_box(spec, shard);
  p.offset = std::move(offset);
  p.value = Tensor::zeros(local, dtype_, device_);
  if (spec.trainable) p.grad = Tensor::zeros(local, dtype_, device_);
  p.spec = std::move(spec);
  index_.emplace(p.spec.name, params_.size());
  params_.push_back(std::move(p));
  return params_.back();
}

Parameter& ParameterStore::at(std::string_view name) {
  const auto it = index_.find(std::string(name));
  if (it == index_.end()) throw std::out_of_range("ParameterStore: no parameter named " + std::string(name));
  return params_[it->second];
}

const Parameter& ParameterStore::at(std::string_view name) const {
  return const_cast<ParameterStore*>(this)->at(name);
}

bool ParameterStore::contains(std::string_view name) const {
  return index_.count(std::string(name)) > 0;
}

void ParameterStore::initialize(uint64_t seed) {
  for (Parameter& p : params_) {
    Tensor host = p.value.device() == Device::cpu ? p.value : Tensor::empty(p.value.shape(), p.value.dtype());
    dispatch_float(host.dtype(), "ParameterStore::initialize", [&]<class T>() {
      T* v = host.data<T>();
      const int64_t n = host.numel();
      const bool whole = host.shape() == p.spec.shape;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t g = whole ? i : global_element_index(p.spec.shape, p.offset, host.shape(), i);
        v[i] = static_cast<T>(initial_value(p.spec, seed, g));
      }
    });
    if (host.raw() != p.value.raw()) p.value.copy_from(host);
  }
}

void ParameterStore::zero_grad() {
  for (Parameter& p : params_) {
    if (p.grad.defined()) p.grad.zero();
  }
}

int64_t ParameterStore::numel() const {
  int64_t n = 0;
  for (const Parameter& p : params_) n += p.value.numel();
  return n;
}

GemmWeightCopies::GemmWeightCopies(ParameterStore& params) : params_(params) {
  for (Parameter& p : params_) {
    // f32 matrices only: an f64 model never runs bf16 GEMMs (Model rejects that policy).
    if (p.precision.gemm == GemmKind::bf16 && p.value.dtype() == DType::f32 && p.value.ndim() == 2) {
      p.gemm_copy = p.value.to(DType::bf16);  // round to nearest even, as the bf16 GEMM would
    }
  }
}

GemmWeightCopies::~GemmWeightCopies() {
  for (Parameter& p : params_) p.gemm_copy = Tensor();
}

}  // namespace dsx
