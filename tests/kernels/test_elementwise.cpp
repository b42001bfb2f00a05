// add_, scale_, copy_columns and set_columns.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops/elementwise.h"
#include "support/gradcheck.h"

using namespace dsx;
using dsx::test::finite_difference;
using dsx::test::max_rel_error;
using dsx::test::random_tensor;

namespace {

// Gradients against central differences in f64 (see support/gradcheck.h for the error budget).
constexpr double kGradTolerance = 1e-6;
// y + alpha·x in f32 rounds once or twice (alpha·x, then the sum; once with FMA): ≤ 2·2^-24
// relative to the operands' scale. 5e-7 bounds that, while a wrong alpha or sign is O(1) off.
constexpr double kF32Tolerance = 5e-7;

// out[r, j] = x[r, begin + j] for x viewed as rows of its last dimension.
std::vector<double> reference_columns(const Tensor& x, int64_t begin, int64_t width) {
  const int64_t d = x.dim(-1), rows = x.numel() / d;
  const auto xv = x.to_vector();
  std::vector<double> out;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t j = 0; j < width; ++j) out.push_back(xv[r * d + begin + j]);
  }
  return out;
}

}  // namespace

TEST_CASE("elementwise: add_ and scale_ match float64 references", "[elementwise]") {
  for (DType dtype : {DType::f32, DType::f64}) {
    CAPTURE(dtype_name(dtype));
    // 70000 elements: long enough for OpenBLAS's threaded level-1 path.
    const Tensor x = random_tensor({70, 1000}, dtype, 1);
    Tensor y = random_tensor({70, 1000}, dtype, 2);
    const auto xv = x.to_vector(), yv = y.to_vector();
    ops::add_(y, x, -0.37);
    std::vector<double> expected(yv.size());
    for (size_t i = 0; i < yv.size(); ++i) expected[i] = yv[i] + -0.37 * xv[i];
    const double tolerance = dtype == DType::f32 ? kF32Tolerance : 1e-15;
    REQUIRE(max_rel_error(y, Tensor::from<double>(expected, {70, 1000})) < tolerance);

    ops::scale_(y, 2.5);
    for (double& v : expected) v *= 2.5;
    REQUIRE(max_rel_error(y, Tensor::from<double>(expected, {70, 1000})) < 2 * tolerance);
  }
  Tensor y = Tensor::zeros({3}, DType::f32);
  ops::add_(y, Tensor::from<float>({1, 2, 3}, {3}));  // alpha defaults to 1
  REQUIRE(y.to_vector() == std::vector<double>{1, 2, 3});
}

TEST_CASE("elementwise: scale_ by zero writes zeros even over NaN", "[elementwise]") {
  Tensor y = Tensor::full({5}, std::numeric_limits<double>::quiet_NaN(), DType::f32);
  ops::scale_(y, 0.0);
  for (double v : y.to_vector()) REQUIRE(v == 0.0);
}

TEST_CASE("elementwise: copy_columns and set_columns move the right columns", "[elementwise]") {
  const Tensor x = random_tensor({2, 3, 10}, DType::f32, 10);
  Tensor part = Tensor::zeros({2, 3, 4}, DType::f32);
  ops::copy_columns(x, 5, part);
  REQUIRE(part.to_vector() == reference_columns(x, 5, 4));

  // Narrow dtypes move as bytes.
  const Tensor x16 = x.to(DType::bf16);
  Tensor part16 = Tensor::zeros({2, 3, 4}, DType::bf16);
  ops::copy_columns(x16, 5, part16);
  REQUIRE(part16.to_vector() == reference_columns(x16, 5, 4));

  Tensor dst = x.clone();
  const Tensor src = random_tensor({2, 3, 4}, DType::f32, 11);
  ops::set_columns(dst, 6, src);
  const auto dv = dst.to_vector(), xv = x.to_vector(), sv = src.to_vector();
  for (int64_t r = 0; r < 6; ++r) {
    for (int64_t j = 0; j < 10; ++j) {
      const bool inside = j >= 6 && j < 10;
      REQUIRE(dv[r * 10 + j] == (inside ? sv[r * 4 + j - 6] : xv[r * 10 + j]));
    }
  }

  Tensor acc = x.to(DType::f64);
  const Tensor src64 = src.to(DType::f64);
  ops::set_columns(acc, 1, src64, /*accumulate=*/true);
  const auto av = acc.to_vector();
  for (int64_t r = 0; r < 6; ++r) {
    for (int64_t j = 0; j < 10; ++j) {
      const bool inside = j >= 1 && j < 5;
      REQUIRE(av[r * 10 + j] == (inside ? xv[r * 10 + j] + sv[r * 4 + j - 1] : xv[r * 10 + j]));
    }
  }
}

