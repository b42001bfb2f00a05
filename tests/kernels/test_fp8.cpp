// FP8 (E4M3) fine-grained quantization and the CPU FP8 GEMM (docs/FP8.md).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/codecs.h"
#include "kernels/fp8_quant_rules.h"
#include "kernels/ops/fp8.h"
#include "support/gradcheck.h"

using namespace dsx;
using ops::Fp8Matrix;
using ops::Fp8Scaling;

namespace {

constexpr double kFp32Unit = 0x1p-24;  // unit roundoff of fp32

// Values spread over 2^-10 .. 2^6 in magnitude (random sign and binade per element), so
// tiles mix large and tiny elements and the quantized values land in E4M3's normal and
// subnormal ranges alike.
Tensor spread_tensor(int64_t rows, int64_t cols, uint64_t seed, DType dtype = DType::f32) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> mantissa(1.0, 2.0);
  std::uniform_int_distribution<int> binade(-10, 5);
  std::bernoulli_distribution negative(0.5);
  std::vector<double> v(static_cast<size_t>(rows * cols));
  for (double& x : v) x = (negative(gen) ? -1.0 : 1.0) * std::ldexp(mantissa(gen), binade(gen));
  return Tensor::from<double>(v, {rows, cols}).to(dtype);
}

Tensor transpose(const Tensor& x) {
  const auto v = x.to_vector();
  const int64_t rows = x.dim(0), cols = x.dim(1);
  std::vector<double> t(v.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) t[c * rows + r] = v[r * cols + c];
  return Tensor::from<double>(t, {cols, rows}).to(x.dtype());
}

uint8_t code_at(const Fp8Matrix& q, int64_t r, int64_t c) {
  return q.data.data<fp8_e4m3>()[r * q.cols() + c].bits;
}

// The scale of every element, indexed from the documented grid layout (not from the rules
// header), row-major like the data.
std::vector<double> element_scales(const Fp8Matrix& q) {
  const auto s = q.scales.to_vector();
  const int64_t rows = q.rows(), cols = q.cols(), tiles = (cols + 127) / 128;
  std::vector<double> out(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c)
      out[r * cols + c] = q.scaling == Fp8Scaling::tile_1x128 ? s[r * tiles + c / 128] : s[(r / 128) * tiles + c / 128];
  return out;
}

// The exact dequantized values code·scale in float64 (fp8_dequantize stores them rounded to fp32).
std::vector<double> exact_dequantized(const Fp8Matrix& q) {
  std::vector<double> out = element_scales(q);
  const fp8_e4m3* codes = q.data.data<fp8_e4m3>();
  for (size_t i = 0; i < out.size(); ++i) out[i] *= static_cast<double>(codec::e4m3_to_float(codes[i].bits));
  return out;
}

Fp8Matrix quantize(const Tensor& x, Fp8Scaling scaling, bool power_of_two = false) {
  Fp8Matrix q = Fp8Matrix::empty(x.dim(0), x.dim(1), scaling);
  ops::fp8_quantize(x, q, {power_of_two});
  return q;
}

// For every element of x, the amax of the elements sharing its scale: its tile or block,
// clipped at the matrix edge.
std::vector<double> group_amaxes(const Tensor& x, Fp8Scaling scaling) {
  const auto v = x.to_vector();
  const int64_t rows = x.dim(0), cols = x.dim(1), tiles = (cols + 127) / 128;
  const auto group_of = [&](int64_t r, int64_t c) {
    return (scaling == Fp8Scaling::tile_1x128 ? r : r / 128) * tiles + c / 128;
  };
  std::vector<double> amax(static_cast<size_t>(rows * tiles), 0.0), out(v.size());
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) amax[group_of(r, c)] = std::max(amax[group_of(r, c)], std::abs(v[r * cols + c]));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = amax[group_of(r, c)];
  return out;
}

// Round-trip bound of one element (justification in the first round-trip test).
double element_bound(double x, double scale) {
  return 0x1p-4 * std::abs(x) + 0x1p-10 * scale + 4 * kFp32Unit * std::abs(x);
}

