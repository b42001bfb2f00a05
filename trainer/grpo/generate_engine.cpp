#include "trainer/grpo/generate_engine.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/dispatch.h"
#include "kernels/ops/elementwise.h"
#include "kernels/ops/gemm.h"
#include "kernels/ops/moe_permute.h"
#include "trainer/model/mla.h"
#include "trainer/model/model.h"
#include "trainer/model/precision.h"

namespace dsx::grpo::detail {

namespace {

std::string layer_prefix(int64_t layer) {
  return "model.layers." + std::to_string(layer) + ".";
}

Mlp make_mlp(ParameterStore& params, const std::string& prefix) {
  return Mlp(params.at(prefix + "gate_proj.weight"), params.at(prefix + "up_proj.weight"),
             params.at(prefix + "down_proj.weight"), /*recompute_act=*/false);
}

// The router of a config, as the MoE layers build it (trainer/model/moe.cpp).
ops::RouterConfig router_config(const ModelConfig& c) {
  ops::RouterConfig r;
  r.n_experts = c.n_routed_experts;
  r.top_k = c.num_experts_per_tok;
  r.n_group = c.n_group;
  r.topk_group = c.topk_group;
  r.scoring = c.scoring_func == "softmax" ? ops::RouterConfig::Scoring::softmax : ops::RouterConfig::Scoring::sigmoid;
  r.norm_topk_prob = c.norm_topk_prob;
  r.routed_scaling_factor = c.routed_scaling_factor;
  return r;
}

// Attention scores held at once (query rows × heads × keys): 16 MiB in f32.
constexpr int64_t kMaxScores = int64_t{1} << 22;

Tensor new_rows(DType dtype, int64_t rows, int64_t cols) {
  return Tensor::empty({rows, cols}, dtype);
}

// Scores [rows·H, L] of a span -> probabilities in place: row i·H + h is query position
// first_position + i, which sees keys 0..first_position + i; later keys get probability 0.
template <class T>
void causal_softmax(Tensor& scores, int64_t heads, int64_t first_position) {
  const int64_t n_rows = scores.dim(0), keys = scores.dim(1);
  T* s = scores.data<T>();
  for (int64_t r = 0; r < n_rows; ++r) {
    T* row = s + r * keys;
    const int64_t visible = first_position + r / heads + 1;
    T max_score = row[0];
    for (int64_t j = 1; j < visible; ++j) max_score = std::max(max_score, row[j]);
    double sum = 0;
    for (int64_t j = 0; j < visible; ++j) {
      row[j] = static_cast<T>(std::exp(static_cast<double>(row[j] - max_score)));
      sum += static_cast<double>(row[j]);
    }
    const T inv = static_cast<T>(1.0 / sum);
    for (int64_t j = 0; j < visible; ++j) row[j] *= inv;
    std::fill(row + visible, row + keys, T(0));
  }
}

}  // namespace

void LatentCache::copy_prefix(const LatentCache& other, int64_t n) {
  for (size_t l = 0; l < latent.size(); ++l) {
    Tensor latent_rows = latent[l].slice(0, n), rope_rows = rope_key[l].slice(0, n);
    latent_rows.copy_from(other.latent[l].slice(0, n));
    rope_rows.copy_from(other.rope_key[l].slice(0, n));
  }
  length = n;
}

DecodeEngine::DecodeEngine(Model& model, int64_t max_positions)
    : config_(model.config()),
      dtype_(model.parameters().dtype()),
      router_(router_config(model.config())),
      rope_(ops::rope_table(rope_config(model.config()), std::max<int64_t>(max_positions, 1),
                            model.parameters().dtype())) {
  const double mscale = ops::rope_softmax_scale_factor(rope_config(config_));
  softmax_scale_ = mscale * mscale / std::sqrt(static_cast<double>(config_.qk_head_dim()));
  ParameterStore& params = model.parameters();
  const double eps = config_.rms_norm_eps;
  embedding_.emplace(params.at("model.embed_tokens.weight"));
  final_norm_.emplace(params.at("model.norm.weight"), eps);
  head_ = &params.at(config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  layers_.resize(static_cast<size_t>(config_.num_hidden_layers));
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    Layer& layer = layers_[static_cast<size_t>(l)];
    const std::string p = layer_prefix(l);
    Parameter& input_norm = params.at(p + "input_layernorm.weight");
    layer.input_norm.emplace(input_norm, eps);
    layer.post_attention_norm.emplace(params.at(p + "post_attention_layernorm.weight"), eps);
    layer.bf16_residual = input_norm.precision.bf16_output;  // as DecoderLayer rounds its residual stream
    Attention& a = layer.attention;
    const std::string ap = p + "self_attn.";
    if (config_.q_lora_rank > 0) {
      a.q_a_proj = &params.at(ap + "q_a_proj.weight");
      a.q_a_norm.emplace(params.at(ap + "q_a_layernorm.weight"), eps);
      a.q_b_proj = &params.at(ap + "q_b_proj.weight");
    } else {
      a.q_proj = &params.at(ap + "q_proj.weight");
    }
    a.kv_a_proj = &params.at(ap + "kv_a_proj_with_mqa.weight");
    a.kv_a_norm.emplace(params.at(ap + "kv_a_layernorm.weight"), eps);
    a.kv_b_proj = &params.at(ap + "kv_b_proj.weight");
    a.o_proj = &params.at(ap + "o_proj.weight");
    const std::string mp = p + "mlp.";
    if (!config_.is_moe_layer(l)) {
      layer.dense.emplace(make_mlp(params, mp));
      continue;
    }
    layer.gate = &params.at(mp + "gate.weight");
    layer.gate_bias = &params.at(mp + "gate.e_score_correction_bias");
    for (int64_t e = 0; e < config_.n_routed_experts; ++e) {
      layer.experts.push_back(make_mlp(params, mp + "experts." + std::to_string(e) + "."));
    }
    if (config_.n_shared_experts > 0) layer.shared.emplace(make_mlp(params, mp + "shared_experts."));
  }
}

LatentCache DecodeEngine::new_cache(int64_t capacity) const {
  LatentCache cache;
  for (int64_t l = 0; l < config_.num_hidden_layers; ++l) {
    cache.latent.push_back(new_rows(dtype_, capacity, config_.kv_lora_rank));
    cache.rope_key.push_back(new_rows(dtype_, capacity, config_.qk_rope_head_dim));
  }
  return cache;
}

void DecodeEngine::project_queries(const Attention& a, const Tensor& x, const Tensor& positions, Tensor& q_latent,
                                   Tensor& q_rope) const {
  const int64_t N = x.dim(0), H = config_.num_attention_heads, dn = config_.qk_nope_head_dim,
                dr = config_.qk_rope_head_dim, dv = config_.v_head_dim, r = config_.kv_lora_rank;
  Tensor q;
  if (a.q_a_proj) {
    RmsNormContext norm;
    q = linear(a.q_a_norm->forward(linear(x, *a.q_a_proj), norm), *a.q_b_proj);
  } else {
    q = linear(x, *a.q_proj);
  }
  const Tensor q_heads = q.view({N * H, dn + dr});
  q_rope = new_rows(dtype_, N * H, dr);
  ops::copy_columns(q_heads, dn, q_rope);
  Tensor q_rope_3d = q_rope.view({N, H, dr});
  ops::rope_forward(q_rope_3d, positions, rope_, q_rope_3d);

  // absorb W_UK: head h's q_nope [N, dn] times its k_nope rows of kv_b_proj [dn, r]
  const Tensor& kv_b = a.kv_b_proj->value;  // [H·(dn + dv), r]
  const Tensor q_rows = q.view({N, H * (dn + dr)});
  Tensor q_nope_head = new_rows(dtype_, N, dn), q_latent_head = new_rows(dtype_, N, r);
  q_latent = new_rows(dtype_, N, H * r);
  for (int64_t h = 0; h < H; ++h) {
    ops::copy_columns(q_rows, h * (dn + dr), q_nope_head);
    ops::gemm(false, false, 1.0, q_nope_head, kv_b.slice(h * (dn + dv), h * (dn + dv) + dn), 0.0, q_latent_head);
    ops::set_columns(q_latent, h * r, q_latent_head);
  }
  q_latent = q_latent.view({N * H, r});
}

void DecodeEngine::append_to_caches(int64_t layer, const Tensor& x, const Tensor& positions,
                                    std::span<const CacheSpan> spans) const {
  const Attention& a = layers_[static_cast<size_t>(layer)].attention;
  const int64_t N = x.dim(0), r = config_.kv_lora_rank, dr = config_.qk_rope_head_dim;
  const Tensor kv_a = linear(x, *a.kv_a_proj);  // [N, r + dr]
  Tensor latent_raw = new_rows(dtype_, N, r), rope_key = new_rows(dtype_, N, dr);
  ops::copy_columns(kv_a, 0, latent_raw);
  ops::copy_columns(kv_a, r, rope_key);
  RmsNormContext norm;
  const Tensor latent = a.kv_a_norm->forward(latent_raw, norm);
  Tensor rope_key_3d = rope_key.view({N, 1, dr});
  ops::rope_forward(rope_key_3d, positions, rope_, rope_key_3d);
  int64_t row = 0;
  for (const CacheSpan& span : spans) {
    LatentCache& cache = *span.cache;
    const size_t l = static_cast<size_t>(layer);
    Tensor latent_dst = cache.latent[l].slice(cache.length, cache.length + span.rows);
    Tensor rope_dst = cache.rope_key[l].slice(cache.length, cache.length + span.rows);
    latent_dst.copy_from(latent.slice(row, row + span.rows));
    rope_dst.copy_from(rope_key.slice(row, row + span.rows));
    row += span.rows;
  }
}

// Query rows [n·H, ·] (n positions from first_position on, every head) against the cached
// keys up to the last of them, which the cache must already hold; out [n·H, r] overwritten.
void DecodeEngine::attend(const Tensor& q_latent, const Tensor& q_rope, const Tensor& latent_cache,
                          const Tensor& rope_cache, int64_t first_position, Tensor& out) const {
  const int64_t H = config_.num_attention_heads, keys = first_position + q_latent.dim(0) / H;
  const Tensor latent = latent_cache.slice(0, keys), rope_key = rope_cache.slice(0, keys);
  Tensor scores = new_rows(dtype_, q_latent.dim(0), keys);
  ops::gemm(false, true, softmax_scale_, q_latent, latent, 0.0, scores);
  ops::gemm(false, true, softmax_scale_, q_rope, rope_key, 1.0, scores);
  dispatch_float(dtype_, "generate attention", [&]<class T>() { causal_softmax<T>(scores, H, first_position); });
  ops::gemm(false, false, 1.0, scores, latent, 0.0, out);
}

// Called after append_to_caches: each span's cache holds its own rows as its last positions.
Tensor DecodeEngine::attention(int64_t layer, const Tensor& x, const Tensor& positions,
                               std::span<const CacheSpan> spans) const {
  const Attention& a = layers_[static_cast<size_t>(layer)].attention;
  const int64_t N = x.dim(0), H = config_.num_attention_heads, dn = config_.qk_nope_head_dim, dv = config_.v_head_dim,
                r = config_.kv_lora_rank;
  const size_t l = static_cast<size_t>(layer);
  Tensor q_latent, q_rope;
  project_queries(a, x, positions, q_latent, q_rope);

  Tensor out_latent = new_rows(dtype_, N * H, r);  // Σ_j p_j · c_kv[j] per (row, head)
  int64_t row = 0;
  for (const CacheSpan& span : spans) {
    const LatentCache& cache = *span.cache;
    // a long prefill attends in blocks of query rows, bounding the score matrix
    const int64_t block = std::max<int64_t>(1, kMaxScores / (H * (cache.length + span.rows)));
    for (int64_t i = 0; i < span.rows; i += block) {
      const int64_t begin = (row + i) * H, end = (row + std::min(i + block, span.rows)) * H;
      Tensor out_rows = out_latent.slice(begin, end);
      attend(q_latent.slice(begin, end), q_rope.slice(begin, end), cache.latent[l], cache.rope_key[l], cache.length + i,
             out_rows);
    }
    row += span.rows;
  }

  // absorb W_UV: head h's latent output [N, r] times its v rows of kv_b_proj [dv, r], transposed
  const Tensor& kv_b = a.kv_b_proj->value;
  const Tensor out_rows = out_latent.view({N, H * r});
  Tensor out_head_latent = new_rows(dtype_, N, r), out_head = new_rows(dtype_, N, dv);
  Tensor attn = new_rows(dtype_, N, H * dv);
  for (int64_t h = 0; h < H; ++h) {
    ops::copy_columns(out_rows, h * r, out_head_latent);
    ops::gemm(false, true, 1.0, out_head_latent, kv_b.slice(h * (dn + dv) + dn, (h + 1) * (dn + dv)), 0.0, out_head);
    ops::set_columns(attn, h * dv, out_head);
  }
  round_output(*a.o_proj, attn);  // the training path rounds the attention core's output alike
  return linear(attn, *a.o_proj);
}

Tensor DecodeEngine::moe(const Layer& layer, const Tensor& h) const {
  const int64_t N = h.dim(0), K = router_.top_k, E = router_.n_experts;
  const Tensor logits = linear(h, *layer.gate);
  Tensor scores = empty_like(logits, logits.shape()), weights = empty_like(logits, {N, K});
  Tensor expert_ids = Tensor::empty({N, K}, DType::i32);
  ops::router_forward(router_, logits, layer.gate_bias->value, scores, expert_ids, weights);
  const ops::MoePlan plan = ops::moe_plan(expert_ids, E);
  Tensor permuted_x = empty_like(h, {N * K, h.dim(1)}), permuted_y = empty_like(h, {N * K, h.dim(1)});
  ops::moe_permute(h, plan, permuted_x);
  for (int64_t e = 0; e < E; ++e) {
    const int64_t begin = plan.expert_offsets[static_cast<size_t>(e)],
                  end = plan.expert_offsets[static_cast<size_t>(e) + 1];
    if (begin == end) continue;
    MlpContext ctx;
    Tensor rows_out = permuted_y.slice(begin, end);
    layer.experts[static_cast<size_t>(e)].forward(permuted_x.slice(begin, end), ctx, rows_out);
  }
  Tensor y = empty_like(h, h.shape());
  ops::moe_unpermute(permuted_y, weights, plan, y);
  if (layer.shared) {
    MlpContext ctx;
    Tensor shared_y = empty_like(h, h.shape());
    layer.shared->forward(h, ctx, shared_y);
    ops::add_(y, shared_y);
  }
  return y;
}

Tensor DecodeEngine::ffn(const Layer& layer, const Tensor& h) const {
  if (!layer.dense) return moe(layer, h);
  MlpContext ctx;
  Tensor y = empty_like(h, h.shape());
  layer.dense->forward(h, ctx, y);
  return y;
}

Tensor DecodeEngine::forward(std::span<const int32_t> tokens, std::span<const CacheSpan> spans) {
  const auto N = static_cast<int64_t>(tokens.size());
  std::vector<int32_t> position_values;
  position_values.reserve(tokens.size());
  for (const CacheSpan& span : spans) {
    if (span.cache->length + span.rows > span.cache->capacity()) {
      throw std::invalid_argument("DecodeEngine::forward: " + std::to_string(span.rows) + " rows overflow a cache of " +
                                  std::to_string(span.cache->length) + "/" + std::to_string(span.cache->capacity()) +
                                  " positions");
    }
    for (int64_t i = 0; i < span.rows; ++i) position_values.push_back(static_cast<int32_t>(span.cache->length + i));
  }
  if (static_cast<int64_t>(position_values.size()) != N) {
    throw std::invalid_argument("DecodeEngine::forward: the spans cover " + std::to_string(position_values.size()) +
                                " rows, not the " + std::to_string(N) + " tokens");
  }
  if (position_values.empty()) return Tensor::empty({0, config_.hidden_size}, dtype_);
  if (*std::max_element(position_values.begin(), position_values.end()) >= rope_.cos.dim(0)) {
    throw std::invalid_argument("DecodeEngine::forward: position beyond the engine's " +
                                std::to_string(rope_.cos.dim(0)) + " positions");
  }
  const Tensor positions = Tensor::from<int32_t>(std::span<const int32_t>(position_values), {N});
  const Tensor ids = Tensor::from<int32_t>(tokens, {N});

  Tensor x = embedding_->forward(ids);
  for (size_t l = 0; l < layers_.size(); ++l) {
    const Layer& layer = layers_[l];
    RmsNormContext norm;
    const Tensor attn_in = layer.input_norm->forward(x, norm);
    append_to_caches(static_cast<int64_t>(l), attn_in, positions, spans);
    ops::add_(x, attention(static_cast<int64_t>(l), attn_in, positions, spans));
    if (layer.bf16_residual) round_to_bf16_(x);
    const Tensor ffn_in = layer.post_attention_norm->forward(x, norm);
    ops::add_(x, ffn(layer, ffn_in));
    if (layer.bf16_residual) round_to_bf16_(x);
  }
  for (const CacheSpan& span : spans) span.cache->length += span.rows;
  RmsNormContext norm;
  return final_norm_->forward(x, norm);
}

Tensor DecodeEngine::logits(const Tensor& hidden) const {
  return linear(hidden, *head_);
}

}  // namespace dsx::grpo::detail