TEST_CASE("elementwise: set_columns (accumulate) is the gradient of copy_columns, and vice versa", "[elementwise]") {
  // The backward of a column split is an accumulating column write; of a column write (over
  // dst), a column read for src and the zeroed columns for dst. Checked by central differences.
  Tensor x = random_tensor({3, 9}, DType::f64, 20);
  const Tensor probe_part = random_tensor({3, 4}, DType::f64, 21);
  Tensor part = Tensor::zeros({3, 4}, DType::f64);
  const auto split_loss = [&] {
    ops::copy_columns(x, 2, part);
    return test::dot(part, probe_part);
  };
  Tensor dx = Tensor::zeros({3, 9}, DType::f64);
  ops::set_columns(dx, 2, probe_part, /*accumulate=*/true);
  REQUIRE(max_rel_error(dx, finite_difference(x, split_loss)) < kGradTolerance);

  Tensor dst = random_tensor({3, 9}, DType::f64, 22);
  Tensor src = random_tensor({3, 4}, DType::f64, 23);
  const Tensor probe_full = random_tensor({3, 9}, DType::f64, 24);
  const auto write_loss = [&] {
    Tensor out = dst.clone();
    ops::set_columns(out, 5, src);
    return test::dot(out, probe_full);
  };
  Tensor dsrc = Tensor::zeros({3, 4}, DType::f64);
  ops::copy_columns(probe_full, 5, dsrc);
  REQUIRE(max_rel_error(dsrc, finite_difference(src, write_loss)) < kGradTolerance);
  Tensor ddst = probe_full.clone();
  ops::set_columns(ddst, 5, Tensor::zeros({3, 4}, DType::f64));
  REQUIRE(max_rel_error(ddst, finite_difference(dst, write_loss)) < kGradTolerance);
}

TEST_CASE("elementwise: mismatched shapes, dtypes and column ranges throw", "[elementwise]") {
  Tensor y = Tensor::zeros({4, 6}, DType::f32);
  const Tensor x_wrong = Tensor::zeros({6, 4}, DType::f32);
  REQUIRE_THROWS_AS(ops::add_(y, x_wrong), std::invalid_argument);
  const Tensor x64 = Tensor::zeros({4, 6}, DType::f64);
  REQUIRE_THROWS_AS(ops::add_(y, x64), std::invalid_argument);
  Tensor y16 = Tensor::zeros({4, 6}, DType::bf16);
  REQUIRE_THROWS_AS(ops::scale_(y16, 2.0), std::invalid_argument);

  const Tensor x = Tensor::zeros({4, 6}, DType::f32);
  Tensor out = Tensor::zeros({4, 3}, DType::f32);
  REQUIRE_NOTHROW(ops::copy_columns(x, 3, out));
  REQUIRE_THROWS_AS(ops::copy_columns(x, 4, out), std::invalid_argument);  // columns 4..7 of 6
  REQUIRE_THROWS_AS(ops::copy_columns(x, -1, out), std::invalid_argument);
  Tensor out_rows = Tensor::zeros({5, 3}, DType::f32);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 0, out_rows), std::invalid_argument);
  Tensor out_flat = Tensor::zeros({12}, DType::f32);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 0, out_flat), std::invalid_argument);
  Tensor out64 = Tensor::zeros({4, 3}, DType::f64);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 0, out64), std::invalid_argument);
  Tensor dst = Tensor::zeros({4, 6}, DType::f32);
  REQUIRE_THROWS_AS(ops::set_columns(dst, 4, out), std::invalid_argument);
  Tensor dst16 = Tensor::zeros({4, 6}, DType::bf16);
  const Tensor src16 = Tensor::zeros({4, 3}, DType::bf16);
  REQUIRE_NOTHROW(ops::set_columns(dst16, 0, src16));
  REQUIRE_THROWS_AS(ops::set_columns(dst16, 0, src16, /*accumulate=*/true), std::invalid_argument);
}
