#include "kernels/ops/router.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"

namespace dsx::ops {
namespace {

// Below this many score elements (tokens · experts) a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 15;

// Added to the sum of the chosen scores before dividing (as the Hugging Face DeepSeek-V3 gate does), so
// a token whose chosen sigmoid scores all underflow to 0 gets weights 0 instead of NaN.
constexpr double kNormEps = 1e-20;

void check_config(const RouterConfig& c, std::string_view op) {
  const auto s = [](int64_t v) { return std::to_string(v); };
  check(c.n_experts >= 1, op, "n_experts must be >= 1, got " + s(c.n_experts));
  check(c.n_group >= 1, op, "n_group must be >= 1, got " + s(c.n_group));
  check(c.n_experts % c.n_group == 0, op,
        "n_experts (" + s(c.n_experts) + ") must be a multiple of n_group (" + s(c.n_group) + ")");
  check(c.topk_group >= 1 && c.topk_group <= c.n_group, op,
        "topk_group must be in [1, n_group = " + s(c.n_group) + "], got " + s(c.topk_group));
  const int64_t kept_experts = c.topk_group * (c.n_experts / c.n_group);
  check(c.top_k >= 1 && c.top_k <= kept_experts, op,
        "top_k must be in [1, topk_group * n_experts / n_group = " + s(kept_experts) + "], got " + s(c.top_k));
  check(std::isfinite(c.routed_scaling_factor), op, "routed_scaling_factor must be finite");
}

// [T, E] float tensor of the config's width; returns T.
int64_t check_token_matrix(const RouterConfig& c, const Tensor& t, std::string_view op, std::string_view name) {
  check_cpu(t, op, name);
  check(
      t.ndim() == 2 && t.dim(1) == c.n_experts, op,
      std::string(name) + " must be [T, n_experts = " + std::to_string(c.n_experts) + "], got " + shape_str(t.shape()));
  return t.dim(0);
}

// Expert ids [T, K] i32 with every id in [0, E); checked serially before any parallel loop reads them.
void check_expert_ids(const RouterConfig& c, const Tensor& ids, int64_t tokens, std::string_view op) {
  check_cpu(ids, op, "expert_ids");
  check(ids.dtype() == DType::i32, op, "expert_ids must be i32, got " + ids.describe());
  check_shape(ids, {tokens, c.top_k}, op, "expert_ids");
  const int32_t* id = ids.data<int32_t>();
  for (int64_t i = 0; i < ids.numel(); ++i) {
    check(id[i] >= 0 && id[i] < c.n_experts, op,
          "expert id " + std::to_string(id[i]) + " out of range [0, " + std::to_string(c.n_experts) + ")");
  }
}

// Selection compares scores with NaN mapped to -inf, so the comparison below is a strict weak
// order even for a diverged model (std::partial_sort requires one) and a NaN expert is never
// preferred to a finite one.
template <class T>
T selection_key(T v) {
  return std::isnan(v) ? -std::numeric_limits<T>::infinity() : v;
}

template <class T>
void compute_scores(RouterConfig::Scoring scoring, const T* logits, T* scores, int64_t n) {
  if (scoring == RouterConfig::Scoring::sigmoid) {
    for (int64_t e = 0; e < n; ++e) scores[e] = T(1) / (T(1) + std::exp(-logits[e]));
    return;
  }
  T max_logit = logits[0];
  for (int64_t e = 1; e < n; ++e) max_logit = std::max(max_logit, logits[e]);
  double sum = 0;
  for (int64_t e = 0; e < n; ++e) {
    scores[e] = std::exp(logits[e] - max_logit);
    sum += static_cast<double>(scores[e]);
  }
  const T inv = static_cast<T>(1.0 / sum);
  for (int64_t e = 0; e < n; ++e) scores[e] *= inv;
}

// dlogits (+)= J_scoresᵀ · dscores for one token.
template <class T>
void scores_backward(RouterConfig::Scoring scoring, const T* scores, const T* dscores, T* dlogits, int64_t n,
                     bool accumulate) {
  T dot = 0;
  if (scoring == RouterConfig::Scoring::softmax) {
    for (int64_t e = 0; e < n; ++e) dot += dscores[e] * scores[e];
  }
  for (int64_t e = 0; e < n; ++e) {
    const T s = scores[e];
    const T g = scoring == RouterConfig::Scoring::sigmoid ? dscores[e] * s * (T(1) - s) : s * (dscores[e] - dot);
    dlogits[e] = accumulate ? dlogits[e] + g : g;
  }
}

// Group-limited top-k for one token; the scratch buffers live as long as one thread's share of rows.
template <class T>
class ExpertSelector {
 public:
  explicit ExpertSelector(const RouterConfig& c)
      : c_(c),
        group_size_(c.n_experts / c.n_group),
        biased_(static_cast<size_t>(c.n_experts)),
        group_score_(static_cast<size_t>(c.n_group)),
        groups_(static_cast<size_t>(c.n_group)) {
    candidates_.reserve(static_cast<size_t>(c.n_experts));
  }

