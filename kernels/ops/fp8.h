// DeepSeek-V3 fine-grained FP8: E4M3 quantization with online scales and the FP8 GEMM with
// fp32 promotion every 128 elements of K. The full contract (layouts, scale grids, partial
// tiles, rounding, the three training GEMMs) is docs/FP8.md; the scalar rules are
// kernels/fp8_quant_rules.h, shared with the CUDA kernels.
#pragma once
#include <cstdint>

#include "kernels/tensor.h"

namespace dsx::ops {

// How the f32 scales of an FP8 matrix [rows, cols] are laid out (row-major, no padding):
//   tile_1x128:    one scale per 1×128 run along cols: scales [rows, ceil(cols/128)]
//   block_128x128: one scale per 128×128 block:         scales [ceil(rows/128), ceil(cols/128)]
// The last tile/block of a dimension that is not a multiple of 128 is partial; its scale comes
// from the amax of the elements present, and nothing is padded.
enum class Fp8Scaling : uint8_t { tile_1x128, block_128x128 };

// An E4M3 matrix with its dequantization scales: x ≈ float(data[r, c]) · scale(r, c).
struct Fp8Matrix {
  Tensor data;    // fp8_e4m3 [rows, cols]
  Tensor scales;  // f32, shape given by `scaling` (see above)
  Fp8Scaling scaling = Fp8Scaling::tile_1x128;

  int64_t rows() const { return data.dim(0); }
  int64_t cols() const { return data.dim(1); }
  // Allocates data and scales (uninitialised) for a rows × cols matrix on `device`.
  static Fp8Matrix empty(int64_t rows, int64_t cols, Fp8Scaling scaling, Device device = Device::cpu);
};

// Shape of the scale grid of a rows × cols matrix under `scaling`.
Shape fp8_scale_shape(int64_t rows, int64_t cols, Fp8Scaling scaling);

struct Fp8QuantOptions {
  // Round each scale up to a power of two (then |x / scale| <= 448 exactly: nothing saturates,
  // and scaling by the scale is exact).
  bool power_of_two_scales = false;
};

// Quantizes x [rows, cols] (f32 or bf16, 2-D) into q, which must be allocated for the same
// shape; q.scaling picks 1×128 tiles along cols (activations, activation gradients: cols is
// the GEMM reduction dimension) or 128×128 blocks (weights). Overwrites q.data and q.scales.
void fp8_quantize(const Tensor& x, Fp8Matrix& q, const Fp8QuantOptions& options = {});

// The re-quantization Wgrad needs: x [rows, cols] quantized as its transpose, in 1×128 tiles
// along rows (tokens). qt must be allocated as [cols, rows] with tile_1x128 scaling; the
// result equals fp8_quantize(xᵀ) bit for bit.
void fp8_quantize_transposed(const Tensor& x, Fp8Matrix& qt, const Fp8QuantOptions& options = {});

// x [rows, cols] (f32, overwritten) = the dequantized matrix, for either scaling.
void fp8_dequantize(const Fp8Matrix& q, Tensor& x);

// The block-quantized weight of Dgrad: the 128×128 blocks of Wᵀ are the transposes of the
// blocks of W and keep their amax, so W's quantization transposes exactly (data and scale
// grid) instead of being recomputed. w must be block_128x128 [rows, cols]; wt is allocated
// here as block_128x128 [cols, rows].
Fp8Matrix fp8_transpose_blocks(const Fp8Matrix& w);

// d [M, N] = a [M, K] · b [N, K]ᵀ (+ d when accumulate), the "TN" GEMM of DeepGEMM and
// cuBLASLt. a: tile_1x128 (along K). b: tile_1x128 (along K) or block_128x128. d: f32 or bf16.
// Per output element: for each 128-wide chunk c of K the fp32 partial sum p_c of the E4M3
// products is promoted into an fp32 accumulator as acc = fma(sa[i,c] · sb[j,c], p_c, acc);
// the result (plus the old d, in fp32, when accumulating) is stored as f32 or rounded to bf16
// (round-to-nearest-even, kernels/codecs.h).
void fp8_gemm(const Fp8Matrix& a, const Fp8Matrix& b, Tensor& d, bool accumulate = false);

}  // namespace dsx::ops
