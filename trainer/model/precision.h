// Mixed precision of the model's numerics (docs/FP8.md, DeepSeek-V3 report §3.3), built from the
// recipe's `precision` section.
//
//   precision.gemm    the Fprop, Dgrad and Wgrad GEMMs of DeepSeek-V3's FP8 set: the attention
//       projections (q_a/q_b/q, kv_a_proj_with_mqa, kv_b, o), the dense FFN and the experts
//       (routed and shared). The embedding, the output head, the router gate, MTP's eh_proj, the
//       norms and the attention core keep f32 (V3 keeps them in bf16/fp32; dsx takes fp32, so
//       a bf16 run and an FP8 run differ only in that set). Per weight:
//         fp32           ops::linear_* on the f32 values;
//         bf16           ops::bf16_gemm: both operands rounded to bf16 (round-to-nearest-even),
//                        products exact, fp32 accumulation, f32 output (docs/FP8.md §8);
//         fp8_blockwise  fp8_linear_*: E4M3 with 1×128 tiles for activations and activation
//                        gradients, 128×128 blocks for weights, fp32 promotion every 128 elements
//                        of K, f32 outputs (docs/FP8.md §4–5).
//   precision.exceptions   [{modules: PATTERN, gemm: ...}, ...]: a GEMM weight whose Hugging Face
//       name matches PATTERN (fnmatch, as optim.no_decay) uses that gemm instead; the first
//       matching exception wins, and it may name any GEMM weight (the output head, eh_proj, the
//       router gate too). Recipe validation rejects a pattern that matches no GEMM weight.
//   precision.activations: bf16    every stored activation (module outputs: embedding, norms,
//       linears, SwiGLU, attention core, the residual stream; not the router's logits) is rounded to bf16
//       (round-to-nearest-even, kernels/codecs.h) in place, as a GPU storing bf16 would; the
//       math between roundings stays f32. A GEMM's output is rounded by this rule, not by gemm.
//       The attention core goes further: its inputs (q, k, v), output and gradients are bf16
//       tensors (half the memory; on the GPU cuDNN's fused flash attention runs it, whose
//       probabilities are bf16 too), its lse f32 (trainer/model/mla.cpp, kernels/ops/attention.h).
//
// Both apply to f32 compute only: Model rejects a non-default policy with compute dtype f64 (the
// gradient-check path), as recipe validation does for model.dtype f64.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/tensor.h"

namespace dsx {

struct PrecisionSection;  // trainer/recipe/recipe.h
struct ModelConfig;       // trainer/model/config.h

// How one weight's three GEMMs compute (the recipe's GemmPrecision, resolved per weight).
enum class GemmKind : uint8_t { fp32, bf16, fp8_blockwise };

// How the module that owns a weight computes; stored on the Parameter, set by Model.
struct LinearPrecision {
  GemmKind gemm = GemmKind::fp32;  // this weight's Fprop, Dgrad and Wgrad
  bool bf16_output = false;        // the module's stored output is rounded to bf16
};

// One of precision.exceptions.
struct GemmException {
  std::string pattern;  // fnmatch pattern on Hugging Face parameter names
  GemmKind gemm = GemmKind::fp32;
};

struct PrecisionPolicy {
  GemmKind gemm = GemmKind::fp32;  // for DeepSeek-V3's FP8 GEMM set (is_fp8_gemm_weight)
  bool bf16_activations = false;
  std::vector<GemmException> exceptions;  // first match wins

  // No setting asks for less than fp32 (gemm, activations, any exception).
  bool full_precision() const;
  // The precision of the module owning the parameter called `name` (Hugging Face name).
  LinearPrecision for_parameter(std::string_view name) const;
};

PrecisionPolicy precision_policy(const PrecisionSection& section);

// True for the weights whose GEMMs DeepSeek-V3 runs in FP8: attention projections, dense FFN and
// expert (routed and shared) projections. precision.gemm applies to these.
bool is_fp8_gemm_weight(std::string_view name);

// fnmatch(pattern, name) with optim.no_decay's flags (none: `*` also matches dots).
bool name_matches(std::string_view pattern, std::string_view name);

// What the pattern of one precision.exceptions entry matches in a model.
struct ExceptionMatches {
  int64_t parameters = 0;    // parameters whose name matches
  int64_t gemm_weights = 0;  // ... of which GEMM weights (every matrix except an untied embedding table)
  int64_t decided = 0;       // ... of which this exception is the first match (the ones it sets)
};
// For each exception of `section`, in order, over the parameters of `config`.
std::vector<ExceptionMatches> exception_matches(const PrecisionSection& section, const ModelConfig& config);

// x (f32, contiguous) rounded to bf16 and back, in place.
void round_to_bf16_(Tensor& x);

// The three GEMMs of y = x · Wᵀ in fine-grained FP8 (docs/FP8.md §4), f32 in and out.
//   Fprop: y [N, out] = q(x, 1×128) · q(W, 128×128)ᵀ            (y overwritten)
//   Dgrad: dx [N, in] = q(dy, 1×128) · transpose_blocks(q(W))ᵀ  (dx overwritten)
//   Wgrad: dW [out, in] += q(dyᵀ, 1×128 along N) · q(xᵀ, 1×128 along N)ᵀ
void fp8_linear_forward(const Tensor& x, const Tensor& w, Tensor& y);
void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx);
void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw);

// The same three GEMMs in bf16 (ops::bf16_gemm: operands rounded to bf16, fp32 accumulation),
// f32 in and out (w may also be its bf16 copy, Parameter::gemm_copy: the same bits); the Wgrad
// accumulates into the f32 gradient in fp32.
void bf16_linear_forward(const Tensor& x, const Tensor& w, Tensor& y);
void bf16_linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx);
void bf16_linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw);

// The three GEMMs in the given precision: fp32 is ops::linear_* (any compute dtype), the others
// the functions above.
void linear_forward_in(GemmKind gemm, const Tensor& x, const Tensor& w, Tensor& y);
void linear_backward_input_in(GemmKind gemm, const Tensor& dy, const Tensor& w, Tensor& dx);
void linear_backward_weight_in(GemmKind gemm, const Tensor& dy, const Tensor& x, Tensor& dw);

}  // namespace dsx
