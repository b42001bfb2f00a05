// RMSNorm forward and its input/weight gradients.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops/rmsnorm.h"
#include "support/gradcheck.h"

using namespace dsx;
using dsx::test::finite_difference;
using dsx::test::max_rel_error;
using dsx::test::random_tensor;

namespace {

constexpr double kEps = 1e-6;
// Gradients against central differences in f64 (see support/gradcheck.h for the error budget).
constexpr double kGradTolerance = 1e-6;
// f32 against f64: a row's mean square sums D = 96 squares (error ~ sqrt(D)·2^-24 ≈ 6e-7
// relative), followed by a handful of roundings; 1e-5 leaves >10x margin while a missing
// factor (weight, rstd, the r³ term) is off by O(1).
constexpr double kF32Tolerance = 1e-5;

struct Reference {
  Tensor y;
  Tensor rstd;
};

// y = x · rstd · w with rstd = 1 / sqrt(mean(x²) + eps), plainly in float64.
Reference reference_rmsnorm(const Tensor& x, const Tensor& w, double eps) {
  const int64_t n = x.dim(0), d = x.dim(1);
  const auto xv = x.to_vector(), wv = w.to_vector();
  std::vector<double> y(xv.size()), rstd(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += xv[i * d + j] * xv[i * d + j];
    rstd[i] = 1.0 / std::sqrt(ss / static_cast<double>(d) + eps);
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = xv[i * d + j] * rstd[i] * wv[j];
  }
  return {Tensor::from<double>(y, x.shape()), Tensor::from<double>(rstd, {n})};
}

struct Grads {
  Tensor dx;
  Tensor dw;
};

Grads rmsnorm_grads(const Tensor& x, const Tensor& w, const Tensor& dy) {
  const int64_t n = x.dim(0), d = x.dim(1);
  Tensor y = Tensor::empty({n, d}, x.dtype()), rstd = Tensor::empty({n}, x.dtype());
  ops::rmsnorm_forward(x, w, kEps, y, rstd);
  Grads g{Tensor::empty({n, d}, x.dtype()), Tensor::zeros({d}, x.dtype())};
  ops::rmsnorm_backward_input(x, w, rstd, dy, g.dx);
  ops::rmsnorm_backward_weight(x, rstd, dy, g.dw);
  return g;
}

}  // namespace

TEST_CASE("rmsnorm: f32 forward matches a float64 reference", "[rmsnorm]") {
  // Rows of different magnitudes, so rstd really varies from row to row.
  Tensor x = random_tensor({6, 96}, DType::f64, 1, -3.0, 3.0);
  for (int64_t j = 0; j < 96; ++j) x.data<double>()[96 + j] *= 1e-2;
  const Tensor x32 = x.to(DType::f32);
  const Tensor w32 = random_tensor({96}, DType::f32, 2, 0.5, 1.5);
  Tensor y = Tensor::full({6, 96}, std::numeric_limits<double>::quiet_NaN(), DType::f32);
  Tensor rstd = Tensor::zeros({6}, DType::f32);
  ops::rmsnorm_forward(x32, w32, kEps, y, rstd);
  const Reference ref = reference_rmsnorm(x32, w32, kEps);
  REQUIRE(max_rel_error(y, ref.y) < kF32Tolerance);
  REQUIRE(max_rel_error(rstd, ref.rstd) < kF32Tolerance);
}

TEST_CASE("rmsnorm: input and weight gradients match central finite differences in f64", "[rmsnorm]") {
  const int64_t n = 4, d = 12;
  Tensor x = random_tensor({n, d}, DType::f64, 10);
  Tensor w = random_tensor({d}, DType::f64, 11, 0.5, 1.5);
  const Tensor probe = random_tensor({n, d}, DType::f64, 12);
  Tensor y = Tensor::zeros({n, d}, DType::f64), rstd = Tensor::zeros({n}, DType::f64);
  const auto loss = [&] {
    ops::rmsnorm_forward(x, w, kEps, y, rstd);
    return test::dot(y, probe);
  };
  const Grads g = rmsnorm_grads(x, w, probe);
  REQUIRE(max_rel_error(g.dx, finite_difference(x, loss)) < kGradTolerance);
  REQUIRE(max_rel_error(g.dw, finite_difference(w, loss)) < kGradTolerance);
}

