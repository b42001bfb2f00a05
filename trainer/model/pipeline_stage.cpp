#include "trainer/model/pipeline_stage.h"

#include <algorithm>
#include <limits>
#include <stdexcept>
#include <utility>

#include "trainer/model/param_count.h"

namespace dsx {

namespace {

void check_stages(int64_t num_layers, int count) {
  if (count < 1) throw std::invalid_argument("pipeline_stage: " + std::to_string(count) + " pipeline stages");
  if (num_layers < count) {
    throw std::invalid_argument("pipeline_stage: " + std::to_string(num_layers) + " decoder layers cannot fill " +
                                std::to_string(count) + " pipeline stages (each needs at least one)");
  }
}

}  // namespace

std::vector<int64_t> even_split(int64_t num_layers, int stages) {
  check_stages(num_layers, stages);
  const int64_t base = num_layers / stages, extra = num_layers % stages;
  std::vector<int64_t> split;
  for (int s = 0; s < stages; ++s) split.push_back(base + (s < extra ? 1 : 0));
  return split;
}

PipelineStage pipeline_stage(const std::vector<int64_t>& split, int index) {
  const auto count = static_cast<int>(split.size());
  if (index < 0 || index >= count) {
    throw std::invalid_argument("pipeline_stage: stage " + std::to_string(index) + " of " + std::to_string(count) +
                                " does not exist");
  }
  PipelineStage s;
  s.index = index;
  s.count = count;
  for (int i = 0; i < index; ++i) s.first_layer += split[static_cast<size_t>(i)];
  s.end_layer = s.first_layer + split[static_cast<size_t>(index)];
  if (s.layers() < 1) throw std::invalid_argument("pipeline_stage: stage " + std::to_string(index) + " has no layer");
  return s;
}

PipelineStage pipeline_stage(int64_t num_layers, int count, int index) {
  return pipeline_stage(even_split(num_layers, count), index);  // both check their arguments
}

std::vector<double> stage_flops_per_token(const ModelConfig& config, const std::vector<int64_t>& split,
                                          int64_t seq_len) {
  return stage_flops_per_token(module_flops_per_token(config, seq_len), split);
}

std::vector<double> stage_flops_per_token(const ModuleFlops& m, const std::vector<int64_t>& split) {
  std::vector<double> out;
  size_t layer = 0;
  for (int64_t n : split) {
    double cost = 0;
    for (int64_t i = 0; i < n; ++i) cost += m.layers.at(layer++);
    out.push_back(cost);
  }
  if (!out.empty()) out.back() += m.head + m.mtp;
  return out;
}

// Linear partition by dynamic programming over suffixes: best[k][i] is the smallest possible
// most expensive stage when layers [i, L) form the last k stages. Then, stage by stage from the
// first, the longest run that keeps the rest within that optimum.
std::vector<int64_t> balanced_split(const ModelConfig& config, int stages, int64_t seq_len) {
  return balanced_split(module_flops_per_token(config, seq_len), stages);
}

std::vector<int64_t> balanced_split(const ModuleFlops& m, int stages) {
  const auto L = static_cast<int64_t>(m.layers.size());
  check_stages(L, stages);
  std::vector<double> prefix(static_cast<size_t>(L) + 1, 0.0);
  for (int64_t i = 0; i < L; ++i)
    prefix[static_cast<size_t>(i) + 1] = prefix[static_cast<size_t>(i)] + m.layers[static_cast<size_t>(i)];
  const double tail = m.head + m.mtp;
  // the cost of layers [i, j) as a stage; the last stage (j == L) adds the head and MTP modules
  const auto cost = [&](int64_t i, int64_t j) {
    return prefix[static_cast<size_t>(j)] - prefix[static_cast<size_t>(i)] + (j == L ? tail : 0.0);
  };
  constexpr double kInf = std::numeric_limits<double>::infinity();
  std::vector<std::vector<double>> best(static_cast<size_t>(stages) + 1,
                                        std::vector<double>(static_cast<size_t>(L) + 1, kInf));
  for (int64_t i = 0; i < L; ++i) best[1][static_cast<size_t>(i)] = cost(i, L);
  for (int k = 2; k <= stages; ++k) {
    for (int64_t i = 0; i + k <= L; ++i) {
      double b = kInf;
      for (int64_t j = i + 1; j + (k - 1) <= L; ++j)
        b = std::min(b, std::max(cost(i, j), best[k - 1][static_cast<size_t>(j)]));
      best[static_cast<size_t>(k)][static_cast<size_t>(i)] = b;
    }
  }
  const double optimum = best[static_cast<size_t>(stages)][0];
  const double slack = optimum * 1e-12;  // the sums above are rounded; ties must count as ties
  std::vector<int64_t> split;
  int64_t i = 0;
  for (int k = stages; k > 1; --k) {
    int64_t j = L - (k - 1);  // the longest first run that leaves one layer per later stage
    while (j > i + 1 &&
           (cost(i, j) > optimum + slack || best[static_cast<size_t>(k) - 1][static_cast<size_t>(j)] > optimum + slack))
      --j;
    split.push_back(j - i);
    i = j;
  }
  split.push_back(L - i);
  return split;
}

std::string describe(const PipelineStage& stage, int64_t mtp_depth) {
  std::string out = "stage " + std::to_string(stage.index) + "/" + std::to_string(stage.count) + ": ";
  if (stage.is_first()) out += "embedding, ";
  out += "layers " + std::to_string(stage.first_layer) + "-" + std::to_string(stage.end_layer - 1);
  if (stage.is_last()) {
    out += ", head";
    if (mtp_depth > 0) out += " + " + std::to_string(mtp_depth) + " MTP";
  }
  return out;
}

std::string describe_pipeline(int64_t num_layers, int64_t mtp_depth, int count) {
  return describe_pipeline(even_split(num_layers, count), mtp_depth, {.ranks = count});
}

std::vector<double> rank_flops_per_token(const ModelConfig& config, const std::vector<int64_t>& split,
                                         const PipelineLayout& layout, int64_t seq_len) {
  return rank_flops_per_token(module_flops_per_token(config, seq_len), split, layout);
}

std::vector<double> rank_flops_per_token(const ModuleFlops& m, const std::vector<int64_t>& split,
                                         const PipelineLayout& layout) {
  const std::vector<double> stages = stage_flops_per_token(m, split);
  std::vector<double> ranks(static_cast<size_t>(layout.ranks), 0.0);
  for (int s = 0; s < layout.stages(); ++s)
    ranks[static_cast<size_t>(layout.rank_of(s))] += stages.at(static_cast<size_t>(s));
  return ranks;
}

namespace {

// What the V's local search lowers: the costliest rank, then the sum of squared rank costs.
std::pair<double, double> split_badness(const std::vector<double>& ranks) {
  double most = 0, squares = 0;
  for (double r : ranks) most = std::max(most, r), squares += r * r;
  return {most, squares};
}

std::vector<int64_t> improve_v_split(const ModuleFlops& m, std::vector<int64_t> split, const PipelineLayout& layout) {
  auto badness = split_badness(rank_flops_per_token(m, split, layout));
  for (bool moved = true; moved;) {
    moved = false;
    for (size_t b = 0; b + 1 < split.size(); ++b) {  // the boundary between stage b and b + 1
      for (const int step : {1, -1}) {               // a layer from stage b + 1 to b, or back
        std::vector<int64_t> trial = split;
        trial[b] += step;
        trial[b + 1] -= step;
        if (trial[b] < 1 || trial[b + 1] < 1) continue;
        const auto trial_badness = split_badness(rank_flops_per_token(m, trial, layout));
        const double tolerance = badness.first * 1e-12;
        if (trial_badness.first < badness.first - tolerance ||
            (trial_badness.first <= badness.first + tolerance && trial_badness.second < badness.second * (1 - 1e-12))) {
          split = std::move(trial);
          badness = trial_badness;
          moved = true;
        }
      }
    }
  }
  return split;
}

}  // namespace

std::vector<int64_t> balanced_split(const ModelConfig& config, const PipelineLayout& layout, int64_t seq_len) {
  return balanced_split(module_flops_per_token(config, seq_len), layout);
}

std::vector<int64_t> balanced_split(const ModuleFlops& m, const PipelineLayout& layout) {
  if (layout.chunks() == 1) return balanced_split(m, layout.stages());
  std::vector<int64_t> best;
  std::pair<double, double> best_badness;
  for (std::vector<int64_t> start :
       {balanced_split(m, layout.stages()), even_split(static_cast<int64_t>(m.layers.size()), layout.stages())}) {
    std::vector<int64_t> split = improve_v_split(m, std::move(start), layout);
    const auto badness = split_badness(rank_flops_per_token(m, split, layout));
    if (best.empty() || badness < best_badness) best = std::move(split), best_badness = badness;
  }
  return best;
}

std::string describe_pipeline(const std::vector<int64_t>& split, int64_t mtp_depth, const PipelineLayout& layout) {
  std::string out;
  for (int r = 0; r < layout.ranks; ++r) {
    const bool several = layout.chunks() > 1;
    if (several) out += (r ? " | rank " : "rank ") + std::to_string(r) + ": ";
    for (int c = 0; c < layout.chunks(); ++c) {
      out += (c               ? " + "
              : r && !several ? " | "
                              : "") +
             describe(pipeline_stage(split, layout.stage_of(r, c)), mtp_depth);
    }
  }
  return out;
}

}  // namespace dsx
