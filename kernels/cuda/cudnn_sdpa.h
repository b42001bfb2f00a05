// cuDNN's fused scaled-dot-product attention (flash attention) through the cuDNN 9 backend
// API: causal, bf16 q/k/v in dsx's [B, S, H, D] layout (Dqk ≠ Dv allowed), f32 softmax stats.
// Plain host code (kernels/cuda/cudnn_sdpa.cpp); used by kernels/cuda/attention.cu.
#pragma once
#include <string>

#include "kernels/tensor.h"

namespace dsx::cuda::cudnn_sdpa {

struct Shape4 {
  int64_t batch, seq, heads, dqk, dv;
};

// Whether the graph of this shape (forward or backward) has a cuDNN execution plan on the
// current device; builds and caches it on first use. *why_not gets cuDNN's reason otherwise.
bool available(const Shape4& shape, bool backward, std::string* why_not);

// The preconditions that need no plan: dims multiple of 8 and at most 256, device of compute
// capability >= 8.0, cuDNN >= 9.6 (not 9.10.0/9.10.1). aligned(): 16-byte aligned pointers.
bool shape_supported(const Shape4& shape, std::string* why_not);
bool aligned(const Tensor& t);

// out [B, S, H, Dv] bf16; lse [B, H, S] f32 = cuDNN's stats: max + log Σ exp(scaled score − max),
// the natural-log log-sum-exp of the scaled scores, i.e. dsx's lse.
void forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out, Tensor& lse);
// dq, dk, dv overwritten; lse f32 as saved by forward (either implementation's).
void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
              const Tensor& dout, double scale, Tensor& dq, Tensor& dk, Tensor& dv);

}  // namespace dsx::cuda::cudnn_sdpa
