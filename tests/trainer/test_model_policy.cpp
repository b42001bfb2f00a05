// The model's policy API (Model::policy_forward / policy_backward / policy_logprobs): per-token
// log-probabilities equal the negated per-token cross entropy of the main head, and the backward
// of an arbitrary per-token weighting matches central finite differences in f64.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "tests/trainer/test_model_fixtures.h"
#include "trainer/model/model.h"

using namespace dsx;

namespace {

std::vector<std::vector<double>> routing_of(const Model& m) {
  std::vector<std::vector<double>> out;
  // MTP blocks do not run in a policy forward: their routing stays undefined.
  for (const Tensor& ids : m.routing())
    if (ids.defined()) out.push_back(ids.to_vector());
  return out;
}

std::vector<double> random_weights(int64_t n, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> dist(-1.0, 1.0);
  std::vector<double> w(static_cast<size_t>(n));
  for (double& x : w) x = dist(gen);
  return w;
}

// J(θ) = Σ_t w_t · logp_t(θ) + balance_scale · balance(θ).
double objective(Model& model, const Batch& batch, const std::vector<double>& w, double balance_scale) {
  const Model::PolicyOutput out = model.policy_logprobs(batch);
  const auto logp = out.logp.to_vector();
  double j = balance_scale * out.balance;
  for (size_t t = 0; t < logp.size(); ++t) j += w[t] * logp[t];
  return j;
}

void check_policy_gradients(const ModelConfig& config, uint64_t seed, double balance_scale) {
  Model model(config, DType::f64, seed);
  const Batch batch = test::make_batch(config, 2, 8, seed + 1, /*segments=*/false);
  const std::vector<double> w = random_weights(batch.inputs.numel(), seed + 2);

  model.parameters().zero_grad();
  model.policy_forward(batch);
  const auto routing = routing_of(model);
  model.policy_backward(Tensor::from<double>(std::span<const double>(w), batch.inputs.shape()), balance_scale);

  // Central differences, h = 1e-6 in f64: error ~1e-9 (see test_model_gradcheck.cpp), measured
  // relative to each tensor's gradient scale floored at 1e-3; a wrong gradient is off by O(1).
  constexpr double h = 1e-6;
  std::mt19937_64 gen(seed + 3);
  int64_t checked = 0, skipped = 0, mtp_params = 0;
  for (Parameter& p : model.parameters()) {
    if (!p.spec.trainable) continue;
    const std::vector<double> analytic = p.grad.to_vector();
    double scale = 0;
    for (double g : analytic) scale = std::max(scale, std::abs(g));
    if (p.spec.mtp) {  // the MTP modules take no part in the policy
      ++mtp_params;
      CHECK(scale == 0.0);
      continue;
    }
    std::vector<int64_t> indices(analytic.size());
    for (size_t i = 0; i < indices.size(); ++i) indices[i] = static_cast<int64_t>(i);
    std::shuffle(indices.begin(), indices.end(), gen);
    indices.resize(std::min<size_t>(indices.size(), 6));
    double* value = p.value.data<double>();
    double worst = 0;
    for (int64_t i : indices) {
      const double saved = value[i];
      value[i] = saved + h;
      const double up = objective(model, batch, w, balance_scale);
      const bool same_up = routing_of(model) == routing;
      value[i] = saved - h;
      const double down = objective(model, batch, w, balance_scale);
      const bool same_down = routing_of(model) == routing;
      value[i] = saved;
      if (!same_up || !same_down) {
        ++skipped;
        continue;
      }
      worst = std::max(worst, std::abs((up - down) / (2 * h) - analytic[static_cast<size_t>(i)]));
      ++checked;
    }
    INFO(p.spec.name << ": max error " << worst << ", gradient scale " << scale);
    CHECK(worst / std::max(scale, 1e-3) < 1e-5);
  }
  CHECK(checked > 50);
  CHECK(skipped <= 2);
  CHECK((mtp_params > 0) == (config.num_nextn_predict_layers > 0));
}

}  // namespace

TEST_CASE("policy_forward: log-probs are the negated per-token cross entropy of the main head", "[model][policy]") {
  ModelConfig config = test::tiny_config();
  config.num_nextn_predict_layers = 0;  // so that Model::forward's balance loss is the main layers' alone
  Model model(config, DType::f64, 7);
  const Batch batch = test::make_batch(config, 2, 8, 8, /*segments=*/false);
  const Losses losses = model.forward(batch);
  const Model::PolicyOutput out = model.policy_logprobs(batch);
  const auto logp = out.logp.to_vector();
  const auto entropy = out.entropy.to_vector();
  const auto targets = batch.targets.to_vector();
  double sum = 0;
  for (size_t t = 0; t < logp.size(); ++t) {
    if (targets[t] == -100) {
      CHECK(logp[t] == 0.0);
      CHECK(entropy[t] == 0.0);
      continue;
    }
    CHECK(logp[t] < 0.0);
    // 0 < H ≤ log V for every distribution over V tokens.
    CHECK(entropy[t] > 0.0);
    CHECK(entropy[t] <= std::log(static_cast<double>(config.vocab_size)) + 1e-12);
    sum += logp[t];
  }
  CHECK(out.tokens == losses.tokens);
  // The same f64 cross entropies summed in another order.
  CHECK(-sum / static_cast<double>(out.tokens) == Approx(losses.lm).epsilon(1e-12));
  CHECK(out.balance == Approx(losses.balance).epsilon(1e-12));
}

TEST_CASE("policy_backward matches finite differences (query compression, sigmoid router, MTP 1)", "[model][policy]") {
  check_policy_gradients(test::tiny_config(), 31, 0.0);
}

TEST_CASE("policy_backward matches finite differences with the balance loss (direct query, tied head)",
          "[model][policy]") {
  check_policy_gradients(test::tiny_config_direct_q(), 47, 0.5);
}

TEST_CASE("policy_backward: uniform weights −1/count give Model::backward's LM gradient", "[model][policy]") {
  ModelConfig config = test::tiny_config();
  config.num_nextn_predict_layers = 0;  // Model::backward's loss is then lm + balance
  config.seq_aux_loss_alpha = 0;
  Model model(config, DType::f64, 3);
  const Batch batch = test::make_batch(config, 2, 8, 4, /*segments=*/false);
  model.parameters().zero_grad();
  const Losses losses = model.forward(batch);
  model.backward(1.0);
  std::vector<std::vector<double>> reference;
  for (Parameter& p : model.parameters())
    if (p.spec.trainable) reference.push_back(p.grad.to_vector());

  model.parameters().zero_grad();
  model.policy_forward(batch);
  const Tensor grad = Tensor::full(batch.inputs.shape(), -1.0 / static_cast<double>(losses.tokens), DType::f64);
  model.policy_backward(grad);
  size_t k = 0;
  for (Parameter& p : model.parameters()) {
    if (!p.spec.trainable) continue;
    const auto g = p.grad.to_vector();
    double diff = 0, scale = 1e-30;
    for (size_t i = 0; i < g.size(); ++i) {
      diff = std::max(diff, std::abs(g[i] - reference[k][i]));
      scale = std::max(scale, std::abs(reference[k][i]));
    }
    INFO(p.spec.name);
    // Same operations; the head scale enters per row instead of once: a few ulp.
    CHECK(diff <= 1e-12 * scale);
    ++k;
  }
}

TEST_CASE("policy_backward without a policy_forward is a logic error", "[model][policy]") {
  Model model(test::tiny_config(), DType::f64, 1);
  CHECK_THROWS_AS(model.policy_backward(Tensor::zeros({1, 1}, DType::f64)), std::logic_error);
}
