// SwiGLU: out = silu(gate) · up and its gradients.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops/swiglu.h"
#include "support/gradcheck.h"

using namespace dsx;
using dsx::test::finite_difference;
using dsx::test::max_rel_error;
using dsx::test::random_tensor;

namespace {

// Gradients against central differences in f64 (see support/gradcheck.h for the error budget).
constexpr double kGradTolerance = 1e-6;
// f32 against f64, per element relative to the tensor's scale: expf (≤ 1 ulp in glibc) plus
// four roundings give ~5e-7; 5e-6 leaves a 10x margin while a wrong derivative term is O(1) off.
constexpr double kF32Tolerance = 5e-6;

Tensor reference_swiglu(const Tensor& gate, const Tensor& up) {
  const auto g = gate.to_vector(), u = up.to_vector();
  std::vector<double> out(g.size());
  for (size_t i = 0; i < g.size(); ++i) out[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
  return Tensor::from<double>(out, gate.shape());
}

}  // namespace

TEST_CASE("swiglu: f32 forward matches a float64 reference, saturated gates included", "[swiglu]") {
  Tensor gate = random_tensor({7, 300}, DType::f64, 1, -8.0, 8.0);
  double* g = gate.data<double>();
  g[0] = 40.0;    // sigmoid rounds to 1: silu(g) = g
  g[1] = -100.0;  // e^100 overflows f32 to inf: sigmoid must come out 0, not NaN
  g[2] = 0.0;
  const Tensor gate32 = gate.to(DType::f32);
  const Tensor up32 = random_tensor({7, 300}, DType::f32, 2, -2.0, 2.0);
  Tensor out = Tensor::full({7, 300}, std::numeric_limits<double>::quiet_NaN(), DType::f32);
  ops::swiglu_forward(gate32, up32, out);
  REQUIRE(max_rel_error(out, reference_swiglu(gate32, up32)) < kF32Tolerance);
  for (double v : out.to_vector()) REQUIRE(std::isfinite(v));
}

TEST_CASE("swiglu: gradients match central finite differences in f64", "[swiglu]") {
  Tensor gate = random_tensor({3, 11}, DType::f64, 10, -5.0, 5.0);
  Tensor up = random_tensor({3, 11}, DType::f64, 11);
  const Tensor probe = random_tensor({3, 11}, DType::f64, 12);
  Tensor out = Tensor::zeros({3, 11}, DType::f64);
  const auto loss = [&] {
    ops::swiglu_forward(gate, up, out);
    return test::dot(out, probe);
  };
  Tensor dgate = Tensor::full({3, 11}, 5.0, DType::f64), dup = Tensor::full({3, 11}, 5.0, DType::f64);
  ops::swiglu_backward(gate, up, probe, dgate, dup);
  REQUIRE(max_rel_error(dgate, finite_difference(gate, loss)) < kGradTolerance);
  REQUIRE(max_rel_error(dup, finite_difference(up, loss)) < kGradTolerance);
}

TEST_CASE("swiglu: f32 gradients agree with the f64 ones", "[swiglu]") {
  // Large enough (> 2^14 elements) that the OpenMP path runs.
  const Tensor gate = random_tensor({40, 512}, DType::f64, 20, -6.0, 6.0);
  const Tensor up = random_tensor({40, 512}, DType::f64, 21);
  const Tensor dout = random_tensor({40, 512}, DType::f64, 22);
  Tensor dg64 = Tensor::zeros({40, 512}, DType::f64), du64 = Tensor::zeros({40, 512}, DType::f64);
  ops::swiglu_backward(gate, up, dout, dg64, du64);
  Tensor dg32 = Tensor::zeros({40, 512}, DType::f32), du32 = Tensor::zeros({40, 512}, DType::f32);
  ops::swiglu_backward(gate.to(DType::f32), up.to(DType::f32), dout.to(DType::f32), dg32, du32);
  REQUIRE(max_rel_error(dg32, dg64) < kF32Tolerance);
  REQUIRE(max_rel_error(du32, du64) < kF32Tolerance);
}

TEST_CASE("swiglu: mismatched shapes and dtypes throw", "[swiglu]") {
  const Tensor gate = random_tensor({4, 6}, DType::f32, 30);
  const Tensor up = random_tensor({4, 6}, DType::f32, 31);
  Tensor out = Tensor::zeros({4, 6}, DType::f32);
  REQUIRE_NOTHROW(ops::swiglu_forward(gate, up, out));
  const Tensor up_wrong = random_tensor({4, 5}, DType::f32, 32);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate, up_wrong, out), std::invalid_argument);
  const Tensor up64 = up.to(DType::f64);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate, up64, out), std::invalid_argument);
  Tensor out_wrong = Tensor::zeros({6, 4}, DType::f32);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate, up, out_wrong), std::invalid_argument);
  Tensor dgate = Tensor::zeros({4, 6}, DType::f32), dup_wrong = Tensor::zeros({4, 7}, DType::f32);
  REQUIRE_THROWS_AS(ops::swiglu_backward(gate, up, out, dgate, dup_wrong), std::invalid_argument);
  const Tensor gate16 = gate.to(DType::bf16), up16 = up.to(DType::bf16);
  Tensor out16 = Tensor::zeros({4, 6}, DType::bf16);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate16, up16, out16), std::invalid_argument);
}
