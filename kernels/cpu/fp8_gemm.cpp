// The CPU FP8 GEMM: d = a · bᵀ with 1×128-tiled a and 1×128-tiled or 128×128-blocked b,
// fp32 partial sums per 128-wide K chunk promoted with their two scales into an fp32
// accumulator (DeepSeek-V3 §3.3.2, DeepGEMM). It is the reference the CUDA kernels are
// tested against, so it favours a plain definition over speed; docs/FP8.md states it.
//
// How: the E4M3 codes are widened once to unscaled floats (exact), then for each panel of
// rows and each K chunk an sgemm with k <= 128 gives the chunk's partial sums (products of
// two E4M3 values are exact in fp32, so only the order of the fp32 additions inside a chunk
// is left to BLAS), and a tight OpenMP loop promotes them: acc = fma(sa · sb, p, acc).
#include <cblas.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/codecs.h"
#include "kernels/cuda/route.h"
#include "kernels/fp8_quant_rules.h"
#include "kernels/ops/fp8.h"

namespace dsx::ops {
namespace {

using fp8::kTile;
using fp8::tile_count;

// Rows of a per panel: the panel's partial sums and accumulators ([kPanelRows, N] floats
// each) stay near the cache instead of spanning all of M.
constexpr int64_t kPanelRows = 256;

const std::array<float, 256>& e4m3_table() {
  static const std::array<float, 256> table = [] {
    std::array<float, 256> t{};
    for (int code = 0; code < 256; ++code) t[code] = codec::e4m3_to_float(static_cast<uint8_t>(code));
    return t;
  }();
  return table;
}

// The codes of q as unscaled floats (exact: every E4M3 value is an fp32 value).
std::vector<float> widen_codes(const Fp8Matrix& q) {
  const auto& table = e4m3_table();
  const auto* codes = reinterpret_cast<const uint8_t*>(q.data.data<fp8_e4m3>());
  std::vector<float> out(static_cast<size_t>(q.data.numel()));
  const int64_t n = q.data.numel();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) out[i] = table[codes[i]];
  return out;
}

void check_operand(const Fp8Matrix& q, std::string_view name) {
  constexpr std::string_view op = "fp8_gemm";
  check_cpu(q.data, op, name);
  check_cpu(q.scales, op, name);
  check(q.data.ndim() == 2 && q.data.dtype() == DType::fp8_e4m3 && q.scales.dtype() == DType::f32, op, [&] {
    return std::string(name) + " must be 2-D fp8_e4m3 data with f32 scales, got " + q.data.describe() + " and " +
           q.scales.describe();
  });
  check_shape(q.scales, fp8_scale_shape(q.data.dim(0), q.data.dim(1), q.scaling), op, std::string(name) + ".scales");
  check(q.data.dim(0) <= INT_MAX && q.data.dim(1) <= INT_MAX, op,
        [&] { return std::string(name) + " exceeds the BLAS int range: " + q.data.describe(); });
}

struct GemmShape {
  int64_t m, n, k;
};

// The scale of b for output column j and K chunk c, for every j.
void b_chunk_scales(const Fp8Matrix& b, int64_t chunk, std::vector<float>& out) {
  const float* s = b.scales.data<float>();
  const int64_t n = b.data.dim(0), chunks = tile_count(b.data.dim(1));
  for (int64_t j = 0; j < n; ++j) {
    const int64_t row = b.scaling == Fp8Scaling::tile_1x128 ? j : j / kTile;
    out[j] = s[row * chunks + chunk];
  }
}

// acc [rows, N] of rows r0.. of the output, promoted over every K chunk.
void accumulate_panel(const std::vector<float>& a_values, const std::vector<float>& b_values, const Fp8Matrix& a,
                      const Fp8Matrix& b, GemmShape g, int64_t r0, int64_t rows, std::vector<float>& partial,
                      std::vector<float>& acc, std::vector<float>& b_scales) {
  const float* a_scales = a.scales.data<float>();
  const int64_t chunks = tile_count(g.k);
  std::fill(acc.begin(), acc.begin() + rows * g.n, 0.0f);
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t k0 = c * kTile, kc = fp8::tile_extent(g.k, c);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(rows), static_cast<blasint>(g.n),
                static_cast<blasint>(kc), 1.0f, a_values.data() + r0 * g.k + k0, static_cast<blasint>(g.k),
                b_values.data() + k0, static_cast<blasint>(g.k), 0.0f, partial.data(), static_cast<blasint>(g.n));
    b_chunk_scales(b, c, b_scales);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < rows; ++i) {
      const float sa = a_scales[(r0 + i) * chunks + c];
      const float* p = partial.data() + i * g.n;
      float* out = acc.data() + i * g.n;
      for (int64_t j = 0; j < g.n; ++j) out[j] = std::fma(sa * b_scales[j], p[j], out[j]);
    }
  }
}

// Rows r0.. of d = acc (+ d) as f32 or bf16.
void store_panel(const std::vector<float>& acc, int64_t r0, int64_t rows, int64_t n, bool accumulate, Tensor& d) {
  const bool to_bf16 = d.dtype() == DType::bf16;
  float* df = to_bf16 ? nullptr : d.data<float>();
  bf16* db = to_bf16 ? d.data<bf16>() : nullptr;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t at = (r0 + i) * n + j;
      float v = acc[i * n + j];
      if (to_bf16) {
        if (accumulate) v += static_cast<float>(db[at]);
        db[at].bits = codec::float_to_bf16(v);
      } else {
        df[at] = accumulate ? df[at] + v : v;
      }
    }
  }
}

}  // namespace

void fp8_gemm(const Fp8Matrix& a, const Fp8Matrix& b, Tensor& d, bool accumulate) {
  DSX_ROUTE_TO_CUDA(d, fp8_gemm(a, b, d, accumulate));
  constexpr std::string_view op = "fp8_gemm";
  check_operand(a, "a");
  check_operand(b, "b");
  check(a.scaling == Fp8Scaling::tile_1x128, op, "a must use tile_1x128 scaling (1x128 tiles along K)");
  check(a.data.dim(1) == b.data.dim(1), op,
        [&] { return "a and b must share K (d = a · bᵀ), got a " + a.data.describe() + ", b " + b.data.describe(); });
  check_cpu(d, op, "d");
  check(d.dtype() == DType::f32 || d.dtype() == DType::bf16, op,
        [&] { return "d must be f32 or bf16, got " + d.describe(); });
  const GemmShape g{a.data.dim(0), b.data.dim(0), a.data.dim(1)};
  check_shape(d, {g.m, g.n}, op, "d");
  if (g.m == 0 || g.n == 0) return;

  const std::vector<float> a_values = widen_codes(a), b_values = widen_codes(b);
  const int64_t panel = std::min(kPanelRows, g.m);
  std::vector<float> partial(static_cast<size_t>(panel * g.n)), acc(static_cast<size_t>(panel * g.n));
  std::vector<float> b_scales(static_cast<size_t>(g.n));
  for (int64_t r0 = 0; r0 < g.m; r0 += panel) {
    const int64_t rows = std::min(panel, g.m - r0);
    accumulate_panel(a_values, b_values, a, b, g, r0, rows, partial, acc, b_scales);
    store_panel(acc, r0, rows, g.n, accumulate, d);
  }
}

}  // namespace dsx::ops