  // ids[0..K) = the chosen experts in order of decreasing biased score (ties: lower index first).
  void select(const T* scores, const T* bias, int32_t* ids) {
    for (int64_t e = 0; e < c_.n_experts; ++e) biased_[e] = selection_key(bias ? scores[e] + bias[e] : scores[e]);
    collect_candidates();
    const auto better = [this](int64_t a, int64_t b) {
      return biased_[a] > biased_[b] || (biased_[a] == biased_[b] && a < b);
    };
    std::partial_sort(candidates_.begin(), candidates_.begin() + c_.top_k, candidates_.end(), better);
    for (int64_t k = 0; k < c_.top_k; ++k) ids[k] = static_cast<int32_t>(candidates_[k]);
  }

 private:
  // Sum of the two largest biased scores of a group (the largest alone for one-expert groups).
  T group_score(int64_t g) const {
    const T* v = biased_.data() + g * group_size_;
    T first = v[0];
    T second = -std::numeric_limits<T>::infinity();
    for (int64_t j = 1; j < group_size_; ++j) {
      if (v[j] > first) {
        second = first;
        first = v[j];
      } else if (v[j] > second) {
        second = v[j];
      }
    }
    return group_size_ == 1 ? first : selection_key(first + second);
  }

  // The experts of the best topk_group groups (all experts when every group is kept).
  void collect_candidates() {
    candidates_.clear();
    if (c_.topk_group == c_.n_group) {
      for (int64_t e = 0; e < c_.n_experts; ++e) candidates_.push_back(e);
      return;
    }
    for (int64_t g = 0; g < c_.n_group; ++g) {
      group_score_[g] = group_score(g);
      groups_[g] = g;
    }
    const auto better = [this](int64_t a, int64_t b) {
      return group_score_[a] > group_score_[b] || (group_score_[a] == group_score_[b] && a < b);
    };
    std::partial_sort(groups_.begin(), groups_.begin() + c_.topk_group, groups_.end(), better);
    for (int64_t i = 0; i < c_.topk_group; ++i) {
      for (int64_t j = 0; j < group_size_; ++j) candidates_.push_back(groups_[i] * group_size_ + j);
    }
  }

