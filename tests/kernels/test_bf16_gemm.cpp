// The emulated bf16 tensor-core GEMM (kernels/ops/bf16_gemm.h, docs/FP8.md §8). Tag [bf16_gemm].
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <stdexcept>
#include <vector>

#include "kernels/codecs.h"
#include "kernels/ops/bf16_gemm.h"
#include "kernels/ops/gemm.h"

using namespace dsx;

namespace {

constexpr double kFp32Unit = 0x1p-24;  // unit roundoff of fp32
constexpr double kBf16Unit = 0x1p-8;   // unit roundoff of bf16 (8 significand bits)

// Values spread over 2^-8 .. 2^4 in magnitude with random signs and full f32 mantissas, so most
// elements are not bf16 values and the rounding of every operand shows.
std::vector<float> spread_values(int64_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
  std::uniform_int_distribution<int> binade(-8, 3);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = (negative(gen) ? -1.0f : 1.0f) * std::ldexp(mantissa(gen), binade(gen));
  return v;
}

Tensor f32_tensor(const std::vector<float>& v, int64_t rows, int64_t cols) {
  return Tensor::from<float>(std::span<const float>(v), {rows, cols});
}

double bf16_round(double x) {
  return codec::bf16_to_float(codec::float_to_bf16(static_cast<float>(x)));
}

// op(x)[i, k] of a row-major [rows, cols] matrix.
double element(const std::vector<double>& x, int64_t cols, bool trans, int64_t i, int64_t k) {
  return trans ? x[k * cols + i] : x[i * cols + k];
}

struct Bound {
  int64_t violations = 0;
  double worst_ratio = 0;  // max over elements of error / bound
};

// Checks c against float64, element by element, with the bound of bf16_gemm.h:
//   tight (vs the product of the bf16-rounded operands, rounded here with kernels/codecs.h):
//       |c - c_old - Σ a'b'| ≤ (K + 2)·2^-24·(Σ|a'b'| + |c_old|)            [+ 2^-8·|c| for bf16 c]
//   full (vs the product of the unrounded operands): the above + (2·2^-8 + 2^-16)·Σ|ab|
// The first holds only if the operands were rounded to nearest even; the second is the error a
// user of the bf16 GEMM sees.
struct Check {
  Bound tight, full;
};
Check check_against_f64(bool ta, bool tb, const std::vector<double>& a, int64_t a_cols, const std::vector<double>& b,
                        int64_t b_cols, int64_t M, int64_t N, int64_t K, const std::vector<double>& c_old,
                        const std::vector<double>& c, bool bf16_out) {
  Check out;
  const auto record = [](Bound& bound, double err, double limit) {
    bound.worst_ratio = std::max(bound.worst_ratio, err / limit);
    if (err > limit) ++bound.violations;
  };
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double exact = 0, rounded = 0, magnitude = 0, rounded_magnitude = 0;
      for (int64_t k = 0; k < K; ++k) {
        const double x = element(a, a_cols, ta, i, k), y = element(b, b_cols, tb, k, j);
        exact += x * y;
        rounded += bf16_round(x) * bf16_round(y);
        magnitude += std::abs(x * y);
        rounded_magnitude += std::abs(bf16_round(x) * bf16_round(y));
      }
      const double old = c_old[i * N + j], got = c[i * N + j];
      double accumulation = static_cast<double>(K + 2) * kFp32Unit * (rounded_magnitude + std::abs(old));
      if (bf16_out) accumulation += kBf16Unit * std::abs(got);
      record(out.tight, std::abs(got - old - rounded), accumulation);
      record(out.full, std::abs(got - old - exact), accumulation + (2 * kBf16Unit + kBf16Unit * kBf16Unit) * magnitude);
    }
  }
  return out;
}

}  // namespace

TEST_CASE("bf16_gemm rounds its operands to bf16, nearest even", "[bf16_gemm]") {
  // a [4, 1] · b [1, 1] with b = 1: each output is bf16(a_i).
  const std::vector<float> a = {1.0f + 0x1p-8f,             // halfway between 1 and 1 + 2^-7: ties to even (1)
                                1.0f + 3 * 0x1p-8f,         // halfway between 1 + 2^-7 and 1 + 2^-6: to even (up)
                                1.0f + 0x1p-8f + 0x1p-20f,  // just above halfway: up
                                -3.14159265f};
  Tensor c = Tensor::empty({4, 1}, DType::f32);
  ops::bf16_gemm(false, false, f32_tensor(a, 4, 1), f32_tensor({1.0f}, 1, 1), c);
  const std::vector<double> got = c.to_vector();
  CHECK(got[0] == 1.0);
  CHECK(got[1] == 1.015625);
  CHECK(got[2] == 1.0078125);
  CHECK(got[3] == -3.140625);

  // Products of bf16 values are exact and summed in fp32: 1 + 2^-7 squared is 1 + 2^-6 + 2^-14,
  // which bf16 could not hold but the f32 output does.
  Tensor sq = Tensor::empty({1, 1}, DType::f32);
  ops::bf16_gemm(false, false, f32_tensor({1.0f + 0x1p-7f}, 1, 1), f32_tensor({1.0f + 0x1p-7f}, 1, 1), sq);
  CHECK(sq.to_vector()[0] == 1.0 + 0x1p-6 + 0x1p-14);

  // A bf16 output rounds that sum (to 1 + 2^-6).
  Tensor sq16 = Tensor::empty({1, 1}, DType::bf16);
  ops::bf16_gemm(false, false, f32_tensor({1.0f + 0x1p-7f}, 1, 1), f32_tensor({1.0f + 0x1p-7f}, 1, 1), sq16);
  CHECK(sq16.to_vector()[0] == 1.0 + 0x1p-6);
}

