// linear (y = x·Wᵀ and its two gradients) and the gemm it runs on.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops/gemm.h"
#include "kernels/ops/linear.h"
#include "support/gradcheck.h"

using namespace dsx;
using dsx::test::finite_difference;
using dsx::test::max_rel_error;
using dsx::test::random_tensor;

namespace {

// c = alpha · op(a) · op(b) + beta · c in plain float64 loops, a and b of any dtype.
Tensor reference_gemm(bool ta, bool tb, double alpha, const Tensor& a, const Tensor& b, double beta, const Tensor& c) {
  const auto av = a.to_vector(), bv = b.to_vector();
  auto cv = c.to_vector();
  const int64_t m = c.dim(0), n = c.dim(1), k = ta ? a.dim(0) : a.dim(1);
  const int64_t lda = a.dim(1), ldb = b.dim(1);
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      double s = 0;
      for (int64_t p = 0; p < k; ++p) {
        const double aip = ta ? av[p * lda + i] : av[i * lda + p];
        const double bpj = tb ? bv[j * ldb + p] : bv[p * ldb + j];
        s += aip * bpj;
      }
      cv[i * n + j] = alpha * s + beta * cv[i * n + j];
    }
  }
  return Tensor::from<double>(cv, c.shape());
}

// y = x · Wᵀ in float64.
Tensor reference_linear(const Tensor& x, const Tensor& w) {
  return reference_gemm(false, true, 1.0, x, w, 0.0, Tensor::zeros({x.dim(0), w.dim(0)}, DType::f64));
}

// f32 GEMM tolerance: each output sums K products; the rounding error grows like sqrt(K)·2^-24
// relative to the output scale, ~5e-7 for K = 67. 1e-5 leaves a 20x margin, while a wrong
// transpose, alpha or beta is off by O(1).
constexpr double kGemmF32Tolerance = 1e-5;
// f64: the same argument with 2^-53 gives ~1e-15; 1e-12 is a generous bound.
constexpr double kGemmF64Tolerance = 1e-12;
// Gradients against central differences in f64 (see support/gradcheck.h for the error budget).
constexpr double kGradTolerance = 1e-6;

}  // namespace

TEST_CASE("gemm: every transpose combination matches a float64 reference", "[gemm]") {
  const int64_t m = 13, n = 17, k = 67;
  for (DType dtype : {DType::f32, DType::f64}) {
    for (bool ta : {false, true}) {
      for (bool tb : {false, true}) {
        CAPTURE(dtype_name(dtype), ta, tb);
        const Tensor a = random_tensor(ta ? Shape{k, m} : Shape{m, k}, dtype, 1);
        const Tensor b = random_tensor(tb ? Shape{n, k} : Shape{k, n}, dtype, 2);
        Tensor c = random_tensor({m, n}, dtype, 3);
        const Tensor expected = reference_gemm(ta, tb, 0.75, a, b, -0.5, c);
        ops::gemm(ta, tb, 0.75, a, b, -0.5, c);
        REQUIRE(max_rel_error(c, expected) < (dtype == DType::f32 ? kGemmF32Tolerance : kGemmF64Tolerance));
      }
    }
  }
}

TEST_CASE("gemm: beta = 0 overwrites the output, even NaN; an empty inner dimension gives beta·c", "[gemm]") {
  const Tensor a = random_tensor({4, 6}, DType::f32, 4);
  const Tensor b = random_tensor({6, 5}, DType::f32, 5);
  Tensor c = Tensor::full({4, 5}, std::numeric_limits<double>::quiet_NaN(), DType::f32);
  ops::gemm(false, false, 1.0, a, b, 0.0, c);
  REQUIRE(max_rel_error(c, reference_gemm(false, false, 1.0, a, b, 0.0, Tensor::zeros({4, 5}, DType::f64))) <
          kGemmF32Tolerance);

  const Tensor a0 = Tensor::zeros({4, 0}, DType::f64), b0 = Tensor::zeros({0, 5}, DType::f64);
  Tensor c0 = Tensor::full({4, 5}, 3.0, DType::f64);
  ops::gemm(false, false, 1.0, a0, b0, 0.5, c0);
  for (double v : c0.to_vector()) REQUIRE(v == 1.5);
  c0.fill(std::numeric_limits<double>::quiet_NaN());
  ops::gemm(false, false, 1.0, a0, b0, 0.0, c0);
  for (double v : c0.to_vector()) REQUIRE(v == 0.0);
}

