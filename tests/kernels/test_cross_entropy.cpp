// Softmax cross-entropy: forward against a float64 reference (including a DeepSeek-V3-sized
// vocabulary row), ignore_index, extreme logits, and the backward against finite differences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "kernels/ops/cross_entropy.h"
#include "support/gradcheck.h"

using namespace dsx;

namespace {

constexpr int64_t kIgnore = -100;  // PyTorch's default ignore_index

struct Reference {
  double loss_sum = 0;
  int64_t count = 0;
  std::vector<double> lse;
};

// -log softmax(x)[t] = log Σ_j exp(x_j) − x_t, with the max shift, in double.
Reference reference_cross_entropy(const Tensor& logits, const std::vector<int64_t>& targets) {
  const auto x = logits.to_vector();
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  Reference r;
  for (int64_t n = 0; n < rows; ++n) {
    const double* row = x.data() + n * vocab;
    const double m = *std::max_element(row, row + vocab);
    double sum = 0;
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(row[j] - m);
    r.lse.push_back(m + std::log(sum));
    if (targets[static_cast<size_t>(n)] == kIgnore) continue;
    r.loss_sum += r.lse.back() - row[targets[static_cast<size_t>(n)]];
    ++r.count;
  }
  return r;
}

Tensor targets_tensor(const std::vector<int64_t>& targets) {
  return Tensor::from<int64_t>(std::span<const int64_t>(targets), {static_cast<int64_t>(targets.size())});
}

struct Forward {
  ops::CrossEntropyResult result;
  Tensor lse;
};

Forward forward(const Tensor& logits, const std::vector<int64_t>& targets, DType lse_dtype) {
  Forward f{{}, Tensor::empty({logits.dim(0)}, lse_dtype)};
  f.result = ops::cross_entropy_forward(logits, targets_tensor(targets), kIgnore, f.lse);
  return f;
}

Forward forward(const Tensor& logits, const std::vector<int64_t>& targets) {
  return forward(logits, targets, logits.dtype());
}

Tensor backward(const Tensor& logits, const std::vector<int64_t>& targets, double scale, DType lse_dtype) {
  const Forward f = forward(logits, targets, lse_dtype);
  Tensor d = Tensor::empty(logits.shape(), logits.dtype());
  d.fill(12345.0);  // the op must overwrite every entry, ignored rows included
  ops::cross_entropy_backward(logits, targets_tensor(targets), f.lse, kIgnore, scale, d);
  return d;
}

Tensor backward(const Tensor& logits, const std::vector<int64_t>& targets, double scale) {
  return backward(logits, targets, scale, logits.dtype());
}

}  // namespace

TEST_CASE("cross_entropy: f32 forward matches a float64 reference", "[cross_entropy]") {
  // Logits are rounded to f32 first, so only the op's arithmetic is measured: f32 exp (1 ulp)
  // summed in double, the shift and log in double. Per row that is ~1e-7 relative of lse (~7),
  // so 1e-6 relative on the sum and 1e-5 absolute on each lse (f32 spacing at 8 is 1e-6).
  const std::vector<int64_t> targets{3, kIgnore, 999, 0, 512, kIgnore, 77};
  const Tensor logits32 = test::random_tensor({7, 1000}, DType::f32, 9, -5, 5);
  const Reference expected = reference_cross_entropy(logits32.to(DType::f64), targets);
  const Forward got = forward(logits32, targets);
  CHECK(got.result.count == 5);
  CHECK(got.result.count == expected.count);
  CHECK(got.result.loss_sum == Approx(expected.loss_sum).epsilon(1e-6));
  const Tensor expected_lse = Tensor::from<double>(expected.lse, {7});
  CHECK(test::max_abs_diff(got.lse, expected_lse) < 1e-5);
}

TEST_CASE("cross_entropy: a DeepSeek-V3-sized vocabulary row stays accurate in f32", "[cross_entropy]") {
  // 129280 logits per row, 4 rows: the parallel path. A f32 running sum would lose ~1e-3
  // relative here; the double sum keeps the loss within 1e-6 relative of the reference.
  const int64_t vocab = 129280;
  const std::vector<int64_t> targets{0, vocab - 1, 4242, kIgnore};
  const Tensor logits32 = test::random_tensor({4, vocab}, DType::f32, 17, -8, 8);
  const Reference expected = reference_cross_entropy(logits32.to(DType::f64), targets);
  const Forward got = forward(logits32, targets);
  CHECK(got.result.count == 3);
  CHECK(got.result.loss_sum == Approx(expected.loss_sum).epsilon(1e-6));
  CHECK(test::max_abs_diff(got.lse, Tensor::from<double>(expected.lse, {4})) < 1e-5);
}

TEST_CASE("cross_entropy: ignored rows give zero gradient and are not counted", "[cross_entropy]") {
  const std::vector<int64_t> targets{kIgnore, 2, kIgnore, 5};
  const Tensor logits = test::random_tensor({4, 6}, DType::f64, 3, -2, 2);
  const Forward all = forward(logits, targets);
  CHECK(all.result.count == 2);
  // The same loss as the counted rows alone.
  const Tensor kept = Tensor::from<double>(
      [&] {
        auto x = logits.to_vector();
        std::vector<double> rows(x.begin() + 6, x.begin() + 12);
        rows.insert(rows.end(), x.begin() + 18, x.end());
        return rows;
      }(),
      {2, 6});
  const Forward counted = forward(kept, {2, 5});
  CHECK(all.result.loss_sum == Approx(counted.result.loss_sum).epsilon(1e-15));
  const auto d = backward(logits, targets, 0.5).to_vector();
  for (int64_t j = 0; j < 6; ++j) {
    CHECK(d[static_cast<size_t>(j)] == 0.0);
    CHECK(d[static_cast<size_t>(12 + j)] == 0.0);
  }
  // Every row ignored: nothing counted, zero loss, zero gradient.
  const Forward none = forward(logits, {kIgnore, kIgnore, kIgnore, kIgnore});
  CHECK(none.result.count == 0);
  CHECK(none.result.loss_sum == 0.0);
  for (double g : backward(logits, {kIgnore, kIgnore, kIgnore, kIgnore}, 1.0).to_vector()) CHECK(g == 0.0);
}

