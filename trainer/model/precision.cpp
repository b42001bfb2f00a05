#include "trainer/model/precision.h"

#include <stdexcept>
#include <string>

#include "kernels/codecs.h"
#include "kernels/ops/fp8.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

void check_f32(const Tensor& t, const char* op, const char* name) {
  if (t.dtype() != DType::f32 || t.device() != Device::cpu) {
    throw std::invalid_argument(std::string(op) + ": " + name + " must be an f32 CPU tensor, got " + t.describe());
  }
}

ops::Fp8Matrix quantize(const Tensor& x, ops::Fp8Scaling scaling) {
  ops::Fp8Matrix q = ops::Fp8Matrix::empty(x.dim(0), x.dim(1), scaling);
  ops::fp8_quantize(x, q);
  return q;
}

ops::Fp8Matrix quantize_transposed(const Tensor& x) {
  ops::Fp8Matrix qt = ops::Fp8Matrix::empty(x.dim(1), x.dim(0), ops::Fp8Scaling::tile_1x128);
  ops::fp8_quantize_transposed(x, qt);
  return qt;
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

LinearPrecision PrecisionPolicy::for_parameter(std::string_view name) const {
  // The router's logits stay in the compute dtype: V3 keeps the gating in high precision, and a
  // bf16 rounding would create ties in the top-k selection.
  const bool router_gate = ends_with(name, ".mlp.gate.weight");
  return {fp8_gemm && is_fp8_gemm_weight(name), bf16_activations && !router_gate};
}

PrecisionPolicy precision_policy(const PrecisionSection& section) {
  PrecisionPolicy p;
  p.fp8_gemm = section.gemm == GemmPrecision::fp8_blockwise;
  p.bf16_activations = section.activations == ActivationPrecision::bf16;
  return p;
}

void round_to_bf16_(Tensor& x) {
  check_f32(x, "round_to_bf16_", "x");  // slices and views are contiguous rows
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

}  // namespace dsx