TEST_CASE("gemm: mismatched shapes and dtypes throw", "[gemm]") {
  const Tensor a = random_tensor({4, 6}, DType::f32, 6);
  const Tensor b = random_tensor({6, 5}, DType::f32, 7);
  Tensor c = Tensor::zeros({4, 5}, DType::f32);
  REQUIRE_NOTHROW(ops::gemm(false, false, 1.0, a, b, 0.0, c));
  REQUIRE_THROWS_AS(ops::gemm(true, false, 1.0, a, b, 0.0, c), std::invalid_argument);  // inner 4 vs 6
  REQUIRE_THROWS_AS(ops::gemm(false, true, 1.0, a, b, 0.0, c), std::invalid_argument);  // inner 6 vs 5
  Tensor wrong_c = Tensor::zeros({5, 4}, DType::f32);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a, b, 0.0, wrong_c), std::invalid_argument);
  const Tensor b64 = b.to(DType::f64);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a, b64, 0.0, c), std::invalid_argument);
  const Tensor a_bf16 = a.to(DType::bf16), b_bf16 = b.to(DType::bf16);
  Tensor c_bf16 = Tensor::zeros({4, 5}, DType::bf16);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a_bf16, b_bf16, 0.0, c_bf16), std::invalid_argument);
  const Tensor a3 = a.view({4, 6, 1});
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a3, b, 0.0, c), std::invalid_argument);
}

TEST_CASE("linear: f32 forward matches a float64 reference", "[linear]") {
  const Tensor x = random_tensor({9, 67}, DType::f32, 10);
  const Tensor w = random_tensor({23, 67}, DType::f32, 11);
  Tensor y = Tensor::full({9, 23}, std::numeric_limits<double>::quiet_NaN(), DType::f32);  // overwritten
  ops::linear_forward(x, w, y);
  REQUIRE(max_rel_error(y, reference_linear(x, w)) < kGemmF32Tolerance);
}

TEST_CASE("linear: input and weight gradients match central finite differences in f64", "[linear]") {
  const int64_t n = 5, in = 7, out = 4;
  Tensor x = random_tensor({n, in}, DType::f64, 20);
  Tensor w = random_tensor({out, in}, DType::f64, 21);
  const Tensor probe = random_tensor({n, out}, DType::f64, 22);
  Tensor y = Tensor::zeros({n, out}, DType::f64);
  const auto loss = [&] {
    ops::linear_forward(x, w, y);
    return test::dot(y, probe);
  };
  Tensor dx = Tensor::full({n, in}, 123.0, DType::f64);  // overwritten, so the fill must vanish
  ops::linear_backward_input(probe, w, dx);
  REQUIRE(max_rel_error(dx, finite_difference(x, loss)) < kGradTolerance);

  Tensor dw = Tensor::zeros({out, in}, DType::f64);
  ops::linear_backward_weight(probe, x, dw);
  REQUIRE(max_rel_error(dw, finite_difference(w, loss)) < kGradTolerance);
}

TEST_CASE("linear: f32 gradients match the float64 reference products", "[linear]") {
  const Tensor x = random_tensor({33, 70}, DType::f32, 30);
  const Tensor w = random_tensor({41, 70}, DType::f32, 31);
  const Tensor dy = random_tensor({33, 41}, DType::f32, 32);
  Tensor dx = Tensor::zeros({33, 70}, DType::f32);
  ops::linear_backward_input(dy, w, dx);
  REQUIRE(max_rel_error(dx, reference_gemm(false, false, 1.0, dy, w, 0.0, Tensor::zeros({33, 70}, DType::f64))) <
          kGemmF32Tolerance);
  Tensor dw = Tensor::zeros({41, 70}, DType::f32);
  ops::linear_backward_weight(dy, x, dw);
  REQUIRE(max_rel_error(dw, reference_gemm(true, false, 1.0, dy, x, 0.0, Tensor::zeros({41, 70}, DType::f64))) <
          kGemmF32Tolerance);
}

TEST_CASE("linear: the weight gradient accumulates and the input gradient overwrites", "[linear]") {
  const Tensor x = random_tensor({6, 8}, DType::f64, 40);
  const Tensor w = random_tensor({5, 8}, DType::f64, 41);
  const Tensor dy = random_tensor({6, 5}, DType::f64, 42);
  Tensor once = Tensor::zeros({5, 8}, DType::f64);
  ops::linear_backward_weight(dy, x, once);
  Tensor twice = Tensor::zeros({5, 8}, DType::f64);
  ops::linear_backward_weight(dy, x, twice);
  ops::linear_backward_weight(dy, x, twice);
  Tensor doubled = once.clone();
  for (int64_t i = 0; i < doubled.numel(); ++i) doubled.data<double>()[i] *= 2;
  // a + a = 2a is exact in floating point; the bound only absorbs BLAS blocking differences.
  REQUIRE(max_rel_error(twice, doubled) < 1e-14);

  Tensor dx1 = Tensor::zeros({6, 8}, DType::f64), dx2 = Tensor::zeros({6, 8}, DType::f64);
  ops::linear_backward_input(dy, w, dx1);
  ops::linear_backward_input(dy, w, dx2);
  ops::linear_backward_input(dy, w, dx2);
  REQUIRE(test::max_abs_diff(dx1, dx2) == 0.0);
}

