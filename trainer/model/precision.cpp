#include "trainer/model/precision.h"

#include <fnmatch.h>

#include <stdexcept>
#include <string>

#include "kernels/codecs.h"
#include "kernels/ops/bf16_gemm.h"
#include "kernels/ops/fp8.h"
#include "kernels/ops/linear.h"
#include "trainer/model/parameters.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

void check_f32(const Tensor& t, const char* op, const char* name) {
  if (t.dtype() != DType::f32) {
    throw std::invalid_argument(std::string(op) + ": " + name + " must be an f32 tensor, got " + t.describe());
  }
}

void check_f32_or_bf16(const Tensor& t, const char* op, const char* name) {
  if (t.dtype() != DType::f32 && t.dtype() != DType::bf16) {
    throw std::invalid_argument(std::string(op) + ": " + name + " must be an f32 or bf16 tensor, got " + t.describe());
  }
}

ops::Fp8Matrix quantize(const Tensor& x, ops::Fp8Scaling scaling) {
  ops::Fp8Matrix q = ops::Fp8Matrix::empty(x.dim(0), x.dim(1), scaling, x.device());
  ops::fp8_quantize(x, q);
  return q;
}

ops::Fp8Matrix quantize_transposed(const Tensor& x) {
  ops::Fp8Matrix qt = ops::Fp8Matrix::empty(x.dim(1), x.dim(0), ops::Fp8Scaling::tile_1x128, x.device());
  ops::fp8_quantize_transposed(x, qt);
  return qt;
}

GemmKind gemm_kind(GemmPrecision p) {
  switch (p) {
    case GemmPrecision::fp32:
      return GemmKind::fp32;
    case GemmPrecision::bf16:
      return GemmKind::bf16;
    case GemmPrecision::fp8_blockwise:
      return GemmKind::fp8_blockwise;
  }
  throw std::invalid_argument("precision_policy: unknown GemmPrecision");
}

// The matrices the model multiplies by: every 2-D parameter except the embedding table, which
// is one only when it doubles as the output head.
bool is_gemm_weight(const ParamSpec& spec, bool tie_word_embeddings) {
  return spec.shape.size() == 2 && (tie_word_embeddings || spec.name != "model.embed_tokens.weight");
}

}  // namespace

bool is_fp8_gemm_weight(std::string_view name) {
  // self_attn.*_proj covers q_a/q_b/q, kv_a_proj_with_mqa, kv_b and o (not the layernorms);
  // mlp.*_proj covers the dense FFN and the experts (not the router, mlp.gate.weight).
  const bool projection = ends_with(name, "_proj.weight") || ends_with(name, "_proj_with_mqa.weight");
  const bool attention_or_ffn =
      name.find(".self_attn.") != std::string_view::npos || name.find(".mlp.") != std::string_view::npos;
  return projection && attention_or_ffn;
}

bool name_matches(std::string_view pattern, std::string_view name) {
  return fnmatch(std::string(pattern).c_str(), std::string(name).c_str(), 0) == 0;
}

bool PrecisionPolicy::full_precision() const {
  if (gemm != GemmKind::fp32 || bf16_activations) return false;
  for (const GemmException& e : exceptions)
    if (e.gemm != GemmKind::fp32) return false;
  return true;
}

LinearPrecision PrecisionPolicy::for_parameter(std::string_view name) const {
  LinearPrecision p;
  p.gemm = is_fp8_gemm_weight(name) ? gemm : GemmKind::fp32;
  for (const GemmException& e : exceptions) {
    if (name_matches(e.pattern, name)) {
      p.gemm = e.gemm;
      break;
    }
  }
  // The router's logits stay in the compute dtype: V3 keeps the gating in high precision, and a
  // bf16 rounding would create ties in the top-k selection.
  p.bf16_output = bf16_activations && !ends_with(name, ".mlp.gate.weight");
  return p;
}

PrecisionPolicy precision_policy(const PrecisionSection& section) {
  PrecisionPolicy p;
  p.gemm = gemm_kind(section.gemm);
  p.bf16_activations = section.activations == ActivationPrecision::bf16;
  for (const PrecisionException& e : section.exceptions) p.exceptions.push_back({e.modules, gemm_kind(e.gemm)});
  return p;
}

std::vector<ExceptionMatches> exception_matches(const PrecisionSection& section, const ModelConfig& config) {
  const auto& exceptions = section.exceptions;
  std::vector<ExceptionMatches> out(exceptions.size());
  for (const ParamSpec& spec : model_param_specs(config)) {
    const bool gemm_weight = is_gemm_weight(spec, config.tie_word_embeddings);
    bool decided = false;  // by an earlier exception
    for (size_t i = 0; i < exceptions.size(); ++i) {
      if (!name_matches(exceptions[i].modules, spec.name)) continue;
      ++out[i].parameters;
      if (!gemm_weight) continue;
      ++out[i].gemm_weights;
      if (!decided) ++out[i].decided;
      decided = true;
    }
  }
  return out;
}

