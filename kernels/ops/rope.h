#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace dsx::ops {

// Rotary position embedding with the YaRN scaling of DeepSeek configs (HF `rope_scaling`
// with type "yarn": factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
// mscale_all_dim). scaling == none is plain RoPE with base theta.
struct RopeConfig {
  enum class Scaling { none, yarn };
  int64_t dim = 64;  // rotary dimension (qk_rope_head_dim), even
  double theta = 10000.0;
  Scaling scaling = Scaling::none;
  double factor = 1.0;
  int64_t original_max_position_embeddings = 4096;
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 1.0;
  double mscale_all_dim = 0.0;
};

// cos/sin [max_positions, dim/2] in dtype; for YaRN both already carry the attention factor
// mscale(factor, mscale) / mscale(factor, mscale_all_dim) as Hugging Face applies it.
struct RopeTable {
  Tensor cos;
  Tensor sin;
};
RopeTable rope_table(const RopeConfig& config, int64_t max_positions, DType dtype);

// YaRN's correction of the softmax scale: the attention scale is head_dim^-0.5 times the
// square of this (mscale(factor, mscale_all_dim); 1 without YaRN).
// E.g. DeepSeek-V3 (factor 40, mscale_all_dim 1): 0.1·ln 40 + 1 ≈ 1.3689.
double rope_softmax_scale_factor(const RopeConfig& config);

// Rotates consecutive pairs (x[2i], x[2i+1]) of the last dimension by angle pos·freq_i:
// (a, b) -> (a·cos - b·sin, a·sin + b·cos). x [T, H, dim] (H may be 1: the shared MLA rope
// key), positions [T] (i32|i64, < max_positions) -> out [T, H, dim], which may be x itself.
// (Hugging Face's DeepSeek code de-interleaves q and k before rotate_half; the same
// permutation on q and k leaves every attention score unchanged, so weights are
// interchangeable.)
void rope_forward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& out);
// dx = Rᵀ dout (overwritten; may be dout itself). Rᵀ, not R⁻¹: with YaRN's attention factor
// in cos/sin the map is a scaled rotation.
void rope_backward(const Tensor& dout, const Tensor& positions, const RopeTable& table, Tensor& dx);

}  // namespace dsx::ops
