#include "trainer/grpo/policy_update.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/error.h"

namespace dsx::grpo {
namespace {

constexpr int32_t kIgnore = static_cast<int32_t>(OutputHead::kIgnoreIndex);

// [begin, end) ranges of at most micro_batch rollouts (0 = one range).
std::vector<std::pair<size_t, size_t>> micro_batches(size_t n, int64_t micro_batch) {
  const size_t step = micro_batch > 0 ? static_cast<size_t>(micro_batch) : std::max<size_t>(n, 1);
  std::vector<std::pair<size_t, size_t>> out;
  for (size_t begin = 0; begin < n; begin += step) out.emplace_back(begin, std::min(n, begin + step));
  return out;
}

std::vector<double> flat_per_token(std::span<const Rollout> rollouts, const PolicyBatch& pb,
                                   std::vector<double> Rollout::*member, const char* what) {
  std::vector<double> out(rollouts.size() * static_cast<size_t>(pb.width), 0.0);
  for (size_t i = 0; i < rollouts.size(); ++i) {
    const std::vector<double>& values = rollouts[i].*member;
    if (values.size() != rollouts[i].completion.size()) {
      throw std::invalid_argument("policy_update: rollout " + std::to_string(i) + " has " +
                                  std::to_string(values.size()) + " " + what + " values for " +
                                  std::to_string(rollouts[i].completion.size()) + " completion tokens");
    }
    std::copy(values.begin(), values.end(), out.begin() + static_cast<std::ptrdiff_t>(i * pb.width));
  }
  return out;
}

}  // namespace

PolicyBatch pack_rollouts(std::span<const Rollout> rollouts, int32_t pad_id, int64_t min_seq_len) {
  PolicyBatch pb;
  int64_t seq_len = std::max<int64_t>(1, min_seq_len);
  for (size_t i = 0; i < rollouts.size(); ++i) {
    const Rollout& r = rollouts[i];
    if (r.prompt.empty()) throw UserError("GRPO: rollout " + std::to_string(i) + " has an empty prompt");
    const auto total = static_cast<int64_t>(r.prompt.size() + r.completion.size());
    seq_len = std::max(seq_len, total - 1);
    pb.width = std::max(pb.width, static_cast<int64_t>(r.completion.size()));
    pb.lengths.push_back(static_cast<int64_t>(r.completion.size()));
    pb.offsets.push_back(static_cast<int64_t>(r.prompt.size()) - 1);
  }
  const auto rows = static_cast<int64_t>(rollouts.size());
  std::vector<int32_t> inputs(static_cast<size_t>(rows * seq_len), pad_id);
  std::vector<int32_t> targets(inputs.size(), kIgnore);
  for (int64_t i = 0; i < rows; ++i) {
    const Rollout& r = rollouts[static_cast<size_t>(i)];
    std::vector<int32_t> tokens = r.prompt;
    tokens.insert(tokens.end(), r.completion.begin(), r.completion.end());
    int32_t* in = inputs.data() + i * seq_len;
    int32_t* tg = targets.data() + i * seq_len;
    for (size_t p = 0; p + 1 < tokens.size(); ++p) in[p] = tokens[p];
    for (int64_t j = 0; j < pb.lengths[static_cast<size_t>(i)]; ++j)
      tg[pb.offsets[static_cast<size_t>(i)] + j] = r.completion[static_cast<size_t>(j)];
  }
  pb.batch.inputs = Tensor::from<int32_t>(std::span<const int32_t>(inputs), {rows, seq_len});
  pb.batch.targets = Tensor::from<int32_t>(std::span<const int32_t>(targets), {rows, seq_len});
  return pb;
}

std::vector<double> gather_completion(const Tensor& per_position, const PolicyBatch& pb) {
  const int64_t rows = per_position.dim(0), seq_len = per_position.dim(1);
  const std::vector<double> values = per_position.to_vector();
  std::vector<double> out(static_cast<size_t>(rows * pb.width), 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < pb.lengths[static_cast<size_t>(i)]; ++j)
      out[static_cast<size_t>(i * pb.width + j)] =
          values[static_cast<size_t>(i * seq_len + pb.offsets[static_cast<size_t>(i)] + j)];
  return out;
}

Tensor scatter_completion(std::span<const double> values, const PolicyBatch& pb) {
  const int64_t rows = pb.batch.inputs.dim(0), seq_len = pb.batch.inputs.dim(1);
  Tensor out = Tensor::zeros({rows, seq_len}, DType::f64);
  double* o = out.data<double>();
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < pb.lengths[static_cast<size_t>(i)]; ++j)
      o[i * seq_len + pb.offsets[static_cast<size_t>(i)] + j] = values[static_cast<size_t>(i * pb.width + j)];
  return out;
}