TEST_CASE("bf16_gemm against float64 within the stated bound, every transpose and output", "[bf16_gemm]") {
  // K = 300: not a power of two, long enough for the fp32 sums to matter.
  const int64_t M = 37, N = 29, K = 300;
  const auto [ta, tb, accumulate, bf16_out] = GENERATE(table<bool, bool, bool, bool>({{false, false, false, false},
                                                                                     {false, true, false, false},
                                                                                     {true, false, true, false},
                                                                                     {true, true, false, true},
                                                                                     {false, true, true, true}}));
  const int64_t a_rows = ta ? K : M, a_cols = ta ? M : K, b_rows = tb ? N : K, b_cols = tb ? K : N;
  const std::vector<float> av = spread_values(a_rows * a_cols, 1), bv = spread_values(b_rows * b_cols, 2);
  const Tensor a = f32_tensor(av, a_rows, a_cols), b = f32_tensor(bv, b_rows, b_cols);
  Tensor c = Tensor::from<float>(std::span<const float>(spread_values(M * N, 3)), {M, N}).to(bf16_out ? DType::bf16 : DType::f32);
  const std::vector<double> c_old = accumulate ? c.to_vector() : std::vector<double>(static_cast<size_t>(M * N), 0.0);
  const std::vector<double> a_before = a.to_vector(), b_before = b.to_vector();

  ops::bf16_gemm(ta, tb, a, b, c, accumulate);

  CHECK(a.to_vector() == a_before);  // the operands are rounded into scratch, not in place
  CHECK(b.to_vector() == b_before);
  const Check result =
      check_against_f64(ta, tb, a_before, a_cols, b_before, b_cols, M, N, K, c_old, c.to_vector(), bf16_out);
  INFO("trans_a " << ta << ", trans_b " << tb << ", accumulate " << accumulate << ", bf16 output " << bf16_out
                  << ": worst error / bound: vs bf16-rounded operands " << result.tight.worst_ratio
                  << ", vs unrounded operands " << result.full.worst_ratio);
  CHECK(result.tight.violations == 0);
  CHECK(result.full.violations == 0);
}

TEST_CASE("bf16_gemm is not the fp32 GEMM: its error is the bf16 operand rounding", "[bf16_gemm]") {
  // Negative control: the same product in plain f32 (ops::gemm) is ~2^-24-accurate, the bf16
  // one ~2^-9 per operand (relative RMS over the output ~2^-9·√2 for independent roundings).
  const int64_t M = 64, N = 48, K = 256;
  const std::vector<float> av = spread_values(M * K, 4), bv = spread_values(N * K, 5);
  const Tensor a = f32_tensor(av, M, K), b = f32_tensor(bv, N, K);
  Tensor c16 = Tensor::empty({M, N}, DType::f32), c32 = Tensor::empty({M, N}, DType::f32);
  ops::bf16_gemm(false, true, a, b, c16);
  ops::gemm(false, true, 1.0, a, b, 0.0, c32);
  const std::vector<double> x = a.to_vector(), y = b.to_vector(), d16 = c16.to_vector(), d32 = c32.to_vector();
  double err16 = 0, err32 = 0, norm = 0;
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      double exact = 0;
      for (int64_t k = 0; k < K; ++k) exact += x[i * K + k] * y[j * K + k];
      err16 += std::pow(d16[i * N + j] - exact, 2);
      err32 += std::pow(d32[i * N + j] - exact, 2);
      norm += exact * exact;
    }
  }
  const double rel16 = std::sqrt(err16 / norm), rel32 = std::sqrt(err32 / norm);
  INFO("relative RMS error vs float64: bf16_gemm " << rel16 << ", fp32 gemm " << rel32);
  // Each product carries ≤ 2·2^-8 relative error (≈ 2^-9·√(2/3)·√2 RMS for uniform rounding
  // errors); over a random-sign sum the relative RMS stays of that order. Require it between
  // 2^-12 and 2^-7, and far above the fp32 GEMM's.
  CHECK(rel16 > 0x1p-12);
  CHECK(rel16 < 0x1p-7);
  CHECK(rel16 > 100 * rel32);
}

TEST_CASE("bf16_gemm takes bf16 operands as they are and checks its arguments", "[bf16_gemm]") {
  const std::vector<float> av = spread_values(6 * 5, 6), bv = spread_values(5 * 4, 7);
  const Tensor a = f32_tensor(av, 6, 5), b = f32_tensor(bv, 5, 4);
  Tensor from_f32 = Tensor::empty({6, 4}, DType::f32), from_bf16 = Tensor::empty({6, 4}, DType::f32);
  ops::bf16_gemm(false, false, a, b, from_f32);
  ops::bf16_gemm(false, false, a.to(DType::bf16), b.to(DType::bf16), from_bf16);
  CHECK(from_f32.to_vector() == from_bf16.to_vector());  // f32 -> bf16 conversion is the same RNE

  Tensor c = Tensor::empty({6, 4}, DType::f32);
  CHECK_THROWS_AS(ops::bf16_gemm(false, true, a, b, c), std::invalid_argument);  // K mismatch
  CHECK_THROWS_AS(ops::bf16_gemm(false, false, a.to(DType::f64), b, c), std::invalid_argument);
  Tensor c64 = Tensor::empty({6, 4}, DType::f64);
  CHECK_THROWS_AS(ops::bf16_gemm(false, false, a, b, c64), std::invalid_argument);
  Tensor wrong = Tensor::empty({6, 5}, DType::bf16);
  CHECK_THROWS_AS(ops::bf16_gemm(false, false, a, b, wrong), std::invalid_argument);
}