bool same_bits(const Tensor& a, const Tensor& b) {
  return a.nbytes() == b.nbytes() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

bool is_power_of_two(float s) {
  int e = 0;
  return std::frexp(s, &e) == 0.5f;
}

struct GemmReference {
  std::vector<double> value;    // Σ_k a'_ik b'_jk of the dequantized operands
  std::vector<double> abs_dot;  // Σ_k |a'_ik b'_jk|, the scale of fp32 rounding errors
};

// d = a'·b'ᵀ in float64 from the codes and scales (independent of fp8_dequantize/fp8_gemm).
GemmReference reference_gemm(const Fp8Matrix& a, const Fp8Matrix& b) {
  const int64_t m = a.rows(), n = b.rows(), k = a.cols();
  const std::vector<double> av = exact_dequantized(a), bv = exact_dequantized(b);
  GemmReference ref{std::vector<double>(static_cast<size_t>(m * n)), std::vector<double>(static_cast<size_t>(m * n))};
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0, s_abs = 0;
      for (int64_t p = 0; p < k; ++p) {
        s += av[i * k + p] * bv[j * k + p];
        s_abs += std::abs(av[i * k + p] * bv[j * k + p]);
      }
      ref.value[i * n + j] = s;
      ref.abs_dot[i * n + j] = s_abs;
    }
  }
  return ref;
}

// fp32 error bound of fp8_gemm against the float64 product of its dequantized operands.
// Products of two E4M3 values are exact in fp32; a chunk's partial sum of at most 128 of them
// errs by at most 127·u·Σ|terms| (recursive summation, u = 2^-24; blocked BLAS orders do no
// worse); promotion multiplies the partial by sa·sb (two roundings) and adds it with one fma
// rounding per chunk, each at most u relative to the running |acc| <= Σ|a'b'|. Altogether
// |d - ref| <= (128 + chunks + 2)·u·Σ_k|a'_k b'_k|, with a 10% margin for second-order terms.
double gemm_fp32_bound(double abs_dot, int64_t k) {
  const double chunks = static_cast<double>((k + 127) / 128);
  return 1.1 * (128 + chunks + 2) * kFp32Unit * abs_dot + 1e-30;
}

void require_gemm_matches_reference(const Fp8Matrix& a, const Fp8Matrix& b) {
  Tensor d = Tensor::empty({a.rows(), b.rows()}, DType::f32);
  ops::fp8_gemm(a, b, d);
  const GemmReference ref = reference_gemm(a, b);
  const auto dv = d.to_vector();
  double worst = 0;  // the largest error as a fraction of its bound
  for (size_t i = 0; i < dv.size(); ++i)
    worst = std::max(worst, std::abs(dv[i] - ref.value[i]) / gemm_fp32_bound(ref.abs_dot[i], a.cols()));
  REQUIRE(worst <= 1.0);
}

}  // namespace

