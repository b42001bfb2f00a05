// dsx's own flash-attention kernels (attention_forward.cu, attention_backward.cu), called by
// dsx::cuda::attention_forward/backward (attention.cu) after their checks. Plain host header.
#pragma once
#include "kernels/tensor.h"

namespace dsx::cuda::attn {

// q, k [B, S, H, Dqk], v [B, S, H, Dv] in f32 or bf16 (all one dtype), Dqk, Dv <= 256,
// segment_ids undefined or [B, S] i64 on the device. Writes out (q's dtype) and lse ([B, H, S]
// f32: natural-log log-sum-exp of the scaled scores of each row).
void own_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& segment_ids,
                 Tensor& out, Tensor& lse);

// The FlashAttention-2 backward from the saved lse (f32): overwrites dq, dk, dv (q's dtype).
void own_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                  const Tensor& dout, double scale, const Tensor& segment_ids, Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace dsx::cuda::attn