  const RouterConfig& c_;
  int64_t group_size_;
  std::vector<T> biased_;
  std::vector<T> group_score_;
  std::vector<int64_t> groups_;
  std::vector<int64_t> candidates_;
};

template <class T>
void gate_weights(const RouterConfig& c, const T* scores, const int32_t* ids, T* weights) {
  const T scale = static_cast<T>(c.routed_scaling_factor);
  if (!c.norm_topk_prob) {
    for (int64_t k = 0; k < c.top_k; ++k) weights[k] = scores[ids[k]] * scale;
    return;
  }
  T sum = static_cast<T>(kNormEps);
  for (int64_t k = 0; k < c.top_k; ++k) sum += scores[ids[k]];
  for (int64_t k = 0; k < c.top_k; ++k) weights[k] = scores[ids[k]] / sum * scale;
}

// ∂loss/∂scores of one token from ∂loss/∂weights: with D = Σ_k s_k + eps and w_k = c s_k / D,
//   ∂loss/∂s_j = c (dw_j - Σ_k dw_k s_k / D) / D   (norm_topk_prob),   c dw_j   (otherwise).
template <class T>
void gate_weights_backward(const RouterConfig& c, const T* scores, const int32_t* ids, const T* dweights, T* dscores) {
  const T scale = static_cast<T>(c.routed_scaling_factor);
  std::fill(dscores, dscores + c.n_experts, T(0));
  if (!c.norm_topk_prob) {
    for (int64_t k = 0; k < c.top_k; ++k) dscores[ids[k]] = scale * dweights[k];
    return;
  }
  T sum = static_cast<T>(kNormEps);
  T weighted = 0;
  for (int64_t k = 0; k < c.top_k; ++k) {
    sum += scores[ids[k]];
    weighted += dweights[k] * scores[ids[k]];
  }
  const T mean_dw = weighted / sum;
  for (int64_t k = 0; k < c.top_k; ++k) dscores[ids[k]] = scale * (dweights[k] - mean_dw) / sum;
}

// f_{n,i} = E / (K · S) · (tokens of sequence n routed to expert i), [n_seq · E].
std::vector<double> load_fractions(const RouterConfig& c, const Tensor& expert_ids, int64_t n_seq) {
  const int64_t tokens_per_seq = expert_ids.dim(0) / n_seq;
  const double unit = static_cast<double>(c.n_experts) / static_cast<double>(c.top_k * tokens_per_seq);
  std::vector<double> f(static_cast<size_t>(n_seq * c.n_experts), 0.0);
  const int32_t* id = expert_ids.data<int32_t>();
  for (int64_t t = 0; t < expert_ids.dim(0); ++t) {
    double* fs = f.data() + (t / tokens_per_seq) * c.n_experts;
    for (int64_t k = 0; k < c.top_k; ++k) fs[id[t * c.top_k + k]] += unit;
  }
  return f;
}

void check_balance_inputs(const RouterConfig& c, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                          std::string_view op) {
  check_config(c, op);
  const int64_t tokens = check_token_matrix(c, scores, op, "scores");
  check(n_seq >= 1 && tokens % n_seq == 0, op,
        "n_seq (" + std::to_string(n_seq) + ") must be >= 1 and divide the token count " + std::to_string(tokens));
  check_expert_ids(c, expert_ids, tokens, op);
}

}  // namespace

void router_forward(const RouterConfig& config, const Tensor& logits, const Tensor& bias, Tensor& scores,
                    Tensor& expert_ids, Tensor& weights) {
  DSX_ROUTE_TO_CUDA(logits, router_forward(config, logits, bias, scores, expert_ids, weights));
  constexpr std::string_view op = "router_forward";
  check_config(config, op);
  const int64_t tokens = check_token_matrix(config, logits, op, "logits");
  check_shape(scores, logits.shape(), op, "scores");
  check_shape(expert_ids, {tokens, config.top_k}, op, "expert_ids");
  check_shape(weights, {tokens, config.top_k}, op, "weights");
  check(expert_ids.dtype() == DType::i32, op, "expert_ids must be i32, got " + expert_ids.describe());
  check(scores.dtype() == logits.dtype() && weights.dtype() == logits.dtype(), op,
        "scores and weights must share the logits dtype " + logits.describe());
  if (bias.defined()) {
    check_shape(bias, {config.n_experts}, op, "bias");
    check(bias.dtype() == logits.dtype(), op, "bias must share the logits dtype " + logits.describe());
  }
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    const int64_t n_experts = config.n_experts;
    const int64_t top_k = config.top_k;
    const T* x = logits.data<T>();
    const T* b = bias.defined() ? bias.data<T>() : nullptr;
    T* s = scores.data<T>();
    int32_t* ids = expert_ids.data<int32_t>();
    T* w = weights.data<T>();
#pragma omp parallel if (tokens * config.n_experts >= kParallelElements)
    {
      ExpertSelector<T> selector(config);
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tokens; ++t) {
        T* row_scores = s + t * n_experts;
        compute_scores(config.scoring, x + t * n_experts, row_scores, n_experts);
        selector.select(row_scores, b, ids + t * top_k);
        gate_weights(config, row_scores, ids + t * top_k, w + t * top_k);
      }
    }
  });
}