TEST_CASE("fp8: a hand-worked 1x128 tile (scale 7/448 = 2^-6)", "[fp8]") {
  // amax 7 gives scale 7/448 = 1/64 and inv_scale 64 exactly, so every code can be read off:
  //   7      -> 448             -> 0x7E (S.1111.110, the largest finite E4M3)
  //  -7      -> -448            -> 0xFE
  //   1      -> 64  = 2^6       -> exponent 6+7 = 13 -> 0x68
  //   0.1    -> 6.4, grid step 0.5 in [4, 8): 6.5 = 2^2·1.625 -> 0x4D, dequantized 6.5/64 = 0.1015625
  //   3.3    -> 211.2, step 16 in [128, 256): 208 = 2^7·1.625 -> 0x75, dequantized 3.25
  //   2^-12  -> 2^-6, the smallest normal -> 0x08
  //   2^-16  -> 2^-10, half the smallest subnormal 2^-9: a tie, to even -> 0x00
  //   3·2^-16 -> 1.5·2^-9: a tie between 1 and 2 subnormal steps, to even -> 0x02
  std::vector<float> x(128, 0.0f);
  const std::vector<float> head = {7.0f, -7.0f, 1.0f, 0.1f, 3.3f, 0x1p-12f, 0x1p-16f, 3 * 0x1p-16f};
  std::copy(head.begin(), head.end(), x.begin());
  const Fp8Matrix q = quantize(Tensor::from<float>(x, {1, 128}), Fp8Scaling::tile_1x128);
  REQUIRE(q.scales.item() == 1.0 / 64);
  const std::vector<uint8_t> expected = {0x7E, 0xFE, 0x68, 0x4D, 0x75, 0x08, 0x00, 0x02};
  for (size_t i = 0; i < expected.size(); ++i) {
    CAPTURE(i);
    REQUIRE(code_at(q, 0, static_cast<int64_t>(i)) == expected[i]);
  }
  for (int64_t i = 8; i < 128; ++i) REQUIRE(code_at(q, 0, i) == 0);
  Tensor back = Tensor::empty({1, 128}, DType::f32);
  ops::fp8_dequantize(q, back);
  REQUIRE(back.to_vector()[3] == 0.1015625);
  REQUIRE(back.to_vector()[4] == 3.25);
}

TEST_CASE("fp8: amax 1 maps to 448 with scale 1/448, and to 256 with a power-of-two scale", "[fp8]") {
  const Tensor x = Tensor::from<float>({1.0f, 0.5f, -0.25f}, {1, 3});
  const Fp8Matrix q = quantize(x, Fp8Scaling::tile_1x128);
  REQUIRE(q.scales.item() == static_cast<double>(1.0f / 448.0f));
  REQUIRE(code_at(q, 0, 0) == 0x7E);  // 448
  REQUIRE(code_at(q, 0, 1) == 0x76);  // 224 = 2^7·1.75
  REQUIRE(code_at(q, 0, 2) == 0xEE);  // -112 = -(2^6·1.75)
  // Power of two: 1/448 = 2^-8.8 rounds up to 2^-8, inv_scale 256: 1 -> 256 = 2^8 (0x78), 0.5 -> 128 (0x70).
  const Fp8Matrix p = quantize(x, Fp8Scaling::tile_1x128, true);
  REQUIRE(p.scales.item() == 0x1p-8);
  REQUIRE(code_at(p, 0, 0) == 0x78);
  REQUIRE(code_at(p, 0, 1) == 0x70);
  REQUIRE(code_at(p, 0, 2) == 0xE8);
}

TEST_CASE("fp8: round trip of 1x128 tiles and 128x128 blocks stays within the E4M3 half-ulp bound", "[fp8]") {
  // Bound, per element x of a group (tile or block) with scale s = amax/448:
  //   y = x/s has |y| <= 448. E4M3 has 3 mantissa bits: for a normal y (|y| >= 2^-6) the nearest
  //   grid point is within half an ulp, 2^(e-4) <= 2^-4·|y|; below 2^-6 the grid step is 2^-9,
  //   so the error is at most 2^-10. Scaling back by s gives |x - x'| <= 2^-4·|x| + 2^-10·s, plus
  //   a few fp32 roundings (x·inv_scale, code·s: 4u|x|). Summed over a group this is
  //   <= amax·2^-4 (as 2^-10·s = amax·2^-10/448 is covered whenever |x| <= amax(1 - 2^-8)).
  // A quantizer that truncated instead of rounding, used the wrong tile's scale or skipped the
  // scale would break the per-element bound.
  const int64_t rows = 130, cols = 200;
  for (DType dtype : {DType::f32, DType::bf16}) {
    const Tensor x = spread_tensor(rows, cols, 11, dtype);
    const auto xv = x.to_vector();
    for (Fp8Scaling scaling : {Fp8Scaling::tile_1x128, Fp8Scaling::block_128x128}) {
      for (bool power_of_two : {false, true}) {
        CAPTURE(dtype_name(dtype), static_cast<int>(scaling), power_of_two);
        const Fp8Matrix q = quantize(x, scaling, power_of_two);
        Tensor back = Tensor::empty({rows, cols}, DType::f32);
        ops::fp8_dequantize(q, back);
        const auto bv = back.to_vector(), exact = exact_dequantized(q), scales = element_scales(q);
        const auto amaxes = group_amaxes(x, scaling);
        // Power-of-two scales are at most 2x larger, so their group bound is 2·amax·2^-4.
        const double group_factor = power_of_two ? 2.0 : 1.0;
        double worst_element = 0, worst_group = 0;
        size_t mismatches = 0;
        for (size_t i = 0; i < xv.size(); ++i) {
          const double err = std::abs(xv[i] - bv[i]);
          mismatches += bv[i] != static_cast<float>(exact[i]);
          worst_element = std::max(worst_element, err / element_bound(xv[i], scales[i]));
          worst_group = std::max(worst_group, err / (group_factor * 0x1p-4 * amaxes[i]));
        }
        REQUIRE(mismatches == 0);  // fp8_dequantize stores fp32(code · scale)
        REQUIRE(worst_element <= 1.0);
        REQUIRE(worst_group <= 1.0);
      }
    }
  }
}

