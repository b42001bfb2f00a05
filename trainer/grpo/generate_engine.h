// The numerical core behind grpo::Generator (generate.h): the main model's forward pass over rows
// of tokens that continue per-sequence latent KV caches. Internal to trainer/grpo.
//
// The weights are the Model's own parameters, looked up by their Hugging Face names, and the
// math is the training modules' (trainer/model/: the same RMSNorm, SwiGLU, router, RoPE table and
// softmax scale), except inside attention, which uses MLA's absorbed form over the cache:
//
//   q_latent[h] = q_nope[h] · W_UK[h]                 W_UK[h] = kv_b_proj rows of head h's k_nope  [dn, r]
//   score[h, j] = scale · (q_latent[h] · c_kv[j] + q_rope[h] · k_rope[j])      j ≤ query position
//   out[h]      = (Σ_j softmax(score[h])_j · c_kv[j]) · W_UV[h]ᵀ   W_UV[h] = its v rows  [dv, r]
//
// which equals the training path's softmax(q·kᵀ)·v with k_nope = W_UK·c, v = W_UV·c, up to
// rounding. The per-head keys and values are never formed. The linear helpers follow each weight's
// precision setting (FP8 GEMMs, bf16 outputs) like the training modules; the absorbed attention
// core computes in the compute dtype.
#pragma once
#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "kernels/ops/rope.h"
#include "kernels/ops/router.h"
#include "kernels/tensor.h"
#include "trainer/model/config.h"
#include "trainer/model/layers.h"
#include "trainer/model/parameters.h"

namespace dsx {
class Model;
}

namespace dsx::grpo::detail {

// One sequence's KV cache: per layer, the normed latent c_kv and the rotated rope key of each
// cached position (kv_lora_rank + qk_rope_head_dim values per token and layer).
struct LatentCache {
  std::vector<Tensor> latent;    // per layer [capacity, kv_lora_rank]
  std::vector<Tensor> rope_key;  // per layer [capacity, qk_rope_head_dim]
  int64_t length = 0;            // positions cached so far

  int64_t capacity() const { return latent.empty() ? 0 : latent.front().dim(0); }
  // The first `length` positions of `other` (same layout) become this cache's content.
  void copy_prefix(const LatentCache& other, int64_t length);
};

// `rows` consecutive rows of one forward call that continue `cache`: they sit at positions
// cache->length, cache->length + 1, ...
struct CacheSpan {
  LatentCache* cache = nullptr;
  int64_t rows = 0;
};

class DecodeEngine {
 public:
  // Reads the model's current weights (by reference: later in-place updates are seen). Positions
  // below max_positions can be decoded.
  DecodeEngine(Model& model, int64_t max_positions);

  LatentCache new_cache(int64_t capacity) const;

  // tokens [N] laid out span after span (Σ rows = N). Appends each span's rows to its cache and
  // returns the final-norm hidden states [N, hidden]; rows of different spans share every linear
  // layer, attention is per span over its own cache. A cache appears in at most one span.
  Tensor forward(std::span<const int32_t> tokens, std::span<const CacheSpan> spans);
  // Output-head logits [N, vocab] of final-norm hidden states.
  Tensor logits(const Tensor& hidden) const;

  const ModelConfig& config() const { return config_; }
  DType dtype() const { return dtype_; }

 private:
  struct Attention {
    Parameter* q_a_proj = nullptr;  // query compression, or
    std::optional<RmsNorm> q_a_norm;
    Parameter* q_b_proj = nullptr;
    Parameter* q_proj = nullptr;  // the direct query projection
    Parameter* kv_a_proj = nullptr;
    std::optional<RmsNorm> kv_a_norm;
    Parameter* kv_b_proj = nullptr;
    Parameter* o_proj = nullptr;
  };
  struct Layer {
    std::optional<RmsNorm> input_norm, post_attention_norm;
    bool bf16_residual = false;
    Attention attention;
    std::optional<Mlp> dense;   // dense layers
    Parameter* gate = nullptr;  // MoE layers: router gate, selection bias, experts
    Parameter* gate_bias = nullptr;
    std::vector<Mlp> experts;
    std::optional<Mlp> shared;
  };

  void attend(const Tensor& q_latent, const Tensor& q_rope, const Tensor& latent_cache, const Tensor& rope_cache,
              int64_t first_position, Tensor& out) const;
  Tensor attention(int64_t layer, const Tensor& x, const Tensor& positions, std::span<const CacheSpan> spans) const;
  // [N·H, r] latent-space queries and the rotated rope queries [N·H, dr] of the rows
  void project_queries(const Attention& a, const Tensor& x, const Tensor& positions, Tensor& q_latent,
                       Tensor& q_rope) const;
  // the rows' normed latents and rotated rope keys, written after each span's cached positions
  // (forward advances the caches' lengths once every layer has written)
  void append_to_caches(int64_t layer, const Tensor& x, const Tensor& positions,
                        std::span<const CacheSpan> spans) const;
  Tensor ffn(const Layer& layer, const Tensor& h) const;
  Tensor moe(const Layer& layer, const Tensor& h) const;

  ModelConfig config_;
  DType dtype_;
  double softmax_scale_;
  ops::RouterConfig router_;
  ops::RopeTable rope_;
  std::optional<Embedding> embedding_;
  std::vector<Layer> layers_;
  std::optional<RmsNorm> final_norm_;
  Parameter* head_ = nullptr;
};

}  // namespace dsx::grpo::detail
