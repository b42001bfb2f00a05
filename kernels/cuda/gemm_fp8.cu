// The CUDA FP8 GEMM of kernels/ops/fp8.h: d [M, N] = a [M, K] · b [N, K]ᵀ (+ d), with the
// numerics of docs/FP8.md §5. dtypes: E4M3 codes with f32 scales in; d f32 or bf16.
//
// Path 1 — cuBLASLt's block-scaled FP8 GEMM (Hopper, cuBLAS >= 12.9), which is DeepSeek-V3's
// recipe: E4M3 A/B, CUBLAS_COMPUTE_32F with the partial sums promoted to fp32 every 128
// elements of K (fast accumulation off, the default), scale modes VEC128_32F for 1×128 tiles
// and BLK128x128_32F for 128×128 blocks, f32 or bf16 C/D, beta = accumulate. Through the
// row-major mapping of cublaslt.h, cuBLAS's A is b (op T, stored K × N) and its B is a (op N,
// stored K × M): the "TN" layout FP8 needs. cuBLASLt wants the scales of an operand stored
// K-contiguous with `outer` rows/columns (M for a, N for b) as
//   VEC128:     f32 [ceil(K/128), outer], row-major — the transpose of dsx's [outer, ceil(K/128)]
//               (consecutive rows of the operand have consecutive scales: coalesced in the GEMM);
//   BLK128x128: f32 [ceil(outer/128), L4], row-major, L4 = ceil(K/128) rounded up to a multiple
//               of 4 (16-byte rows) — dsx's [ceil(outer/128), ceil(K/128)] with each row padded.
// (PyTorch's _scaled_mm checks the same strides; its "L4" padding fixed silent wrong results,
// pytorch/pytorch#166752.) Two small kernels write these layouts into scratch each call (KBs).
// Taken when K and N are multiples of 16 (16-byte leading dimensions of A, B and D, as cuBLASLt
// FP8 requires), M is a multiple of 4 (cuBLAS docs, "Scaling factors layouts" of the 128-element
// and 128x128 modes: cuBLAS's M and N, here N and M, must be multiples of 4) and the heuristic
// has an algorithm (cached per shape, like every plan).
//
// Path 2 — everything else (other GPUs, other shapes or alignments): a and b are dequantized to
// f32 (x' = e4m3(q) · scale, the product in fp32, as fp8_dequantize) and multiplied by the f32
// GEMM (CUBLAS_COMPUTE_32F, no TF32); a bf16 d gets the fp32 result (+ d_old, in fp32) rounded to
// nearest even by a last kernel. Its sums are plain fp32 over K, so it differs from the CPU's
// per-chunk promotion by fp32 rounding only (a few K·2^-24 of Σ|a'b'|).
//
// Kernels: grid-stride loops, one element per thread, indexed over the destination so stores
// are coalesced (the scale relayouts read with a stride, but scale grids are tiny).
#include <string>

#include "kernels/cuda/cublaslt.h"
#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/gemm_internal.h"
#include "kernels/cuda/ops_gemm.h"
#include "kernels/fp8_quant_rules.h"