TEST_CASE("fp8: scale grids for dimensions that are not multiples of 128 use the elements present", "[fp8]") {
  const int64_t m = 130, k = 200;
  REQUIRE(ops::fp8_scale_shape(m, k, Fp8Scaling::tile_1x128) == Shape{130, 2});
  REQUIRE(ops::fp8_scale_shape(m, k, Fp8Scaling::block_128x128) == Shape{2, 2});
  REQUIRE(ops::fp8_scale_shape(k, m, Fp8Scaling::tile_1x128) == Shape{200, 2});

  // Values below 1 everywhere except one marker per group, so each scale is marker/448 and
  // shows which elements its group contained. The partial groups (cols 128..199, rows 128..129)
  // carry their own markers.
  std::vector<float> v(static_cast<size_t>(m * k), 0.5f);
  v[129 * k + 199] = 9.0f;  // last row, last partial tile / the partial corner block
  v[129 * k + 0] = 5.0f;    // last row, first tile / bottom-left partial block
  v[0 * k + 150] = 3.0f;    // first row, partial tile / top-right block
  const Tensor x = Tensor::from<float>(v, {m, k});

  const Fp8Matrix tiles = quantize(x, Fp8Scaling::tile_1x128);
  const auto ts = tiles.scales.to_vector();
  REQUIRE(ts[129 * 2 + 1] == static_cast<double>(9.0f / 448.0f));
  REQUIRE(ts[129 * 2 + 0] == static_cast<double>(5.0f / 448.0f));
  REQUIRE(ts[0 * 2 + 1] == static_cast<double>(3.0f / 448.0f));
  REQUIRE(ts[1 * 2 + 1] == static_cast<double>(0.5f / 448.0f));

  const Fp8Matrix blocks = quantize(x, Fp8Scaling::block_128x128);
  REQUIRE(blocks.scales.to_vector() ==
          std::vector<double>{static_cast<double>(0.5f / 448.0f), static_cast<double>(3.0f / 448.0f),
                              static_cast<double>(5.0f / 448.0f), static_cast<double>(9.0f / 448.0f)});
  // The markers sit exactly at their group's amax, so they quantize to 448.
  REQUIRE(code_at(blocks, 129, 199) == 0x7E);
  REQUIRE(code_at(tiles, 0, 150) == 0x7E);
}