void router_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, const Tensor& dweights,
                     Tensor& dlogits) {
  DSX_ROUTE_TO_CUDA(scores, router_backward(config, scores, expert_ids, dweights, dlogits));
  constexpr std::string_view op = "router_backward";
  check_config(config, op);
  const int64_t tokens = check_token_matrix(config, scores, op, "scores");
  check_expert_ids(config, expert_ids, tokens, op);
  check_shape(dweights, {tokens, config.top_k}, op, "dweights");
  check_shape(dlogits, scores.shape(), op, "dlogits");
  check(dweights.dtype() == scores.dtype() && dlogits.dtype() == scores.dtype(), op,
        "dweights and dlogits must share the scores dtype " + scores.describe());
  dispatch_float(scores.dtype(), op, [&]<class T>() {
    const int64_t n_experts = config.n_experts;
    const int64_t top_k = config.top_k;
    const T* s = scores.data<T>();
    const int32_t* ids = expert_ids.data<int32_t>();
    const T* dw = dweights.data<T>();
    T* dl = dlogits.data<T>();
#pragma omp parallel if (tokens * config.n_experts >= kParallelElements)
    {
      std::vector<T> dscores(static_cast<size_t>(n_experts));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tokens; ++t) {
        const T* row_scores = s + t * n_experts;
        gate_weights_backward(config, row_scores, ids + t * top_k, dw + t * top_k, dscores.data());
        scores_backward(config.scoring, row_scores, dscores.data(), dl + t * n_experts, n_experts, false);
      }
    }
  });
}

void expert_counts(const Tensor& expert_ids, int64_t n_experts, Tensor& counts) {
  DSX_ROUTE_TO_CUDA(expert_ids, expert_counts(expert_ids, n_experts, counts));
  constexpr std::string_view op = "expert_counts";
  check_cpu(expert_ids, op, "expert_ids");
  check(n_experts >= 1, op, "n_experts must be >= 1, got " + std::to_string(n_experts));
  check_shape(counts, {n_experts}, op, "counts");
  check(counts.dtype() == DType::i64, op, "counts must be i64, got " + counts.describe());
  int64_t* out = counts.data<int64_t>();
  std::fill(out, out + n_experts, int64_t{0});
  dispatch_index(expert_ids.dtype(), op, [&]<class I>() {
    const I* id = expert_ids.data<I>();
    for (int64_t i = 0; i < expert_ids.numel(); ++i) {
      check(id[i] >= 0 && id[i] < n_experts, op,
            "expert id " + std::to_string(id[i]) + " out of range [0, " + std::to_string(n_experts) + ")");
      ++out[id[i]];
    }
  });
}

void router_update_bias(const Tensor& counts, double gamma, Tensor& bias) {
  DSX_ROUTE_TO_CUDA(bias, router_update_bias(counts, gamma, bias));
  constexpr std::string_view op = "router_update_bias";
  check_cpu(counts, op, "counts");
  check_cpu(bias, op, "bias");
  check(bias.ndim() == 1, op, "bias must be 1-D [E], got " + shape_str(bias.shape()));
  check_shape(counts, bias.shape(), op, "counts");
  check(std::isfinite(gamma) && gamma >= 0, op, "gamma must be finite and >= 0, got " + std::to_string(gamma));
  dispatch_index(counts.dtype(), op, [&]<class I>() {
    dispatch_float(bias.dtype(), op, [&]<class T>() {
      const I* n = counts.data<I>();
      T* b = bias.data<T>();
      const int64_t experts = bias.numel();
      double total = 0;
      for (int64_t e = 0; e < experts; ++e) total += static_cast<double>(n[e]);
      const double mean = total / static_cast<double>(experts);
      const T step = static_cast<T>(gamma);
      for (int64_t e = 0; e < experts; ++e) {
        const double load = static_cast<double>(n[e]);
        if (load > mean) b[e] -= step;
        if (load < mean) b[e] += step;
      }
    });
  });
}