TEST_CASE("linear: bf16 operands give the f32 result of their bf16-rounded values", "[linear]") {
  const Tensor x16 = random_tensor({12, 40}, DType::bf16, 50);
  const Tensor w16 = random_tensor({24, 40}, DType::bf16, 51);
  const Tensor dy16 = random_tensor({12, 24}, DType::bf16, 52);
  const Tensor x32 = x16.to(DType::f32), w32 = w16.to(DType::f32), dy32 = dy16.to(DType::f32);
  // Widening bf16 -> f32 is exact, so the GEMM sees identical inputs: results are bit-equal.
  Tensor want = Tensor::zeros({12, 24}, DType::f32), got = Tensor::zeros({12, 24}, DType::f32);
  ops::linear_forward(x32, w32, want);
  ops::linear_forward(x16, w16, got);
  REQUIRE(test::max_abs_diff(got, want) == 0.0);
  ops::linear_forward(x16, w32, got);
  REQUIRE(test::max_abs_diff(got, want) == 0.0);
  ops::linear_forward(x32, w16, got);
  REQUIRE(test::max_abs_diff(got, want) == 0.0);
  REQUIRE(max_rel_error(got, reference_linear(x16, w16)) < kGemmF32Tolerance);

  Tensor dx_want = Tensor::zeros({12, 40}, DType::f32), dx_got = Tensor::zeros({12, 40}, DType::f32);
  ops::linear_backward_input(dy32, w32, dx_want);
  ops::linear_backward_input(dy16, w16, dx_got);
  REQUIRE(test::max_abs_diff(dx_got, dx_want) == 0.0);

  Tensor dw_want = Tensor::zeros({24, 40}, DType::f32), dw_got = Tensor::zeros({24, 40}, DType::f32);
  ops::linear_backward_weight(dy32, x32, dw_want);
  ops::linear_backward_weight(dy16, x16, dw_got);
  REQUIRE(test::max_abs_diff(dw_got, dw_want) == 0.0);

  // bf16 widens to f64 exactly as well, for f64 reference runs.
  Tensor y64 = Tensor::zeros({12, 24}, DType::f64);
  ops::linear_forward(x16, w16, y64);
  REQUIRE(max_rel_error(y64, reference_linear(x16, w16)) < kGemmF64Tolerance);
}

TEST_CASE("linear: mismatched shapes and dtypes throw", "[linear]") {
  const Tensor x = random_tensor({6, 8}, DType::f32, 60);
  const Tensor w = random_tensor({5, 8}, DType::f32, 61);
  Tensor y = Tensor::zeros({6, 5}, DType::f32);
  REQUIRE_NOTHROW(ops::linear_forward(x, w, y));
  const Tensor w_wrong = random_tensor({5, 7}, DType::f32, 62);
  REQUIRE_THROWS_AS(ops::linear_forward(x, w_wrong, y), std::invalid_argument);
  Tensor y_wrong = Tensor::zeros({6, 4}, DType::f32);
  REQUIRE_THROWS_AS(ops::linear_forward(x, w, y_wrong), std::invalid_argument);
  Tensor y_bf16 = Tensor::zeros({6, 5}, DType::bf16);
  REQUIRE_THROWS_AS(ops::linear_forward(x, w, y_bf16), std::invalid_argument);  // output sets f32|f64
  const Tensor w64 = w.to(DType::f64);
  REQUIRE_THROWS_AS(ops::linear_forward(x, w64, y), std::invalid_argument);  // f64 is not widened into f32
  const Tensor x3 = x.view({2, 3, 8});
  REQUIRE_THROWS_AS(ops::linear_forward(x3, w, y), std::invalid_argument);

  const Tensor dy = random_tensor({6, 5}, DType::f32, 63);
  Tensor dx_wrong = Tensor::zeros({6, 5}, DType::f32);
  REQUIRE_THROWS_AS(ops::linear_backward_input(dy, w, dx_wrong), std::invalid_argument);
  Tensor dw_wrong = Tensor::zeros({8, 5}, DType::f32);
  REQUIRE_THROWS_AS(ops::linear_backward_weight(dy, x, dw_wrong), std::invalid_argument);
  const Tensor x_rows = random_tensor({7, 8}, DType::f32, 64);
  Tensor dw = Tensor::zeros({5, 8}, DType::f32);
  REQUIRE_THROWS_AS(ops::linear_backward_weight(dy, x_rows, dw), std::invalid_argument);
}