TEST_CASE("fp8: a zero tile gets scale 2^-126 and dequantizes to exact zeros", "[fp8]") {
  std::vector<float> v(2 * 256, 0.0f);
  for (int64_t c = 128; c < 256; ++c) v[c] = 1.0f;  // row 0: tile 0 zero, tile 1 ones; row 1 all zero
  const Tensor x = Tensor::from<float>(v, {2, 256});
  for (bool power_of_two : {false, true}) {
    const Fp8Matrix q = quantize(x, Fp8Scaling::tile_1x128, power_of_two);
    const auto s = q.scales.to_vector();
    REQUIRE(s[0] == 0x1p-126);
    REQUIRE(s[2] == 0x1p-126);
    REQUIRE(s[3] == 0x1p-126);
    Tensor back = Tensor::empty({2, 256}, DType::f32);
    ops::fp8_dequantize(q, back);
    const auto bv = back.to_vector();
    for (int64_t c = 0; c < 256; ++c) {
      REQUIRE(bv[c] == (c < 128 ? 0.0 : 1.0));  // 1 is exact: 448·(1/448) and 256·2^-8 round to 1
      REQUIRE(bv[256 + c] == 0.0);
    }
  }
}

TEST_CASE("fp8: a NaN or an infinity poisons its own tile only", "[fp8]") {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    std::vector<float> v(256, 0.25f);
    v[5] = bad;
    Fp8Matrix q = quantize(Tensor::from<float>(v, {1, 256}), Fp8Scaling::tile_1x128);
    Tensor back = Tensor::empty({1, 256}, DType::f32);
    ops::fp8_dequantize(q, back);
    const auto bv = back.to_vector();
    for (int64_t c = 0; c < 256; ++c) REQUIRE(std::isnan(bv[c]) == (c < 128));
  }
}

TEST_CASE("fp8: power-of-two scales are the smallest power of two that never saturates", "[fp8]") {
  // Tiles with amax spread over 2^-100 .. 2^100, including amaxes exactly at 448·2^e (scale
  // 2^e, the top element maps to 448) and one float above it (scale 2^(e+1)).
  std::mt19937_64 gen(5);
  std::uniform_real_distribution<double> unit(-1.0, 1.0);
  std::uniform_int_distribution<int> binade(-100, 100);
  const int64_t rows = 64, cols = 128;
  std::vector<float> v(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    const int e = binade(gen);
    for (int64_t c = 0; c < cols; ++c) v[r * cols + c] = static_cast<float>(std::ldexp(unit(gen), e));
    if (r % 4 == 1) v[r * cols + 7] = std::ldexp(448.0f, e);
    if (r % 4 == 2) v[r * cols + 7] = std::nextafter(std::ldexp(448.0f, e), INFINITY);
  }
  const Tensor x = Tensor::from<float>(v, {rows, cols});
  const Fp8Matrix q = quantize(x, Fp8Scaling::tile_1x128, true);
  const auto s = q.scales.to_vector();
  const auto amaxes = group_amaxes(x, Fp8Scaling::tile_1x128);
  for (int64_t r = 0; r < rows; ++r) {
    CAPTURE(r);
    const double amax = amaxes[r * cols];
    REQUIRE(is_power_of_two(static_cast<float>(s[r])));
    REQUIRE(amax / s[r] <= 448.0);       // never saturates (exact in float64)
    REQUIRE(amax / (s[r] / 2) > 448.0);  // and half of it would
    for (int64_t c = 0; c < cols; ++c) {
      // x/s is exact for a power-of-two s, so the code is float_to_e4m3 of the exact quotient
      // and its magnitude is at most 448.
      REQUIRE(std::abs(static_cast<double>(codec::e4m3_to_float(code_at(q, r, c)))) <= 448.0);
      REQUIRE(code_at(q, r, c) == codec::float_to_e4m3(static_cast<float>(v[r * cols + c] / s[r])));
    }
    if (r % 4 == 1) REQUIRE(code_at(q, r, 7) == 0x7E);
  }
}

