#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {

// Causal scaled-dot-product attention with separate q/k and v head dims (MLA: 192 and 128).
// q, k [B, S, H, Dqk], v [B, S, H, Dv] -> out [B, S, H, Dv], lse [B, H, S] (log-sum-exp of
// the scaled scores of each query row, saved for backward).
// Position i attends to j <= i; when segment_ids ([B, S], i32|i64) is defined, also only to
// j with the same segment id (document masking for packed sequences; ids need not be
// contiguous). scale multiplies q·k. out has q's dtype: f32 or f64, or bf16 (what training with
// bf16 activations stores; on the GPU cuDNN's fused attention runs it). lse has q's dtype, f32
// for bf16 inputs. On the CPU a bf16 call is the f32 op on the (exact) widened inputs with out
// rounded to bf16 once; on the GPU the probabilities are also rounded to bf16 before P·V, as
// flash attention does, so the two differ by up to ~2^-8 relative.
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& segment_ids,
                       Tensor& out, Tensor& lse);
// dq, dk, dv (overwritten), same shapes and dtype as q, k, v (bf16 calls: computed in f32 on the
// CPU, rounded once). out and lse are the forward's; the
// probabilities are recomputed from lse rather than stored (no [S, S] buffer is kept).
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, double scale, const Tensor& segment_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv);

}  // namespace dsx::ops
