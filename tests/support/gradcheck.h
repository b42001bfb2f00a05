// Helpers for op tests: random tensors, float64 comparisons and central finite differences.
//
// The usual gradient test: loss(θ) = <op(θ), probe> for a random probe, computed in f64;
// the analytic gradient is the op's backward with dy = probe; the numeric one is
// (loss(θ+h) - loss(θ-h)) / 2h per element. With h = 1e-6 in f64 the truncation error is
// O(h²)·|f'''| ≈ 1e-12 and the rounding error ≈ 1e-16·|loss|/h ≈ 1e-10·|loss|, so a relative
// tolerance of 1e-6 leaves four orders of margin while a wrong gradient is off by O(1).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <random>

#include "kernels/tensor.h"

namespace dsx::test {

inline Tensor random_tensor(const Shape& shape, DType dtype, uint64_t seed, double lo = -1.0, double hi = 1.0) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(lo, hi);
  std::vector<double> v(static_cast<size_t>(shape_numel(shape)));
  for (double& x : v) x = dist(gen);
  return Tensor::from<double>(v, shape).to(dtype);
}

inline double dot(const Tensor& a, const Tensor& b) {
  const auto x = a.to_vector();
  const auto y = b.to_vector();
  double s = 0;
  for (size_t i = 0; i < x.size() && i < y.size(); ++i) s += x[i] * y[i];
  return s;
}

inline double max_abs_diff(const Tensor& a, const Tensor& b) {
  const auto x = a.to_vector();
  const auto y = b.to_vector();
  double m = 0;
  for (size_t i = 0; i < x.size(); ++i) m = std::max(m, std::abs(x[i] - y[i]));
  return m;
}

// max_i |a_i - b_i| / max(|b|_inf, floor): error relative to the reference's scale, which
// stays meaningful when individual reference entries are near zero.
inline double max_rel_error(const Tensor& actual, const Tensor& expected, double floor = 1e-30) {
  const auto y = expected.to_vector();
  double scale = floor;
  for (double v : y) scale = std::max(scale, std::abs(v));
  return max_abs_diff(actual, expected) / scale;
}

// Central differences of loss() with respect to every element of t (an f64 CPU tensor that
// loss() reads); t is restored afterwards.
inline Tensor finite_difference(Tensor& t, const std::function<double()>& loss, double h = 1e-6) {
  Tensor grad = Tensor::zeros(t.shape(), DType::f64);
  double* p = t.data<double>();
  double* g = grad.data<double>();
  for (int64_t i = 0; i < t.numel(); ++i) {
    const double saved = p[i];
    p[i] = saved + h;
    const double up = loss();
    p[i] = saved - h;
    const double down = loss();
    p[i] = saved;
    g[i] = (up - down) / (2 * h);
  }
  return grad;
}

}  // namespace dsx::test