TEST_CASE("fp8: transposed quantization equals quantizing the explicit transpose", "[fp8]") {
  for (DType dtype : {DType::f32, DType::bf16}) {
    for (auto [rows, cols] : {std::pair<int64_t, int64_t>{130, 200}, {300, 7}, {1, 129}}) {
      CAPTURE(dtype_name(dtype), rows, cols);
      const Tensor x = spread_tensor(rows, cols, 21, dtype);
      Fp8Matrix qt = Fp8Matrix::empty(cols, rows, Fp8Scaling::tile_1x128);
      ops::fp8_quantize_transposed(x, qt);
      const Fp8Matrix expected = quantize(transpose(x), Fp8Scaling::tile_1x128);
      REQUIRE(same_bits(qt.data, expected.data));
      REQUIRE(same_bits(qt.scales, expected.scales));
    }
  }
}

TEST_CASE("fp8: the transposed blocks of W equal block-quantizing Wᵀ", "[fp8]") {
  const Tensor w = spread_tensor(200, 130, 31);
  const Fp8Matrix wt = ops::fp8_transpose_blocks(quantize(w, Fp8Scaling::block_128x128));
  const Fp8Matrix expected = quantize(transpose(w), Fp8Scaling::block_128x128);
  REQUIRE(wt.scaling == Fp8Scaling::block_128x128);
  REQUIRE(same_bits(wt.data, expected.data));
  REQUIRE(same_bits(wt.scales, expected.scales));
}

TEST_CASE("fp8: gemm matches the float64 product of its dequantized operands to fp32 accumulation error", "[fp8]") {
  // Shapes with partial tiles in M, N and K, K below one chunk, and K exactly 2 chunks.
  struct Case {
    int64_t m, n, k;
  };
  for (const Case& s : {Case{130, 70, 200}, Case{5, 3, 40}, Case{17, 140, 256}, Case{3, 2, 1}}) {
    for (Fp8Scaling b_scaling : {Fp8Scaling::tile_1x128, Fp8Scaling::block_128x128}) {
      CAPTURE(s.m, s.n, s.k, static_cast<int>(b_scaling));
      const Fp8Matrix a = quantize(spread_tensor(s.m, s.k, 41), Fp8Scaling::tile_1x128);
      const Fp8Matrix b = quantize(spread_tensor(s.n, s.k, 42), b_scaling);
      require_gemm_matches_reference(a, b);
    }
  }
}

TEST_CASE("fp8: gemm vs the float64 product of the unquantized operands, within the quantization bound", "[fp8]") {
  // With x' = x + e, |e| <= u_x := 2^-4·|x| + 2^-10·s_x (+4u|x|, see the round-trip test):
  //   |a'·b' - a·b| <= Σ_k (u_a|b| + |a|u_b + u_a·u_b), plus the fp32 bound of the GEMM itself.
  // This is a worst case per output element; a GEMM that dropped a scale, mixed up chunks or
  // used the wrong block row errs by O(|d|) and fails it.
  const int64_t m = 70, n = 130, k = 300;
  const Tensor x = spread_tensor(m, k, 51), w = spread_tensor(n, k, 52);
  for (Fp8Scaling b_scaling : {Fp8Scaling::tile_1x128, Fp8Scaling::block_128x128}) {
    const Fp8Matrix a = quantize(x, Fp8Scaling::tile_1x128), b = quantize(w, b_scaling);
    Tensor d = Tensor::empty({m, n}, DType::f32);
    ops::fp8_gemm(a, b, d);
    const auto dv = d.to_vector(), xv = x.to_vector(), wv = w.to_vector();
    const GemmReference deq = reference_gemm(a, b);
    const auto sa = element_scales(a), sb = element_scales(b);
    double worst = 0;
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) {
        double exact = 0, bound = 0;
        for (int64_t p = 0; p < k; ++p) {
          const double av = xv[i * k + p], bv = wv[j * k + p];
          const double ua = element_bound(av, sa[i * k + p]), ub = element_bound(bv, sb[j * k + p]);
          exact += av * bv;
          bound += ua * std::abs(bv) + std::abs(av) * ub + ua * ub;
        }
        bound += gemm_fp32_bound(deq.abs_dot[i * n + j], k);
        worst = std::max(worst, std::abs(dv[i * n + j] - exact) / bound);
      }
    }
    REQUIRE(worst <= 1.0);
  }
}

