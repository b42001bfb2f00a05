// Per-token terms of a softmax policy on the CPU: the log-probability of each row's target and
// the row's entropy (forward), and the cross-entropy gradient with one scale per row (backward).
// RL objectives weight every token differently (GRPO: advantage times importance ratio), which
// the uniform scale of cross_entropy_backward cannot express.
//
// Both reuse the lse that cross_entropy_forward saved. Rows are independent and parallelised
// with OpenMP above the same size threshold as cross_entropy.cpp.
#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/cross_entropy.h"

namespace dsx::ops {
namespace {

constexpr int64_t kParallelElements = 1 << 15;

std::vector<int64_t> target_values(const Tensor& targets, int64_t vocab, int64_t ignore_index, std::string_view op) {
  std::vector<int64_t> out(static_cast<size_t>(targets.numel()));
  dispatch_index(targets.dtype(), op, [&]<class I>() {
    const I* t = targets.data<I>();
    for (size_t n = 0; n < out.size(); ++n) out[n] = static_cast<int64_t>(t[n]);
  });
  for (size_t n = 0; n < out.size(); ++n) {
    check(out[n] == ignore_index || (out[n] >= 0 && out[n] < vocab), op,
          "targets[" + std::to_string(n) + "] = " + std::to_string(out[n]) + " is neither ignore_index (" +
              std::to_string(ignore_index) + ") nor in [0, " + std::to_string(vocab) + ")");
  }
  return out;
}

// Shapes and devices shared by both ops.
void check_inputs(const Tensor& logits, const Tensor& targets, const Tensor& lse, std::string_view op) {
  check_cpu(logits, op, "logits");
  check_cpu(targets, op, "targets");
  check_cpu(lse, op, "lse");
  check(logits.ndim() == 2, op, "logits must be [N, V], got " + shape_str(logits.shape()));
  check_shape(targets, {logits.dim(0)}, op, "targets");
  check_shape(lse, {logits.dim(0)}, op, "lse");
}

void check_row_tensor(const Tensor& t, int64_t rows, std::string_view op, const char* name) {
  check_cpu(t, op, name);
  check_shape(t, {rows}, op, name);
  check(t.dtype() == DType::f32 || t.dtype() == DType::f64, op,
        std::string(name) + " must be f32 or f64, got " + std::string(dtype_name(t.dtype())));
}

// T: logits, L: lse, P: logp, E: entropy (E = P when there is no entropy output).
template <class T, class L, class P, class E>
void token_logprobs_impl(const Tensor& logits, const std::vector<int64_t>& targets, const Tensor& lse,
                         int64_t ignore_index, Tensor& logp, Tensor* entropy) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const T* x = logits.data<T>();
  const L* saved_lse = lse.data<L>();
  P* out = logp.data<P>();
  E* ent = entropy ? entropy->data<E>() : nullptr;
#pragma omp parallel for schedule(static) if (rows * vocab >= kParallelElements)
  for (int64_t n = 0; n < rows; ++n) {
    const int64_t target = targets[static_cast<size_t>(n)];
    if (target == ignore_index) {
      out[n] = P(0);
      if (ent) ent[n] = E(0);
      continue;
    }
    const T* row = x + n * vocab;
    const double row_lse = static_cast<double>(saved_lse[n]);
    out[n] = static_cast<P>(static_cast<double>(row[target]) - row_lse);
    if (!ent) continue;
    // H = lse - Σ p_j x_j, summed in double like the lse itself.
    double expected_logit = 0;
    for (int64_t j = 0; j < vocab; ++j) {
      const double xj = static_cast<double>(row[j]);
      expected_logit += std::exp(xj - row_lse) * xj;
    }
    ent[n] = static_cast<E>(row_lse - expected_logit);
  }
}

template <class T, class L, class S>
void weighted_backward_impl(const Tensor& logits, const std::vector<int64_t>& targets, const Tensor& lse,
                            int64_t ignore_index, const Tensor& row_scale, Tensor& dlogits) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const T* x = logits.data<T>();
  const L* saved_lse = lse.data<L>();
  const S* scale = row_scale.data<S>();
  T* dx = dlogits.data<T>();
#pragma omp parallel for schedule(static) if (rows * vocab >= kParallelElements)
  for (int64_t n = 0; n < rows; ++n) {
    T* drow = dx + n * vocab;
    const int64_t target = targets[static_cast<size_t>(n)];
    if (target == ignore_index) {
      std::fill(drow, drow + vocab, T(0));
      continue;
    }
    const T* row = x + n * vocab;
    const double row_lse = static_cast<double>(saved_lse[n]);
    const T s = static_cast<T>(scale[n]);
    for (int64_t j = 0; j < vocab; ++j) drow[j] = s * std::exp(static_cast<T>(static_cast<double>(row[j]) - row_lse));
    drow[target] -= s;
  }
}

}  // namespace

void token_logprobs(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index, Tensor& logp,
                    Tensor& entropy) {
  DSX_ROUTE_TO_CUDA(logits, token_logprobs(logits, targets, lse, ignore_index, logp, entropy));
  constexpr std::string_view op = "token_logprobs";
  check_inputs(logits, targets, lse, op);
  const int64_t rows = logits.dim(0);
  check_row_tensor(logp, rows, op, "logp");
  if (entropy.defined()) check_row_tensor(entropy, rows, op, "entropy");
  const auto values = target_values(targets, logits.dim(1), ignore_index, op);
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    dispatch_float(lse.dtype(), op, [&]<class L>() {
      dispatch_float(logp.dtype(), op, [&]<class P>() {
        if (!entropy.defined()) {
          token_logprobs_impl<T, L, P, P>(logits, values, lse, ignore_index, logp, nullptr);
          return;
        }
        dispatch_float(entropy.dtype(), op, [&]<class E>() {
          token_logprobs_impl<T, L, P, E>(logits, values, lse, ignore_index, logp, &entropy);
        });
      });
    });
  });
}

void cross_entropy_backward_weighted(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int64_t ignore_index, const Tensor& row_scale, Tensor& dlogits) {
  DSX_ROUTE_TO_CUDA(logits, cross_entropy_backward_weighted(logits, targets, lse, ignore_index, row_scale, dlogits));
  constexpr std::string_view op = "cross_entropy_backward_weighted";
  check_inputs(logits, targets, lse, op);
  check_row_tensor(row_scale, logits.dim(0), op, "row_scale");
  check_cpu(dlogits, op, "dlogits");
  check_shape(dlogits, logits.shape(), op, "dlogits");
  check(dlogits.dtype() == logits.dtype(), op, "dlogits must have the logits' dtype");
  const auto values = target_values(targets, logits.dim(1), ignore_index, op);
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    dispatch_float(lse.dtype(), op, [&]<class L>() {
      dispatch_float(row_scale.dtype(), op, [&]<class S>() {
        weighted_backward_impl<T, L, S>(logits, values, lse, ignore_index, row_scale, dlogits);
      });
    });
  });
}

}  // namespace dsx::ops
