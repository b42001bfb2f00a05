// Scalar rules of DeepSeek-V3's fine-grained FP8 (E4M3) quantization, shared by the CPU
// and CUDA backends.
//
// Host+device code (DSX_HOST_DEVICE): the CUDA quantization kernels include this header, so
// they compute bit-identical scales and codes to the CPU reference. Contract: docs/FP8.md.
//
//   scale     = max(amax, kFp8MinAmax) / 448       (fp32 division, round-to-nearest)
//   inv_scale = 448 / max(amax, kFp8MinAmax)       (the quantization multiplier)
//   q         = float_to_e4m3(x * inv_scale)       (satfinite: |q| <= 448 always)
//   x'        = e4m3_to_float(q) * scale           (dequantization)
// With power-of-two scales: scale = the smallest power of two with scale * 448 >= amax,
// inv_scale = 1 / scale (exact), so |x * inv_scale| <= 448 holds exactly and no element ever
// saturates.
//
// The amax floor kFp8MinAmax = 448 · 2^-126 keeps inv_scale finite (<= 2^126) and the scale a
// normal float; an all-zero tile gets scale 2^-126 and codes 0, which dequantize to exact
// zeros. NaN is sticky in the amax, and an amax of inf gives inv_scale 0: either way every
// element of the tile dequantizes to NaN, so a non-finite input cannot pass silently.
//
// The CUDA side must compile these divisions IEEE-rounded (no --use_fast_math, or use
// __fdiv_rn), which is nvcc's default.
#pragma once
#include <cstdint>

#include "kernels/codecs.h"

namespace dsx::fp8 {

// Elements per 1×128 tile and per side of a 128×128 block.
inline constexpr int64_t kTile = 128;
// 448 · 2^-126: the smallest amax the scale computation uses (see above).
inline constexpr float kFp8MinAmax = 448.0f * 1.1754943508222875e-38f;

// Tiles covering n elements; the last one is partial when n is not a multiple of 128.
DSX_HOST_DEVICE int64_t tile_count(int64_t n) {
  return (n + kTile - 1) / kTile;
}

// Elements in tile t of a dimension of n elements (128 except for a partial last tile).
DSX_HOST_DEVICE int64_t tile_extent(int64_t n, int64_t t) {
  const int64_t rest = n - t * kTile;
  return rest < kTile ? rest : kTile;
}

// Index of the scale of element (row, col) in the row-major scale grids of docs/FP8.md:
//   1×128 tiles along the columns: scales [rows, tile_count(cols)]
//   128×128 blocks:                scales [tile_count(rows), tile_count(cols)]
DSX_HOST_DEVICE int64_t tile_scale_index(int64_t row, int64_t col, int64_t cols) {
  return row * tile_count(cols) + col / kTile;
}
DSX_HOST_DEVICE int64_t block_scale_index(int64_t row, int64_t col, int64_t cols) {
  return (row / kTile) * tile_count(cols) + col / kTile;
}

// |x| folded into a running amax. NaN is sticky (once NaN, the amax stays NaN), and the
// function is commutative and associative, so tree reductions on the GPU (warp shuffles)
// give the same amax as a sequential loop.
DSX_HOST_DEVICE float amax_combine(float amax, float x) {
  const float a = x < 0.0f ? -x : x;
  if (amax != amax || a != a) return codec::bits_float(0x7fc00000u);
  return a > amax ? a : amax;
}

struct TileScale {
  float scale;      // dequantization factor: x ≈ e4m3_to_float(q) * scale
  float inv_scale;  // quantization multiplier: q = float_to_e4m3(x * inv_scale)
};

// Rounds a positive normal float up to a power of two (a power of two stays as it is);
// inf and NaN pass through.
DSX_HOST_DEVICE float round_up_to_power_of_two(float s) {
  const uint32_t bits = codec::float_bits(s);
  if ((bits & 0x7f800000u) == 0x7f800000u || (bits & 0x007fffffu) == 0u) return s;
  return codec::bits_float((bits & 0xff800000u) + 0x00800000u);
}

DSX_HOST_DEVICE TileScale scale_from_amax(float amax, bool power_of_two) {
  const float a = amax < kFp8MinAmax ? kFp8MinAmax : amax;  // NaN compares false and stays NaN
  if (!power_of_two) return {a / codec::kE4M3Max, codec::kE4M3Max / a};
  float scale = round_up_to_power_of_two(a / codec::kE4M3Max);
  // a / 448 may have rounded down onto a power of two below the exact quotient; scale * 448 is
  // exact (448 = 7 · 2^6), so this comparison is exact and restores scale * 448 >= amax.
  if (scale * codec::kE4M3Max < a) scale *= 2.0f;
  return {scale, 1.0f / scale};
}

DSX_HOST_DEVICE uint8_t quantize_element(float x, TileScale s) {
  return codec::float_to_e4m3(x * s.inv_scale);
}

DSX_HOST_DEVICE float dequantize_element(uint8_t q, float scale) {
  return codec::e4m3_to_float(q) * scale;
}

}  // namespace dsx::fp8