TEST_CASE("fp8: the Fprop, Dgrad and Wgrad operand layouts", "[fp8]") {
  // Fprop y = x·Wᵀ: x [M, K] in 1x128 tiles, W [N, K] in blocks.
  // Dgrad dx = dy·W: dy [M, N] in tiles along N; W's blocks transposed to [K, N].
  // Wgrad dW = dyᵀ·x: dy and x both re-quantized transposed, in tiles along M (tokens).
  const int64_t m = 150, n = 70, k = 200;
  const Tensor x = spread_tensor(m, k, 61), w = spread_tensor(n, k, 62), dy = spread_tensor(m, n, 63);
  const Fp8Matrix wq = quantize(w, Fp8Scaling::block_128x128);
  require_gemm_matches_reference(quantize(x, Fp8Scaling::tile_1x128), wq);
  require_gemm_matches_reference(quantize(dy, Fp8Scaling::tile_1x128), ops::fp8_transpose_blocks(wq));
  Fp8Matrix dy_t = Fp8Matrix::empty(n, m, Fp8Scaling::tile_1x128), x_t = Fp8Matrix::empty(k, m, Fp8Scaling::tile_1x128);
  ops::fp8_quantize_transposed(dy, dy_t);
  ops::fp8_quantize_transposed(x, x_t);
  require_gemm_matches_reference(dy_t, x_t);
}

TEST_CASE("fp8: bf16 output is the codec rounding of the f32 output; accumulate adds the old d", "[fp8]") {
  const int64_t m = 33, n = 20, k = 260;
  const Fp8Matrix a = quantize(spread_tensor(m, k, 71), Fp8Scaling::tile_1x128);
  const Fp8Matrix b = quantize(spread_tensor(n, k, 72), Fp8Scaling::block_128x128);
  Tensor d32 = Tensor::empty({m, n}, DType::f32), d16 = Tensor::empty({m, n}, DType::bf16);
  ops::fp8_gemm(a, b, d32);
  ops::fp8_gemm(a, b, d16);
  const float* f = d32.data<float>();
  const bf16* h = d16.data<bf16>();
  for (int64_t i = 0; i < m * n; ++i) REQUIRE(h[i].bits == codec::float_to_bf16(f[i]));

  const Tensor old32 = dsx::test::random_tensor({m, n}, DType::f32, 73, -100, 100);
  Tensor acc32 = old32.clone();
  ops::fp8_gemm(a, b, acc32, /*accumulate=*/true);
  const float* o = old32.data<float>();
  const float* r = acc32.data<float>();
  for (int64_t i = 0; i < m * n; ++i) REQUIRE(r[i] == o[i] + f[i]);

  const Tensor old16 = old32.to(DType::bf16);
  Tensor acc16 = old16.clone();
  ops::fp8_gemm(a, b, acc16, /*accumulate=*/true);
  const bf16* o16 = old16.data<bf16>();
  const bf16* r16 = acc16.data<bf16>();
  for (int64_t i = 0; i < m * n; ++i) REQUIRE(r16[i].bits == codec::float_to_bf16(static_cast<float>(o16[i]) + f[i]));
}

