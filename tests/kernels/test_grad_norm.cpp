#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops/grad_norm.h"
#include "kernels/threading.h"
#include "support/gradcheck.h"

using namespace dsx;

namespace {

// Σ x² in long double, from the tensor's exact values.
long double reference_sum_of_squares(const Tensor& t) {
  long double s = 0;
  for (double x : t.to_vector()) s += static_cast<long double>(x) * x;
  return s;
}

std::vector<Tensor> random_grads(uint64_t seed, double scale) {
  // Mixed sizes (one above the op's block and parallel thresholds, one not a multiple of anything)
  // and dtypes, as a model's gradients may be.
  return {test::random_tensor({100003}, DType::f32, seed, -scale, scale),
          test::random_tensor({37, 5}, DType::f64, seed + 1, -scale, scale),
          test::random_tensor({1000}, DType::bf16, seed + 2, -scale, scale)};
}

std::vector<std::vector<double>> values(const std::vector<Tensor>& ts) {
  std::vector<std::vector<double>> out;
  for (const Tensor& t : ts) out.push_back(t.to_vector());
  return out;
}

}  // namespace

TEST_CASE("grad_norm: sum of squares matches a long double reference", "[grad_norm]") {
  for (DType dtype : {DType::f64, DType::f32, DType::bf16}) {
    INFO("dtype " << dtype_name(dtype));
    const Tensor t = test::random_tensor({100003}, dtype, 1, -3.0, 3.0);
    // Squares of f32/bf16 values are exact in double; 1e5 double additions of positive terms lose at
    // most ~1e5 · 1.1e-16 relative, so 1e-11 is a bound with margin, far below any real error.
    REQUIRE(ops::sum_of_squares(t) == Approx(static_cast<double>(reference_sum_of_squares(t))).epsilon(1e-11));
  }
  REQUIRE(ops::sum_of_squares(Tensor::zeros({0}, DType::f32)) == 0.0);
  REQUIRE_THROWS_AS(ops::sum_of_squares(Tensor::zeros({4}, DType::i32)), std::invalid_argument);
}

TEST_CASE("grad_norm: results do not depend on the thread count", "[grad_norm]") {
  const Tensor t = test::random_tensor({300001}, DType::f32, 2);
  const int threads = cpu_threads();
  set_cpu_threads(1);
  const double one = ops::sum_of_squares(t);
  set_cpu_threads(2);
  const double two = ops::sum_of_squares(t);
  set_cpu_threads(threads);
  REQUIRE(one == two);  // bit-identical: fixed blocks, added in order
}

TEST_CASE("grad_norm: global norm over tensors of several dtypes", "[grad_norm]") {
  const std::vector<Tensor> grads = random_grads(3, 1.0);
  long double total = 0;
  for (const Tensor& g : grads) total += reference_sum_of_squares(g);
  REQUIRE(ops::global_norm(grads) == Approx(std::sqrt(static_cast<double>(total))).epsilon(1e-11));
  REQUIRE(ops::global_norm({}) == 0.0);
}

TEST_CASE("grad_norm: clipping scales every gradient to max_norm", "[grad_norm]") {
  std::vector<Tensor> grads = random_grads(4, 1.0);
  const auto before = values(grads);
  const double norm = ops::global_norm(grads);
  const double max_norm = 1.0;
  REQUIRE(norm > 10 * max_norm);
  REQUIRE(ops::clip_grad_norm(grads, max_norm) == norm);  // returns the norm before clipping
  const double scale = max_norm / (norm + 1e-6);
  const auto after = values(grads);
  for (size_t i = 0; i < grads.size(); ++i) {
    // Each element is scaled once in its dtype: half an ulp of the result, 2^-8 relative for bf16.
    const double tol = grads[i].dtype() == DType::bf16 ? 0x1p-8 : grads[i].dtype() == DType::f32 ? 0x1p-23 : 1e-15;
    for (size_t j = 0; j < after[i].size(); ++j) {
      REQUIRE(std::abs(after[i][j] - before[i][j] * scale) <= tol * std::abs(before[i][j] * scale));
    }
  }
  // The new norm is max_norm · norm / (norm + 1e-6), up to the rounding of the scaled elements.
  REQUIRE(ops::global_norm(grads) == Approx(max_norm).epsilon(1e-5));
}

TEST_CASE("grad_norm: no clipping at or below the threshold, or when disabled", "[grad_norm]") {
  std::vector<Tensor> grads = random_grads(5, 1e-3);
  const auto before = values(grads);
  const double norm = ops::global_norm(grads);
  REQUIRE(ops::clip_grad_norm(grads, 2 * norm) == norm);
  REQUIRE(ops::clip_grad_norm(grads, norm) == norm);
  REQUIRE(values(grads) == before);  // bit-identical
  std::vector<Tensor> large = random_grads(6, 10.0);
  const auto large_before = values(large);
  REQUIRE(ops::clip_grad_norm(large, 0.0) > 1.0);
  REQUIRE(ops::clip_grad_norm(large, -1.0) > 1.0);
  REQUIRE(values(large) == large_before);
}

TEST_CASE("grad_norm: a non-finite norm leaves the gradients untouched", "[grad_norm]") {
  for (double bad : {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    std::vector<Tensor> grads = random_grads(7, 10.0);
    grads[1].data<double>()[3] = bad;
    const auto before = values(grads);
    const double norm = ops::clip_grad_norm(grads, 1.0);
    REQUIRE_FALSE(std::isfinite(norm));
    const auto after = values(grads);
    for (size_t i = 0; i < after.size(); ++i) {
      for (size_t j = 0; j < after[i].size(); ++j) {
        REQUIRE((after[i][j] == before[i][j] || (std::isnan(after[i][j]) && std::isnan(before[i][j]))));
      }
    }
  }
}
