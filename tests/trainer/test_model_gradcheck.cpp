// Whole-model gradient check: every trainable parameter tensor's analytic gradient (forward +
// backward in f64) against central finite differences of the total loss.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "tests/trainer/test_model_fixtures.h"
#include "trainer/model/model.h"

using namespace dsx;

namespace {

std::vector<std::vector<double>> routing_of(const Model& m) {
  std::vector<std::vector<double>> out;
  for (const Tensor& ids : m.routing()) out.push_back(ids.to_vector());
  return out;
}

struct TensorCheck {
  std::string name;
  double rel_error = 0;  // max |fd - analytic| over the checked elements / max(max |analytic|, 1e-3)
  double scale = 0;      // max |analytic|
  int64_t checked = 0;
};

struct GradCheck {
  std::vector<TensorCheck> tensors;
  int64_t skipped = 0;  // elements whose perturbation changed the routing
};

// Central differences with h = 1e-6 in f64: truncation error O(h^2 f''') ~ 1e-12, rounding error
// ~ 1e-16·|loss| / h ~ 1e-9 (loss ~ 5). The error is measured relative to the tensor's gradient
// scale max|analytic| floored at 1e-3: some experts see a token or two and have gradients of
// ~1e-5, where the 1e-9 noise alone would be a 1e-4 relative error. A correct backward stays
// below ~1e-6; the test allows 1e-5 (an absolute 1e-8 on the smallest tensors), while a wrong
// gradient (a dropped term, a transposed weight, a missing residual) is off by O(scale).
GradCheck run_gradient_check(Model& model, const Batch& batch, int64_t max_samples, uint64_t seed) {
  constexpr double h = 1e-6;
  model.parameters().zero_grad();
  model.forward(batch);
  const auto routing = routing_of(model);
  model.backward(1.0);

  GradCheck result;
  std::mt19937_64 gen(seed);
  for (Parameter& p : model.parameters()) {
    // The router's e_score_correction_bias only selects experts: piecewise constant, no gradient.
    if (!p.spec.trainable) continue;
    const std::vector<double> analytic = p.grad.to_vector();
    TensorCheck check{p.spec.name};
    for (double g : analytic) check.scale = std::max(check.scale, std::abs(g));
    std::vector<int64_t> indices(analytic.size());
    for (size_t i = 0; i < indices.size(); ++i) indices[i] = static_cast<int64_t>(i);
    if (static_cast<int64_t>(indices.size()) > max_samples) {
      std::shuffle(indices.begin(), indices.end(), gen);
      indices.resize(static_cast<size_t>(max_samples));
    }
    double* value = p.value.data<double>();
    double max_abs_error = 0;
    for (int64_t i : indices) {
      const double saved = value[i];
      value[i] = saved + h;
      const double up = model.forward(batch).total;
      const bool same_up = routing_of(model) == routing;
      value[i] = saved - h;
      const double down = model.forward(batch).total;
      const bool same_down = routing_of(model) == routing;
      value[i] = saved;
      if (!same_up || !same_down) {
        ++result.skipped;
        continue;
      }
      max_abs_error = std::max(max_abs_error, std::abs((up - down) / (2 * h) - analytic[static_cast<size_t>(i)]));
      ++check.checked;
    }
    check.rel_error = max_abs_error / std::max(check.scale, 1e-3);
    result.tensors.push_back(check);
  }
  return result;
}

void check_gradients(const ModelConfig& config, uint64_t seed) {
  Model model(config, DType::f64, seed);
  const Batch batch = test::make_batch(config, 2, 8, seed + 1);
  const GradCheck result = run_gradient_check(model, batch, /*max_samples=*/10, seed + 2);

  double worst = 0;
  std::string worst_name;
  int64_t zero_gradient_experts = 0, experts = 0;
  for (const TensorCheck& t : result.tensors) {
    INFO(t.name << ": relative error " << t.rel_error << ", gradient scale " << t.scale << ", " << t.checked
                << " elements");
    const bool routed_expert = t.name.find(".experts.") != std::string::npos;
    experts += routed_expert;
    if (routed_expert && t.scale == 0) {  // an expert no token chose: its gradient is exactly 0
      ++zero_gradient_experts;
      continue;
    }
    CHECK(t.scale > 1e-7);  // every parameter takes part in the loss
    CHECK(t.checked > 0);
    CHECK(t.rel_error < 1e-5);
    if (t.rel_error > worst) {
      worst = t.rel_error;
      worst_name = t.name;
    }
  }
  std::printf("gradient check: %zu tensors, worst relative error %.3g (%s), %lld routing flips skipped\n",
              result.tensors.size(), worst, worst_name.c_str(), static_cast<long long>(result.skipped));
  CHECK(zero_gradient_experts * 4 <= experts);  // most experts are exercised
  CHECK(result.skipped <= 2);                   // h = 1e-6 almost never flips a top-k choice
}

}  // namespace

TEST_CASE("model gradients match finite differences with query compression + sigmoid router + MTP 1", "[model]") {
  check_gradients(test::tiny_config(), 11);
}

TEST_CASE("model gradients match finite differences with direct query + softmax router + tied head + MTP 2",
          "[model]") {
  check_gradients(test::tiny_config_direct_q(), 23);
}