TEST_CASE("fp8: negative control - per-tensor scaling of outlier-heavy activations is far worse than 1x128 tiles",
          "[fp8]") {
  // Activations ~U(-1, 1) with four outliers of 2^20 (a few huge channels, as in LLM
  // activations). One scale for the whole tensor maps |x| <= 1 to |y| <= 448/2^20 ≈ 0.00043,
  // below half of E4M3's smallest subnormal (2^-10 ≈ 0.00098): every ordinary element flushes
  // to zero and rows without an outlier lose their whole signal. With 1x128 tiles only the four
  // outlier tiles lose precision, and their rows are dominated by the well-kept outlier.
  // Measure: the worst row-relative error of y = x·Wᵀ against float64 of the unquantized operands.
  const int64_t m = 64, n = 64, k = 512;
  Tensor x = dsx::test::random_tensor({m, k}, DType::f32, 81);
  float* xs = x.data<float>();
  for (int64_t i : {3 * k + 10, 17 * k + 300, 40 * k + 129, 63 * k + 511}) xs[i] = 0x1p20f;
  const Tensor w = dsx::test::random_tensor({n, k}, DType::f32, 82);
  const Fp8Matrix wq = quantize(w, Fp8Scaling::block_128x128);

  // Per-tensor quantization through the same scalar rules: one amax, one scale in every slot.
  Fp8Matrix per_tensor = Fp8Matrix::empty(m, k, Fp8Scaling::tile_1x128);
  float amax = 0;
  for (int64_t i = 0; i < m * k; ++i) amax = fp8::amax_combine(amax, xs[i]);
  const fp8::TileScale s = fp8::scale_from_amax(amax, false);
  for (int64_t i = 0; i < m * k; ++i) per_tensor.data.data<fp8_e4m3>()[i].bits = fp8::quantize_element(xs[i], s);
  per_tensor.scales.fill(s.scale);

  const auto worst_row_error = [&](const Fp8Matrix& a) {
    Tensor d = Tensor::empty({m, n}, DType::f32);
    ops::fp8_gemm(a, wq, d);
    const auto dv = d.to_vector(), xv = x.to_vector(), wv = w.to_vector();
    double worst = 0;
    for (int64_t i = 0; i < m; ++i) {
      double err2 = 0, ref2 = 0;
      for (int64_t j = 0; j < n; ++j) {
        double exact = 0;
        for (int64_t p = 0; p < k; ++p) exact += xv[i * k + p] * wv[j * k + p];
        err2 += (dv[i * n + j] - exact) * (dv[i * n + j] - exact);
        ref2 += exact * exact;
      }
      worst = std::max(worst, std::sqrt(err2 / ref2));
    }
    return worst;
  };
  const double tiled = worst_row_error(quantize(x, Fp8Scaling::tile_1x128));
  const double tensor_wide = worst_row_error(per_tensor);
  CAPTURE(tiled, tensor_wide);
  // 1x128 tiles: quantization noise of a few percent (2^-4 worst case per element, both
  // operands). Per tensor: ordinary rows lose most of their signal (error of order 1).
  REQUIRE(tiled < 0.1);
  REQUIRE(tensor_wide > 10 * tiled);
}

TEST_CASE("fp8: shape, scaling and dtype mismatches throw", "[fp8]") {
  const Tensor x = spread_tensor(4, 130, 91);
  Fp8Matrix wrong = Fp8Matrix::empty(4, 129, Fp8Scaling::tile_1x128);
  REQUIRE_THROWS_AS(ops::fp8_quantize(x, wrong), std::invalid_argument);
  Fp8Matrix blocks = Fp8Matrix::empty(130, 4, Fp8Scaling::block_128x128);
  REQUIRE_THROWS_AS(ops::fp8_quantize_transposed(x, blocks), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::fp8_quantize(x.to(DType::f64), wrong), std::invalid_argument);
  const Fp8Matrix a = quantize(x, Fp8Scaling::tile_1x128);
  const Fp8Matrix b = quantize(spread_tensor(3, 130, 92), Fp8Scaling::block_128x128);
  Tensor d = Tensor::empty({4, 3}, DType::f32);
  REQUIRE_THROWS_AS(ops::fp8_gemm(b, a, d), std::invalid_argument);  // a must be 1x128-tiled
  Tensor d_wrong = Tensor::empty({3, 4}, DType::f32);
  REQUIRE_THROWS_AS(ops::fp8_gemm(a, b, d_wrong), std::invalid_argument);
  Tensor d64 = Tensor::empty({4, 3}, DType::f64);
  REQUIRE_THROWS_AS(ops::fp8_gemm(a, b, d64), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::fp8_transpose_blocks(a), std::invalid_argument);
}
