// Multi-head latent attention (DeepSeek-V2/V3), as Hugging Face's DeepseekV3Attention computes
// it in training (no weight absorption):
//
//   q        = q_b_proj(RMSNorm(q_a_proj(x)))      or q_proj(x) when q_lora_rank == 0
//   [c, kpe] = kv_a_proj_with_mqa(x)               c: kv_lora_rank latent, kpe: the rope key
//   [k_nope, v] = kv_b_proj(RMSNorm(c))            per head
//   q = [q_nope, rope(q_pe)],  k = [k_nope, rope(kpe)]   (one rope key shared by all heads)
//   out = o_proj(causal_attention(q, k, v, scale = qk_head_dim^-0.5 · mscale²))
//
// Tensor parallelism (ModelParallel::tp): a TP rank holds H/tp heads (its rows of q_b_proj or
// q_proj and kv_b_proj, its columns of o_proj) and the whole down-projections and latent norms.
// The forward sums the o_proj partial outputs over TP; the backward sums the gradients of the
// latents and of the shared rope key (each rank's heads contribute a part), so the
// down-projections get complete gradients on every rank. Under sequence parallelism x and dy
// are all the tokens (the caller gathers them) and the output and dx this rank's token rows.
//
// Shapes: T tokens, H heads (per TP rank), dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv = v_head_dim,
// Dqk = dn + dr. q and k are assembled as [T·H, Dqk], v as [T·H, dv] ([B, S, H, ·] row-major).
#pragma once
#include <cstdint>
#include <optional>
#include <string>

#include "trainer/model/config.h"
#include "trainer/model/expert_parallel.h"
#include "trainer/model/layers.h"
#include "trainer/model/parameters.h"
#include "trainer/model/recompute.h"
#include "trainer/model/sequence.h"

namespace dsx {

struct MlaContext {
  // always kept between forward and backward
  Tensor q_latent;   // q_a_proj(x) [T, q_lora_rank] (query compression only)
  Tensor kv_latent;  // c [T, kv_lora_rank]
  Tensor k_pe;       // the rope key before rotation [T, dr]
  RmsNormContext q_norm, kv_norm;
  Tensor attn_out, lse;  // [B, S, H, dv], [B, H, S]; attn_out in the core's dtype (bf16_core)
  // dropped after forward with recompute.rmsnorm
  Tensor q_latent_normed, kv_latent_normed;
  // dropped after forward with recompute.mla_up_proj
  Tensor q_states, k_states, v_states;  // attention inputs, in the core's dtype
  // kept by backward_input for backward_weight: gradients of the projections' outputs
  Tensor d_o_proj, d_q, d_kv_b, d_kv_a, d_q_a;
};

class Mla {
 public:
  Mla(ParameterStore& params, const std::string& prefix, const ModelConfig& config, const RecomputePolicy& recompute,
      const ModelParallel& parallel = {});
  Tensor forward(const Tensor& x, const SequenceInfo& seq, MlaContext& ctx) const;
  Tensor backward_input(const Tensor& x, const Tensor& dy, const SequenceInfo& seq, MlaContext& ctx) const;
  void backward_weight(const Tensor& x, MlaContext& ctx) const;

 private:
  // x -> q_latent(+normed), kv_latent(+normed), k_pe
  void project_down(const Tensor& x, MlaContext& ctx) const;
  // normed latents (and x for q_proj) -> q_states, k_states, v_states
  void project_up(const Tensor& x, const SequenceInfo& seq, MlaContext& ctx) const;
  // brings back what forward dropped under the recompute policy
  void recompute(const Tensor& x, const SequenceInfo& seq, MlaContext& ctx) const;
  Tensor attention_4d(const Tensor& t, const SequenceInfo& seq, int64_t head_dim) const;
  // With bf16 activations the attention core (inputs, output, their gradients) runs on bf16
  // tensors, as cuDNN's fused attention does on the GPU; lse stays f32.
  bool bf16_core() const;
  // d(normed kv latent) [T, kv_lora_rank], d(rotated rope key) [T, dr] and, with query
  // compression, d(normed q latent) [T, q_lora_rank]: summed over the TP group in one message.
  void sum_latent_grads_over_tp(Tensor& d_kv_normed, Tensor& dk_pe_rotated, Tensor& d_q_normed) const;

  int64_t heads_, nope_dim_, rope_dim_, v_dim_, kv_lora_rank_;
  bool q_lora_;
  double softmax_scale_;
  RecomputePolicy recompute_;
  ModelParallel parallel_;
  Parameter* q_a_proj_ = nullptr;
  Parameter* q_b_proj_ = nullptr;
  Parameter* q_proj_ = nullptr;
  Parameter* kv_a_proj_;
  Parameter* kv_b_proj_;
  Parameter* o_proj_;
  std::optional<RmsNorm> q_a_norm_;  // query compression only
  RmsNorm kv_a_norm_;
};

// RoPE settings of the config in the op's terms.
ops::RopeConfig rope_config(const ModelConfig& config);

}  // namespace dsx