std::vector<std::vector<double>> completion_logprobs(Model& model, std::span<const Rollout> rollouts,
                                                     int64_t micro_batch, int32_t pad_id) {
  std::vector<std::vector<double>> out;
  for (const auto& [begin, end] : micro_batches(rollouts.size(), micro_batch)) {
    const auto part = rollouts.subspan(begin, end - begin);
    const PolicyBatch pb = pack_rollouts(part, pad_id);
    const std::vector<double> logp = gather_completion(model.policy_logprobs(pb.batch).logp, pb);
    for (size_t i = 0; i < part.size(); ++i) {
      const auto first = logp.begin() + static_cast<std::ptrdiff_t>(i * pb.width);
      out.emplace_back(first, first + pb.lengths[i]);
    }
  }
  return out;
}

UpdateStats policy_update(Model& policy, Optimizer& optimizer, double lr, std::span<const Rollout> rollouts,
                          const UpdateConfig& config) {
  const bool with_reference = config.loss.beta > 0;
  int64_t own_tokens = 0;
  for (const Rollout& r : rollouts) own_tokens += static_cast<int64_t>(r.completion.size());
  // Normalisers of the whole batch: this call's rollouts, or the step's over every DP rank.
  const int64_t total_tokens = config.batch_tokens > 0 ? config.batch_tokens : own_tokens;
  const auto n_rollouts =
      static_cast<double>(config.batch_sequences > 0 ? config.batch_sequences : static_cast<int64_t>(rollouts.size()));

  policy.parameters().zero_grad();
  UpdateStats stats;
  stats.tokens = own_tokens;
  double entropy_sum = 0;
  for (const auto& [begin, end] : micro_batches(rollouts.size(), config.micro_batch)) {
    const auto part = rollouts.subspan(begin, end - begin);
    const PolicyBatch pb = pack_rollouts(part, config.pad_id, config.seq_len);
    const Model::PolicyOutput out = policy.policy_forward(pb.batch);
    const std::vector<double> logp = gather_completion(out.logp, pb);
    const std::vector<double> old_logp = flat_per_token(part, pb, &Rollout::old_logp, "old_logp");
    const std::vector<double> ref_logp =
        with_reference ? flat_per_token(part, pb, &Rollout::ref_logp, "ref_logp") : std::vector<double>{};
    std::vector<double> advantages;
    for (const Rollout& r : part) advantages.push_back(r.advantage);

    PolicyLossInput in;
    in.n_sequences = static_cast<int64_t>(part.size());
    in.width = pb.width;
    in.lengths = pb.lengths;
    in.advantages = advantages;
    in.logp = logp;
    in.old_logp = old_logp;
    in.ref_logp = ref_logp;
    PolicyLossResult result = policy_loss(in, config.loss);

    // This micro-batch's share of the batch-wide normalisation (see the header).
    const double token_share = total_tokens > 0 ? static_cast<double>(result.tokens) / total_tokens : 0.0;
    const double share =
        config.loss.aggregation == LossAggregation::dapo ? token_share : static_cast<double>(part.size()) / n_rollouts;
    for (double& g : result.grad_logp) g *= share;
    policy.policy_backward(scatter_completion(result.grad_logp, pb), config.balance_scale);

    stats.loss += share * result.loss;
    stats.clip_fraction_low += token_share * result.clip_fraction_low;
    stats.clip_fraction_high += token_share * result.clip_fraction_high;
    stats.mean_kl += token_share * result.mean_kl;
    for (double e : gather_completion(out.entropy, pb)) entropy_sum += e;  // padding holds 0
    for (size_t k = 0; k < logp.size(); ++k)
      stats.max_abs_log_ratio = std::max(stats.max_abs_log_ratio, std::abs(logp[k] - old_logp[k]));
  }
  stats.entropy = total_tokens > 0 ? entropy_sum / static_cast<double>(total_tokens) : 0.0;
  stats.grad_norm = optimizer.step(lr);
  return stats;
}

}  // namespace dsx::grpo