namespace dsx::cuda {

// ============================================ kernels ============================================
namespace {

// dst [chunks, outer] = the transpose of src [outer, chunks] (the VEC128 layout).
__global__ void vec128_scales_kernel(const float* src, float* dst, int64_t outer, int64_t chunks) {
  const int64_t n = outer * chunks;
  DSX_GRID_STRIDE_LOOP(i, n) {
    const int64_t chunk = i / outer, row = i % outer;
    dst[i] = src[row * chunks + chunk];
  }
}

// dst [block_rows, padded] = src [block_rows, chunks] with each row padded (the BLK128x128 layout).
__global__ void blk128_scales_kernel(const float* src, float* dst, int64_t block_rows, int64_t chunks, int64_t padded) {
  const int64_t n = block_rows * padded;
  DSX_GRID_STRIDE_LOOP(i, n) {
    const int64_t block_row = i / padded, chunk = i % padded;
    dst[i] = chunk < chunks ? src[block_row * chunks + chunk] : 0.0f;  // padding is never read
  }
}

// out [rows, cols] (f32) = e4m3(codes) · scale, the scale from dsx's 1×128 or 128×128 grid.
__global__ void dequantize_kernel(const fp8_e4m3* codes, const float* scales, float* out, int64_t rows, int64_t cols,
                                  bool blocks) {
  const int64_t n = rows * cols;
  DSX_GRID_STRIDE_LOOP(i, n) {
    const int64_t r = i / cols, c = i % cols;
    const int64_t s = blocks ? fp8::block_scale_index(r, c, cols) : fp8::tile_scale_index(r, c, cols);
    out[i] = load(codes[i]) * scales[s];
  }
}

// d (bf16) = bf16(sum + d) when accumulating, else bf16(sum); the addition in fp32.
__global__ void store_bf16_kernel(const float* sum, bf16* d, int64_t n, bool accumulate) {
  DSX_GRID_STRIDE_LOOP(i, n) {
    const float v = accumulate ? sum[i] + load(d[i]) : sum[i];
    d[i] = store<bf16>(v);
  }
}

}  // namespace

// =========================================== launchers ===========================================
namespace {

using ops::Fp8Matrix;
using ops::Fp8Scaling;

constexpr std::string_view kOp = "fp8_gemm";

void check_operand(const Fp8Matrix& q, std::string_view name) {
  check_on_gpu(q.data, kOp, name);
  check_on_gpu(q.scales, kOp, std::string(name) + ".scales");
  check(q.data.ndim() == 2 && q.data.dtype() == DType::fp8_e4m3 && q.scales.dtype() == DType::f32, kOp, [&] {
    return std::string(name) + " must be 2-D fp8_e4m3 data with f32 scales, got " + q.data.describe() + " and " +
           q.scales.describe();
  });
  check_shape(q.scales, ops::fp8_scale_shape(q.data.dim(0), q.data.dim(1), q.scaling), kOp,
              std::string(name) + ".scales");
}

int64_t padded_chunks(int64_t k) {
  return (fp8::tile_count(k) + 3) / 4 * 4;
}

// The 1×128 scales of q [outer, K] in cuBLASLt's VEC128 layout [ceil(K/128), outer].
Tensor vec128_scales(const Fp8Matrix& q) {
  const int64_t outer = q.rows(), chunks = fp8::tile_count(q.cols());
  Tensor out = Tensor::empty({chunks, outer}, DType::f32, Device::cuda);
  const int64_t n = out.numel();
  vec128_scales_kernel<<<grid_for(n), kBlock, 0, current_stream()>>>(q.scales.data<float>(), out.data<float>(), outer,
                                                                     chunks);
  DSX_CUDA_CHECK_LAUNCH("vec128_scales_kernel");
  return out;
}

// The 128×128 scales of q [outer, K] in cuBLASLt's BLK128x128 layout [ceil(outer/128), L4].
Tensor blk128_scales(const Fp8Matrix& q) {
  const int64_t block_rows = fp8::tile_count(q.rows()), chunks = fp8::tile_count(q.cols());
  const int64_t padded = padded_chunks(q.cols());
  Tensor out = Tensor::empty({block_rows, padded}, DType::f32, Device::cuda);
  const int64_t n = out.numel();
  blk128_scales_kernel<<<grid_for(n), kBlock, 0, current_stream()>>>(q.scales.data<float>(), out.data<float>(),
                                                                     block_rows, chunks, padded);
  DSX_CUDA_CHECK_LAUNCH("blk128_scales_kernel");
  return out;
}

Tensor dequantized(const Fp8Matrix& q) {
  Tensor out = Tensor::empty(q.data.shape(), DType::f32, Device::cuda);
  const int64_t n = out.numel();
  dequantize_kernel<<<grid_for(n), kBlock, 0, current_stream()>>>(q.data.data<fp8_e4m3>(), q.scales.data<float>(),
                                                                  out.data<float>(), q.rows(), q.cols(),
                                                                  q.scaling == Fp8Scaling::block_128x128);
  DSX_CUDA_CHECK_LAUNCH("dequantize_kernel");
  return out;
}

// K and N multiples of 16: the leading dimensions of the codes (K bytes) and of d (N elements
// of 2 or 4 bytes) are 16-byte multiples, as cuBLASLt's FP8 kernels require. M a multiple of 4:
// the block-scale modes need cuBLAS's m and n (N and M) to be multiples of 4 (cuBLAS docs,
// "Scaling factors layouts"); our VEC128 scales of a are packed [ceil(K/128), M] with no padding.
bool block_scaled_shape(int64_t m, int64_t n, int64_t k) {
  return k % 16 == 0 && n % 16 == 0 && m % 4 == 0;
}

// The cuBLASLt problem of d [m, n] = a [m, k] · b [n, k]ᵀ with block scales (pointers unset).
blas::MatmulArgs scaled_args(const void* a_codes, const void* b_codes, void* d, DType d_dtype, int64_t m, int64_t n,
                             int64_t k, Fp8Scaling b_scaling, const float* alpha, const float* beta) {
  const blas::RowMajor ma{a_codes, CUDA_R_8F_E4M3, m, k}, mb{b_codes, CUDA_R_8F_E4M3, n, k};
  blas::MatmulArgs args =
      blas::row_major(false, ma, true, mb, d, gemm_detail::cuda_type(d_dtype), CUBLAS_COMPUTE_32F, alpha, beta);
  // cuBLAS's A is b and its B is a (cublaslt.h).
  args.a_scaling = b_scaling == Fp8Scaling::block_128x128 ? blas::BlockScale::blk128x128 : blas::BlockScale::vec128;
  args.b_scaling = blas::BlockScale::vec128;
  return args;
}

bool try_block_scaled(const Fp8Matrix& a, const Fp8Matrix& b, Tensor& d, bool accumulate) {
  const int64_t m = a.rows(), n = b.rows(), k = a.cols();
  if (!block_scaled_shape(m, n, k)) return false;
  const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
  blas::MatmulArgs args =
      scaled_args(a.data.raw(), b.data.raw(), d.raw(), d.dtype(), m, n, k, b.scaling, &alpha, &beta);
  // Freed (stream-ordered) after the GEMM that reads them, when this function returns.
  const Tensor a_scales = vec128_scales(a);
  const Tensor b_scales = b.scaling == Fp8Scaling::block_128x128 ? blk128_scales(b) : vec128_scales(b);
  args.a_scales = b_scales.data<float>();
  args.b_scales = a_scales.data<float>();
  return blas::try_matmul(args);
}

void dequantized_gemm(const Fp8Matrix& a, const Fp8Matrix& b, Tensor& d, bool accumulate) {
  const Tensor a_values = dequantized(a), b_values = dequantized(b);
  if (d.dtype() == DType::f32) {
    gemm_detail::row_major_gemm(false, a_values, true, b_values, d, CUBLAS_COMPUTE_32F, 1.0, accumulate ? 1.0 : 0.0);
    return;
  }
  Tensor sum = Tensor::empty(d.shape(), DType::f32, Device::cuda);
  gemm_detail::row_major_gemm(false, a_values, true, b_values, sum, CUBLAS_COMPUTE_32F, 1.0, 0.0);
  const int64_t n = d.numel();
  store_bf16_kernel<<<grid_for(n), kBlock, 0, current_stream()>>>(sum.data<float>(), d.data<bf16>(), n, accumulate);
  DSX_CUDA_CHECK_LAUNCH("store_bf16_kernel");
}

}  // namespace

void fp8_gemm(const Fp8Matrix& a, const Fp8Matrix& b, Tensor& d, bool accumulate) {
  check_operand(a, "a");
  check_operand(b, "b");
  check(a.scaling == Fp8Scaling::tile_1x128, kOp, "a must use tile_1x128 scaling (1x128 tiles along K)");
  check(a.data.dim(1) == b.data.dim(1), kOp,
        [&] { return "a and b must share K (d = a · bᵀ), got a " + a.data.describe() + ", b " + b.data.describe(); });
  check_on_gpu(d, kOp, "d");
  check(d.dtype() == DType::f32 || d.dtype() == DType::bf16, kOp,
        [&] { return "d must be f32 or bf16, got " + d.describe(); });
  const int64_t m = a.rows(), n = b.rows(), k = a.cols();
  check_shape(d, {m, n}, kOp, "d");
  if (m == 0 || n == 0) return;
  if (k == 0) {  // no chunks: the sum is 0, and d + 0 = d when accumulating
    if (!accumulate) d.zero();
    return;
  }
  if (try_block_scaled(a, b, d, accumulate)) return;
  dequantized_gemm(a, b, d, accumulate);
}

bool fp8_gemm_uses_block_scaling(int64_t m, int64_t n, int64_t k, Fp8Scaling b_scaling, DType d_dtype) {
  check(d_dtype == DType::f32 || d_dtype == DType::bf16, kOp,
        [&] { return "d must be f32 or bf16, got " + std::string(dtype_name(d_dtype)); });
  if (m <= 0 || n <= 0 || k <= 0 || !block_scaled_shape(m, n, k)) return false;
  // The heuristic reads no operand: only the pointers' alignment enters the plan key, so any
  // 256-byte aligned address stands for fresh tensors. The scale grids are real (they are set
  // on the descriptor the heuristic sees); run() sets the real ones before every GEMM.
  void* aligned = reinterpret_cast<void*>(uintptr_t{256});
  const float alpha = 1.0f, beta = 0.0f;
  blas::MatmulArgs args = scaled_args(aligned, aligned, aligned, d_dtype, m, n, k, b_scaling, &alpha, &beta);
  const int64_t b_scale_count =
      b_scaling == Fp8Scaling::block_128x128 ? fp8::tile_count(n) * padded_chunks(k) : fp8::tile_count(k) * n;
  const Tensor a_scales = Tensor::zeros({fp8::tile_count(k) * m}, DType::f32, Device::cuda);
  const Tensor b_scales = Tensor::zeros({b_scale_count}, DType::f32, Device::cuda);
  args.a_scales = b_scales.data<float>();
  args.b_scales = a_scales.data<float>();
  return blas::supported(args);
}

}  // namespace dsx::cuda