TEST_CASE("rmsnorm: f32 gradients agree with the f64 ones", "[rmsnorm]") {
  // Wide enough (N·D > 2^15) that the OpenMP paths run.
  const Tensor x = random_tensor({80, 520}, DType::f64, 20);
  const Tensor w = random_tensor({520}, DType::f64, 21, 0.5, 1.5);
  const Tensor dy = random_tensor({80, 520}, DType::f64, 22);
  const Grads g64 = rmsnorm_grads(x, w, dy);
  const Grads g32 = rmsnorm_grads(x.to(DType::f32), w.to(DType::f32), dy.to(DType::f32));
  // dw sums N = 80 rows on top of the row reductions: still ~1e-6 relative; same bound.
  REQUIRE(max_rel_error(g32.dx, g64.dx) < kF32Tolerance);
  REQUIRE(max_rel_error(g32.dw, g64.dw) < kF32Tolerance);
}

TEST_CASE("rmsnorm: the weight gradient accumulates, the input gradient overwrites", "[rmsnorm]") {
  const Tensor x = random_tensor({5, 16}, DType::f64, 30);
  const Tensor w = random_tensor({16}, DType::f64, 31, 0.5, 1.5);
  const Tensor dy = random_tensor({5, 16}, DType::f64, 32);
  Tensor y = Tensor::zeros({5, 16}, DType::f64), rstd = Tensor::zeros({5}, DType::f64);
  ops::rmsnorm_forward(x, w, kEps, y, rstd);
  Tensor once = Tensor::zeros({16}, DType::f64), twice = Tensor::zeros({16}, DType::f64);
  ops::rmsnorm_backward_weight(x, rstd, dy, once);
  ops::rmsnorm_backward_weight(x, rstd, dy, twice);
  ops::rmsnorm_backward_weight(x, rstd, dy, twice);
  const auto a = once.to_vector(), b = twice.to_vector();
  for (size_t i = 0; i < a.size(); ++i) REQUIRE(b[i] == 2 * a[i]);  // a + a is exact

  Tensor dx1 = Tensor::zeros({5, 16}, DType::f64), dx2 = Tensor::full({5, 16}, 7.0, DType::f64);
  ops::rmsnorm_backward_input(x, w, rstd, dy, dx1);
  ops::rmsnorm_backward_input(x, w, rstd, dy, dx2);
  REQUIRE(test::max_abs_diff(dx1, dx2) == 0.0);
}

TEST_CASE("rmsnorm: mismatched shapes and dtypes throw", "[rmsnorm]") {
  const Tensor x = random_tensor({3, 8}, DType::f32, 40);
  const Tensor w = random_tensor({8}, DType::f32, 41);
  Tensor y = Tensor::zeros({3, 8}, DType::f32), rstd = Tensor::zeros({3}, DType::f32);
  REQUIRE_NOTHROW(ops::rmsnorm_forward(x, w, kEps, y, rstd));
  const Tensor w_wrong = random_tensor({7}, DType::f32, 42);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w_wrong, kEps, y, rstd), std::invalid_argument);
  Tensor rstd_wrong = Tensor::zeros({4}, DType::f32);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w, kEps, y, rstd_wrong), std::invalid_argument);
  Tensor y_wrong = Tensor::zeros({3, 9}, DType::f32);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w, kEps, y_wrong, rstd), std::invalid_argument);
  const Tensor w64 = w.to(DType::f64);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w64, kEps, y, rstd), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w, -1.0, y, rstd), std::invalid_argument);

  const Tensor dy_wrong = random_tensor({3, 7}, DType::f32, 43);
  Tensor dx = Tensor::zeros({3, 8}, DType::f32), dw = Tensor::zeros({8}, DType::f32);
  REQUIRE_THROWS_AS(ops::rmsnorm_backward_input(x, w, rstd, dy_wrong, dx), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rmsnorm_backward_weight(x, rstd, dy_wrong, dw), std::invalid_argument);
  Tensor dw_wrong = Tensor::zeros({9}, DType::f32);
  REQUIRE_THROWS_AS(ops::rmsnorm_backward_weight(x, rstd, y, dw_wrong), std::invalid_argument);
}
