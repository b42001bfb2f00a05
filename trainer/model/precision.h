// Mixed precision of the model's numerics (docs/FP8.md, DeepSeek-V3 report §3.3), built from the
// recipe's `precision` section.
//
//   precision.gemm: fp8_blockwise  the Fprop, Dgrad and Wgrad GEMMs of the attention projections
//       (q_a/q_b/q, kv_a_proj_with_mqa, kv_b, o), the dense FFN and the experts (routed and
//       shared) run through fp8_linear_*: E4M3 with 1×128 tiles for activations and activation
//       gradients, 128×128 blocks for weights, fp32 promotion every 128 elements of K, f32
//       outputs. The embedding, the output head, the router gate, MTP's eh_proj, the norms and the
//       attention core keep the compute dtype (V3 keeps them in bf16/fp32).
//   precision.activations: bf16    every stored activation (module outputs: embedding, norms,
//       linears, SwiGLU, attention core, the residual stream; not the router's logits) is rounded to bf16
//       (round-to-nearest-even, kernels/codecs.h) in place, as a GPU storing bf16 would; the
//       math between roundings stays f32.
//   gemm bf16 is treated as the f32 GEMM (operands are already bf16-rounded when
//   activations: bf16; weight rounding is not emulated).
//
// Both apply to f32 compute only: Model rejects a non-default policy with compute dtype f64 (the
// gradient-check path), as recipe validation does for model.dtype f64.
#pragma once
#include <string_view>

#include "kernels/tensor.h"

namespace dsx {

struct PrecisionSection;  // trainer/recipe/recipe.h

// How the module that owns a weight computes; stored on the Parameter, set by Model.
struct LinearPrecision {
  bool fp8_gemm = false;     // this weight's GEMMs run fp8_linear_*
  bool bf16_output = false;  // the module's stored output is rounded to bf16
};

struct PrecisionPolicy {
  bool fp8_gemm = false;  // DeepSeek-V3's FP8 GEMM set (see above)
  bool bf16_activations = false;

  bool full_precision() const { return !fp8_gemm && !bf16_activations; }
  // The precision of the module owning the parameter called `name` (Hugging Face name).
  LinearPrecision for_parameter(std::string_view name) const;
};

PrecisionPolicy precision_policy(const PrecisionSection& section);

// True for the weights whose GEMMs DeepSeek-V3 runs in FP8: attention projections, dense FFN and
// expert (routed and shared) projections.
bool is_fp8_gemm_weight(std::string_view name);

// x (f32, contiguous) rounded to bf16 and back, in place.
void round_to_bf16_(Tensor& x);

// The three GEMMs of y = x · Wᵀ in fine-grained FP8 (docs/FP8.md §4), f32 in and out.
//   Fprop: y [N, out] = q(x, 1×128) · q(W, 128×128)ᵀ            (y overwritten)
//   Dgrad: dx [N, in] = q(dy, 1×128) · transpose_blocks(q(W))ᵀ  (dx overwritten)
//   Wgrad: dW [out, in] += q(dyᵀ, 1×128 along N) · q(xᵀ, 1×128 along N)ᵀ
void fp8_linear_forward(const Tensor& x, const Tensor& w, Tensor& y);
void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx);
void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw);

}  // namespace dsx
