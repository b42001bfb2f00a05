// FP8 E4M3 quantization in 1×128 tiles, 128×128 blocks and transposed 1×128 tiles, and
// dequantization; the scalar rules come from kernels/fp8_quant_rules.h (shared with CUDA).
#include <algorithm>
#include <string>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/fp8_quant_rules.h"
#include "kernels/ops/checks.h"
#include "kernels/ops/fp8.h"

namespace dsx::ops {
namespace {

using fp8::kTile;
using fp8::tile_count;

inline float to_float(float v) {
  return v;
}
inline float to_float(bf16 v) {
  return static_cast<float>(v);
}

void check_fp8_matrix(const Fp8Matrix& q, int64_t rows, int64_t cols, std::string_view op, std::string_view name) {
  checks::fp8_matrix(Device::cpu, q, rows, cols, op, name);
}

void check_source(const Tensor& x, std::string_view op) {
  checks::fp8_source(Device::cpu, x, op);
}

// Quantizes n contiguous elements with one scale; returns the dequantization scale.
template <class T>
float quantize_run(const T* x, int64_t n, uint8_t* q, const Fp8QuantOptions& options) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = fp8::amax_combine(amax, to_float(x[i]));
  const fp8::TileScale s = fp8::scale_from_amax(amax, options.power_of_two_scales);
  for (int64_t i = 0; i < n; ++i) q[i] = fp8::quantize_element(to_float(x[i]), s);
  return s.scale;
}

template <class T>
void quantize_tiles(const T* x, int64_t rows, int64_t cols, uint8_t* q, float* scales, const Fp8QuantOptions& options) {
  const int64_t tiles = tile_count(cols);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t offset = r * cols + t * kTile;
      scales[r * tiles + t] = quantize_run(x + offset, fp8::tile_extent(cols, t), q + offset, options);
    }
  }
}

template <class T>
void quantize_blocks(const T* x, int64_t rows, int64_t cols, uint8_t* q, float* scales,
                     const Fp8QuantOptions& options) {
  const int64_t block_rows = tile_count(rows), block_cols = tile_count(cols);
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t br = 0; br < block_rows; ++br) {
    for (int64_t bc = 0; bc < block_cols; ++bc) {
      const int64_t r0 = br * kTile, c0 = bc * kTile;
      const int64_t nr = fp8::tile_extent(rows, br), nc = fp8::tile_extent(cols, bc);
      float amax = 0.0f;
      for (int64_t r = r0; r < r0 + nr; ++r)
        for (int64_t c = c0; c < c0 + nc; ++c) amax = fp8::amax_combine(amax, to_float(x[r * cols + c]));
      const fp8::TileScale s = fp8::scale_from_amax(amax, options.power_of_two_scales);
      for (int64_t r = r0; r < r0 + nr; ++r)
        for (int64_t c = c0; c < c0 + nc; ++c) q[r * cols + c] = fp8::quantize_element(to_float(x[r * cols + c]), s);
      scales[br * block_cols + bc] = s.scale;
    }
  }
}

// x [rows, cols] -> qt [cols, rows] in 1×128 tiles along rows. Each task takes one band of 128
// rows of x, i.e. one tile column of qt: the amax of every column over the band, then the
// codes, read row by row from x (contiguous) and written with stride `rows` into qt.
template <class T>
void quantize_transposed(const T* x, int64_t rows, int64_t cols, uint8_t* qt, float* scales,
                         const Fp8QuantOptions& options) {
  const int64_t bands = tile_count(rows);
#pragma omp parallel
  {
    std::vector<float> amax(static_cast<size_t>(cols));
    std::vector<fp8::TileScale> tile_scales(static_cast<size_t>(cols));
#pragma omp for schedule(static)
    for (int64_t band = 0; band < bands; ++band) {
      const int64_t r0 = band * kTile, r1 = r0 + fp8::tile_extent(rows, band);
      std::fill(amax.begin(), amax.end(), 0.0f);
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < cols; ++c) amax[c] = fp8::amax_combine(amax[c], to_float(x[r * cols + c]));
      for (int64_t c = 0; c < cols; ++c) {
        tile_scales[c] = fp8::scale_from_amax(amax[c], options.power_of_two_scales);
        scales[c * bands + band] = tile_scales[c].scale;
      }
      for (int64_t r = r0; r < r1; ++r)
        for (int64_t c = 0; c < cols; ++c)
          qt[c * rows + r] = fp8::quantize_element(to_float(x[r * cols + c]), tile_scales[c]);
    }
  }
}

}  // namespace

Shape fp8_scale_shape(int64_t rows, int64_t cols, Fp8Scaling scaling) {
  if (scaling == Fp8Scaling::tile_1x128) return {rows, tile_count(cols)};
  return {tile_count(rows), tile_count(cols)};
}

