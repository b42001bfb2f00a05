// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
#pragma once
#include <string>

#include "kernels/tensor.h"

namespace dsx::cuda {

// Causal attention on the GPU (kernels/ops/attention.h). q, k, v in f32 or bf16 (one dtype),
// head dims up to 256; out has q's dtype. lse is [B, H, S] in q's dtype or f32 (use f32 with
// bf16 inputs: a bf16 lse is off by up to ~0.03 at |lse| ~ 8, which the backward turns into
// ~3% errors in the recomputed probabilities). Implementations (kernels/cuda/attention.cu):
// cuDNN's fused flash attention for bf16 without segment ids where cuDNN supports the shape,
// dsx's own kernels otherwise; both save the same lse, so either backward follows either forward.
void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& segment_ids,
                       Tensor& out, Tensor& lse);
void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, double scale, const Tensor& segment_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv);

// Which implementation attention_forward/backward use. automatic: cuDNN where it applies and
// builds a plan, own kernels otherwise. own / cudnn force one (cudnn throws std::invalid_argument
// for a call it cannot run). The default comes from the environment variable
// DSX_CUDA_ATTENTION=auto|own|cudnn (read once), else automatic.
enum class AttentionImpl { automatic, own, cudnn };
void set_attention_impl(AttentionImpl impl);
AttentionImpl attention_impl();

// Whether cuDNN's fused attention can run this call (bf16, no segment ids, supported head dims
// and device, a plan that builds); the reason in *why_not otherwise. backward selects the
// backward graph. Builds and caches the plan on first use of a shape.
bool cudnn_attention_available(const Tensor& q, const Tensor& v, const Tensor& segment_ids, bool backward,
                               std::string* why_not = nullptr);

}  // namespace dsx::cuda