void round_to_bf16_(Tensor& x) {
  check_f32(x, "round_to_bf16_", "x");  // slices and views are contiguous rows
  if (x.device() != Device::cpu) {      // the device conversion rounds with the same codec
    x.copy_from(x.to(DType::bf16));
    return;
  }
  float* v = x.data<float>();
  const int64_t n = x.numel();
  for (int64_t i = 0; i < n; ++i) v[i] = codec::bf16_to_float(codec::float_to_bf16(v[i]));
}

void fp8_linear_forward(const Tensor& x, const Tensor& w, Tensor& y) {
  check_f32(x, "fp8_linear_forward", "x");
  check_f32(w, "fp8_linear_forward", "w");
  check_f32(y, "fp8_linear_forward", "y");
  ops::fp8_gemm(quantize(x, ops::Fp8Scaling::tile_1x128), quantize(w, ops::Fp8Scaling::block_128x128), y);
}

void fp8_linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx) {
  check_f32(dy, "fp8_linear_backward_input", "dy");
  check_f32(w, "fp8_linear_backward_input", "w");
  check_f32(dx, "fp8_linear_backward_input", "dx");
  // W's blocks transpose exactly, so Dgrad uses the Fprop quantization of W transposed.
  const ops::Fp8Matrix wt = ops::fp8_transpose_blocks(quantize(w, ops::Fp8Scaling::block_128x128));
  ops::fp8_gemm(quantize(dy, ops::Fp8Scaling::tile_1x128), wt, dx);
}

void fp8_linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw) {
  check_f32(dy, "fp8_linear_backward_weight", "dy");
  check_f32(x, "fp8_linear_backward_weight", "x");
  check_f32(dw, "fp8_linear_backward_weight", "dw");
  // K is the token dimension: both operands re-quantized from high precision in 1×128 tiles along it.
  ops::fp8_gemm(quantize_transposed(dy), quantize_transposed(x), dw, /*accumulate=*/true);
}

void bf16_linear_forward(const Tensor& x, const Tensor& w, Tensor& y) {
  check_f32(x, "bf16_linear_forward", "x");
  check_f32_or_bf16(w, "bf16_linear_forward", "w");  // a bf16 copy of the weight (GemmWeightCopies) is used as is
  check_f32(y, "bf16_linear_forward", "y");
  ops::bf16_gemm(false, true, x, w, y);
}

void bf16_linear_backward_input(const Tensor& dy, const Tensor& w, Tensor& dx) {
  check_f32(dy, "bf16_linear_backward_input", "dy");
  check_f32_or_bf16(w, "bf16_linear_backward_input",
                    "w");  // a bf16 copy of the weight (GemmWeightCopies) is used as is
  check_f32(dx, "bf16_linear_backward_input", "dx");
  ops::bf16_gemm(false, false, dy, w, dx);
}

void bf16_linear_backward_weight(const Tensor& dy, const Tensor& x, Tensor& dw) {
  check_f32(dy, "bf16_linear_backward_weight", "dy");
  check_f32(x, "bf16_linear_backward_weight", "x");
  check_f32(dw, "bf16_linear_backward_weight", "dw");
  // dW [out, in] += dyᵀ · x: the fp32 gradient accumulates in fp32 (fp32 master gradients, V3 §3.3).
  ops::bf16_gemm(true, false, dy, x, dw, /*accumulate=*/true);
}

void linear_forward_in(GemmKind gemm, const Tensor& x, const Tensor& w, Tensor& y) {
  switch (gemm) {
    case GemmKind::fp32:
      return ops::linear_forward(x, w, y);
    case GemmKind::bf16:
      return bf16_linear_forward(x, w, y);
    case GemmKind::fp8_blockwise:
      return fp8_linear_forward(x, w, y);
  }
}

void linear_backward_input_in(GemmKind gemm, const Tensor& dy, const Tensor& w, Tensor& dx) {
  switch (gemm) {
    case GemmKind::fp32:
      return ops::linear_backward_input(dy, w, dx);
    case GemmKind::bf16:
      return bf16_linear_backward_input(dy, w, dx);
    case GemmKind::fp8_blockwise:
      return fp8_linear_backward_input(dy, w, dx);
  }
}

void linear_backward_weight_in(GemmKind gemm, const Tensor& dy, const Tensor& x, Tensor& dw) {
  switch (gemm) {
    case GemmKind::fp32:
      return ops::linear_backward_weight(dy, x, dw);
    case GemmKind::bf16:
      return bf16_linear_backward_weight(dy, x, dw);
    case GemmKind::fp8_blockwise:
      return fp8_linear_backward_weight(dy, x, dw);
  }
}

}  // namespace dsx