Fp8Matrix Fp8Matrix::empty(int64_t rows, int64_t cols, Fp8Scaling scaling, Device device) {
  return {Tensor::empty({rows, cols}, DType::fp8_e4m3, device),
          Tensor::empty(fp8_scale_shape(rows, cols, scaling), DType::f32, device), scaling};
}

void fp8_quantize(const Tensor& x, Fp8Matrix& q, const Fp8QuantOptions& options) {
  DSX_ROUTE_TO_CUDA(x, fp8_quantize(x, q, options));
  constexpr std::string_view op = "fp8_quantize";
  check_source(x, op);
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check_fp8_matrix(q, rows, cols, op, "q");
  auto* codes = reinterpret_cast<uint8_t*>(q.data.data<fp8_e4m3>());
  float* scales = q.scales.data<float>();
  checks::dispatch_fp8_source(x, [&]<class T>() {
    if (q.scaling == Fp8Scaling::tile_1x128) {
      quantize_tiles(x.data<T>(), rows, cols, codes, scales, options);
    } else {
      quantize_blocks(x.data<T>(), rows, cols, codes, scales, options);
    }
  });
}

void fp8_quantize_transposed(const Tensor& x, Fp8Matrix& qt, const Fp8QuantOptions& options) {
  DSX_ROUTE_TO_CUDA(x, fp8_quantize_transposed(x, qt, options));
  constexpr std::string_view op = "fp8_quantize_transposed";
  check_source(x, op);
  const int64_t rows = x.dim(0), cols = x.dim(1);
  check(qt.scaling == Fp8Scaling::tile_1x128, op,
        [&] { return std::string("qt must use tile_1x128 scaling, got ") + checks::scaling_name(qt.scaling); });
  check_fp8_matrix(qt, cols, rows, op, "qt");
  auto* codes = reinterpret_cast<uint8_t*>(qt.data.data<fp8_e4m3>());
  float* scales = qt.scales.data<float>();
  checks::dispatch_fp8_source(x,
                              [&]<class T>() { quantize_transposed(x.data<T>(), rows, cols, codes, scales, options); });
}

void fp8_dequantize(const Fp8Matrix& q, Tensor& x) {
  DSX_ROUTE_TO_CUDA(q.data, fp8_dequantize(q, x));
  constexpr std::string_view op = "fp8_dequantize";
  const int64_t rows = q.data.dim(0), cols = q.data.dim(1);
  check_fp8_matrix(q, rows, cols, op, "q");
  check_cpu(x, op, "x");
  check(x.dtype() == DType::f32, op, [&] { return "x must be f32, got " + x.describe(); });
  check_shape(x, {rows, cols}, op, "x");
  const auto* codes = reinterpret_cast<const uint8_t*>(q.data.data<fp8_e4m3>());
  const float* scales = q.scales.data<float>();
  float* out = x.data<float>();
  const bool tiles = q.scaling == Fp8Scaling::tile_1x128;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t s = tiles ? fp8::tile_scale_index(r, c, cols) : fp8::block_scale_index(r, c, cols);
      out[r * cols + c] = fp8::dequantize_element(codes[r * cols + c], scales[s]);
    }
  }
}

Fp8Matrix fp8_transpose_blocks(const Fp8Matrix& w) {
  DSX_ROUTE_TO_CUDA(w.data, fp8_transpose_blocks(w));
  constexpr std::string_view op = "fp8_transpose_blocks";
  check(w.scaling == Fp8Scaling::block_128x128, op,
        [&] { return std::string("w must use block_128x128 scaling, got ") + checks::scaling_name(w.scaling); });
  const int64_t rows = w.data.dim(0), cols = w.data.dim(1);
  check_fp8_matrix(w, rows, cols, op, "w");
  Fp8Matrix wt = Fp8Matrix::empty(cols, rows, Fp8Scaling::block_128x128);
  const auto* src = reinterpret_cast<const uint8_t*>(w.data.data<fp8_e4m3>());
  auto* dst = reinterpret_cast<uint8_t*>(wt.data.data<fp8_e4m3>());
#pragma omp parallel for schedule(static)
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) dst[c * rows + r] = src[r * cols + c];
  const int64_t block_rows = tile_count(rows), block_cols = tile_count(cols);
  const float* s = w.scales.data<float>();
  float* st = wt.scales.data<float>();
  for (int64_t br = 0; br < block_rows; ++br)
    for (int64_t bc = 0; bc < block_cols; ++bc) st[bc * block_rows + br] = s[br * block_cols + bc];
  return wt;
}

}  // namespace dsx::ops