TEST_CASE("cross_entropy: huge logits stay finite", "[cross_entropy]") {
  // Logits spread over [-1e4, 1e4]: exp without the max shift overflows f32 and f64.
  const int64_t vocab = 50;
  std::vector<double> values(static_cast<size_t>(vocab));
  for (int64_t j = 0; j < vocab; ++j)
    values[static_cast<size_t>(j)] = -1e4 + 2e4 * static_cast<double>(j) / (vocab - 1);
  values[17] = 1e4 - 0.5;  // a near-tie with the largest logit
  const Tensor logits = Tensor::from<double>(values, {1, vocab}).to(DType::f32);
  for (int64_t target : {int64_t{17}, int64_t{0}}) {
    const Forward f = forward(logits, {target});
    const Reference r = reference_cross_entropy(logits.to(DType::f64), {target});
    REQUIRE(std::isfinite(f.result.loss_sum));
    // lse ~1e4: f32 spacing there is 1e-3, so the saved lse is exact to 1e-3; the loss (double)
    // is only limited by exp's ulp: 1e-6 absolute for the ~0.5 loss, ~1e-7 relative for 2e4.
    CHECK(f.result.loss_sum == Approx(r.loss_sum).epsilon(1e-6).margin(1e-6));
    CHECK(std::abs(f.lse.to_vector()[0] - r.lse[0]) < 1e-3);
    // Softmax sums to 1, minus the one-hot: row sums are 0. With the lse saved in f64 the f32
    // probabilities are exact to f32 rounding (1e-6 covers 50 terms); an f32 lse of ~1e4 is off
    // by up to 5e-4 (half its spacing), which shifts every probability by that relative amount.
    for (auto [lse_dtype, tolerance] : {std::pair{DType::f64, 1e-6}, std::pair{DType::f32, 1e-3}}) {
      const auto d = backward(logits, {target}, 1.0, lse_dtype).to_vector();
      double row_sum = 0;
      for (double g : d) {
        REQUIRE(std::isfinite(g));
        row_sum += g;
      }
      CHECK(std::abs(row_sum) < tolerance);
    }
  }
}

TEST_CASE("cross_entropy: backward of the mean loss matches finite differences (f64)", "[cross_entropy]") {
  // Mean loss = loss_sum / count; its gradient is backward(scale = 1/count). Tolerance from
  // gradcheck.h. A backward that ignored scale would be off by a factor 3 here.
  const std::vector<int64_t> targets{4, kIgnore, 0, 12, kIgnore};
  Tensor logits = test::random_tensor({5, 13}, DType::f64, 41, -3, 3);
  const double count = static_cast<double>(forward(logits, targets).result.count);
  REQUIRE(count == 3.0);
  const Tensor analytic = backward(logits, targets, 1.0 / count);
  const Tensor numeric = test::finite_difference(logits, [&] {
    const auto r = forward(logits, targets).result;
    return r.loss_sum / static_cast<double>(r.count);
  });
  CHECK(test::max_rel_error(analytic, numeric) < 1e-6);

  // Any upstream gradient scales linearly (the f32 path too, within f32 rounding).
  const Tensor doubled = backward(logits, targets, 2.0 / count);
  CHECK(test::max_abs_diff(doubled, Tensor::from<double>(
                                        [&] {
                                          auto v = analytic.to_vector();
                                          for (double& x : v) x *= 2;
                                          return v;
                                        }(),
                                        {5, 13})) < 1e-15);
  const Tensor analytic32 = backward(logits.to(DType::f32), targets, 1.0 / count);
  CHECK(test::max_rel_error(analytic32, analytic) < 1e-6);
}

TEST_CASE("cross_entropy: rejects bad targets and shapes", "[cross_entropy]") {
  const Tensor logits = test::random_tensor({2, 5}, DType::f32, 1);
  Tensor lse = Tensor::empty({2}, DType::f32);
  CHECK_THROWS_AS(ops::cross_entropy_forward(logits, targets_tensor({0, 5}), kIgnore, lse), std::invalid_argument);
  CHECK_THROWS_AS(ops::cross_entropy_forward(logits, targets_tensor({-1, 0}), kIgnore, lse), std::invalid_argument);
  CHECK_THROWS_AS(ops::cross_entropy_forward(logits, targets_tensor({0}), kIgnore, lse), std::invalid_argument);
  Tensor lse_bf16 = Tensor::empty({2}, DType::bf16), lse_short = Tensor::empty({1}, DType::f32);
  CHECK_THROWS_AS(ops::cross_entropy_forward(logits, targets_tensor({0, 1}), kIgnore, lse_bf16), std::invalid_argument);
  CHECK_THROWS_AS(ops::cross_entropy_forward(logits, targets_tensor({0, 1}), kIgnore, lse_short),
                  std::invalid_argument);
  CHECK_NOTHROW(ops::cross_entropy_forward(logits, Tensor::from<int32_t>({4, -100}, {2}), kIgnore, lse));
  Tensor small = Tensor::empty({2, 4}, DType::f32);
  CHECK_THROWS_AS(ops::cross_entropy_backward(logits, targets_tensor({0, 1}), lse, kIgnore, 1.0, small),
                  std::invalid_argument);
}
