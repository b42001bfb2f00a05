// Which activations a module drops after forward and recomputes in backward (activation
// recompute, selectable per module kind as DeepSeek-V3 did). Recomputation reruns the same ops
// on the same inputs, so gradients are bit-identical with and without it; only memory changes.
#pragma once

namespace dsx {

struct RecomputePolicy {
  bool rmsnorm = false;      // RMSNorm outputs inside decoder layers: input/post-attention norms, MLA latent norms
  bool mla_up_proj = false;  // MLA up-projections: q (q_b_proj / q_proj), k and v (kv_b_proj) and the roped q/k
  bool moe_act = false;      // SwiGLU outputs of the MoE layers' experts (routed and shared)
  bool full = false;         // decoder layers keep only their input and rerun their whole forward in backward
};

}  // namespace dsx