// loss = α / n_seq · Σ_n Σ_i f_{n,i} P_{n,i} = α / (n_seq · S) · Σ_t Σ_i f_{seq(t),i} s'_{t,i}: each token's
// term is computed in parallel and the terms are added in token order, so the result does not depend
// on the thread count.
double balance_loss_forward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                            double alpha) {
  DSX_ROUTE_TO_CUDA(scores, balance_loss_forward(config, scores, expert_ids, n_seq, alpha));
  constexpr std::string_view op = "balance_loss_forward";
  check_balance_inputs(config, scores, expert_ids, n_seq, op);
  const int64_t tokens = scores.dim(0);
  if (tokens == 0) return 0.0;
  const int64_t tokens_per_seq = tokens / n_seq;
  const std::vector<double> f = load_fractions(config, expert_ids, n_seq);
  std::vector<double> token_terms(static_cast<size_t>(tokens));
  dispatch_float(scores.dtype(), op, [&]<class T>() {
    const int64_t n_experts = config.n_experts;
    const T* s = scores.data<T>();
#pragma omp parallel for schedule(static) if (tokens * config.n_experts >= kParallelElements)
    for (int64_t t = 0; t < tokens; ++t) {
      const T* row = s + t * n_experts;
      const double* fs = f.data() + (t / tokens_per_seq) * n_experts;
      double sum = 0;
      double weighted = 0;
      for (int64_t e = 0; e < n_experts; ++e) {
        sum += static_cast<double>(row[e]);
        weighted += fs[e] * static_cast<double>(row[e]);
      }
      token_terms[t] = weighted / sum;
    }
  });
  double total = 0;
  for (double v : token_terms) total += v;
  return alpha * total / static_cast<double>(n_seq * tokens_per_seq);
}

// With s' = s / Σs and g_i = dloss · α f_{seq,i} / (n_seq · S) = ∂loss/∂s'_i:
//   ∂loss/∂s_j = (g_j - Σ_i g_i s'_i) / Σs, then through the sigmoid/softmax.
void balance_loss_backward(const RouterConfig& config, const Tensor& scores, const Tensor& expert_ids, int64_t n_seq,
                           double alpha, double dloss, Tensor& dlogits) {
  DSX_ROUTE_TO_CUDA(scores, balance_loss_backward(config, scores, expert_ids, n_seq, alpha, dloss, dlogits));
  constexpr std::string_view op = "balance_loss_backward";
  check_balance_inputs(config, scores, expert_ids, n_seq, op);
  check_shape(dlogits, scores.shape(), op, "dlogits");
  check(dlogits.dtype() == scores.dtype(), op, "dlogits must share the scores dtype " + scores.describe());
  const int64_t tokens = scores.dim(0);
  if (tokens == 0) return;
  const int64_t tokens_per_seq = tokens / n_seq;
  std::vector<double> g = load_fractions(config, expert_ids, n_seq);
  const double coefficient = dloss * alpha / static_cast<double>(n_seq * tokens_per_seq);
  for (double& v : g) v *= coefficient;
  dispatch_float(scores.dtype(), op, [&]<class T>() {
    const int64_t n_experts = config.n_experts;
    const T* s = scores.data<T>();
    T* dl = dlogits.data<T>();
#pragma omp parallel if (tokens * config.n_experts >= kParallelElements)
    {
      std::vector<T> dscores(static_cast<size_t>(n_experts));
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tokens; ++t) {
        const T* row = s + t * n_experts;
        const double* gs = g.data() + (t / tokens_per_seq) * n_experts;
        double sum = 0;
        double weighted = 0;
        for (int64_t e = 0; e < n_experts; ++e) {
          sum += static_cast<double>(row[e]);
          weighted += gs[e] * static_cast<double>(row[e]);
        }
        const double mean_g = weighted / sum;
        for (int64_t e = 0; e < n_experts; ++e) dscores[e] = static_cast<T>((gs[e] - mean_g) / sum);
        scores_backward(config.scoring, row, dscores.data(), dl + t * n_experts, n_experts, true);
      }
    }
  });
}

}  // namespace dsx::ops
