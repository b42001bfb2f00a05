#include "data/synthetic.h"

#include <cmath>
#include <random>
#include <stdexcept>
#include <string>

#include "kernels/error.h"
#include "kernels/random.h"

namespace dsx::data {
namespace {
uint64_t mix(uint64_t x) { return random::splitmix64(x); }  // (seed, index) streams independent
}  // namespace

SyntheticSource::SyntheticSource(const SyntheticConfig& config) : config_(config) {
  if (config.vocab_size < 2) throw UserError("data.synthetic: vocab_size must be at least 2");
  if (config.branching < 1 || config.branching > config.vocab_size) {
    throw UserError("data.synthetic: branching must be in [1, vocab_size], got " + std::to_string(config.branching));
  }
  if (!(config.decay > 0.0 && config.decay <= 1.0)) throw UserError("data.synthetic: decay must be in (0, 1]");
  if (config.seq_len < 1) throw UserError("data.synthetic: seq_len must be positive");
  if (config.order < 1 || config.order > config.seq_len) {
    throw UserError("data.synthetic: order must be in [1, seq_len], got " + std::to_string(config.order));
  }
  double total = 0;
  std::vector<double> p(static_cast<size_t>(config.branching));
  for (size_t k = 0; k < p.size(); ++k) total += (p[k] = std::pow(config.decay, static_cast<double>(k)));
  double acc = 0;
  for (double q : p) cumulative_.push_back(acc += q / total);
  cumulative_.back() = 1.0;
}

int32_t SyntheticSource::successor(const int32_t* context, size_t k) const {
  uint64_t h = mix(config_.seed + 0x243f6a8885a308d3ull);
  for (int64_t i = 0; i < config_.order; ++i) h = mix(h ^ static_cast<uint64_t>(context[i]));
  h = mix(h ^ (0x9e37ull + k));
  return static_cast<int32_t>(h % static_cast<uint64_t>(config_.vocab_size));
}

std::vector<int32_t> SyntheticSource::window(int64_t g) const {
  std::mt19937_64 gen(mix(config_.seed ^ mix(static_cast<uint64_t>(g) + 0x51ed2701ull)));
  std::uniform_real_distribution<double> u(0.0, 1.0);
  std::vector<int32_t> w(static_cast<size_t>(config_.seq_len + 1));
  const auto order = static_cast<size_t>(config_.order);
  for (size_t i = 0; i < order; ++i) w[i] = static_cast<int32_t>(gen() % static_cast<uint64_t>(config_.vocab_size));
  for (size_t i = order; i < w.size(); ++i) {
    const double r = u(gen);
    size_t k = 0;
    while (r > cumulative_[k]) ++k;
    w[i] = successor(&w[i - order], k);
  }
  return w;
}

TokenBatch SyntheticSource::batch(int64_t first, int64_t count) const {
  const int64_t s = config_.seq_len;
  TokenBatch b{Tensor::empty({count, s}, DType::i32), Tensor::empty({count, s}, DType::i32), Tensor()};
  int32_t* in = b.inputs.data<int32_t>();
  int32_t* tg = b.targets.data<int32_t>();
  for (int64_t r = 0; r < count; ++r) {
    const auto w = window(first + r);
    for (int64_t i = 0; i < s; ++i) {
      in[r * s + i] = w[static_cast<size_t>(i)];
      tg[r * s + i] = w[static_cast<size_t>(i + 1)];
    }
  }
  return b;
}

double SyntheticSource::entropy_floor() const {
  const auto b = static_cast<size_t>(config_.branching);
  if (config_.order > 1) {
    double h = 0;
    for (size_t k = 0; k < b; ++k) {
      const double pk = cumulative_[k] - (k ? cumulative_[k - 1] : 0.0);
      h -= pk * std::log(pk);
    }
    return h;
  }
  // Successor lists may repeat a token; merge those probabilities before taking the entropy,
  // averaged over tokens (the chain's stationary distribution is close to uniform here, and
  // a uniform average is what a start-from-uniform window sees early on).
  double h_sum = 0;
  for (int64_t t = 0; t < config_.vocab_size; ++t) {
    std::vector<std::pair<int32_t, double>> probs;
    for (size_t k = 0; k < b; ++k) {
      const double pk = cumulative_[k] - (k ? cumulative_[k - 1] : 0.0);
      const auto context = static_cast<int32_t>(t);
      const int32_t succ = successor(&context, k);
      bool merged = false;
      for (auto& [tok, p] : probs) {
        if (tok == succ) {
          p += pk;
          merged = true;
        }
      }
      if (!merged) probs.emplace_back(succ, pk);
    }
    for (const auto& pr : probs) h_sum -= pr.second * std::log(pr.second);
  }
  return h_sum / static_cast<double>(config_.vocab_size);
}

}  // namespace dsx::data
