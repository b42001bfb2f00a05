// Softmax cross-entropy over vocabulary rows on the CPU.
//
// Rows are independent and parallelised with OpenMP. Each row's log-sum-exp subtracts the row
// maximum before exponentiating (so logits of any magnitude stay finite) and sums in double
// (a 129K-entry vocabulary row summed in f32 would lose ~1e-3 relative). The loss is reduced
// in row order from per-row values, so it does not depend on the thread count.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/cross_entropy.h"

namespace dsx::ops {
namespace {

// Rows of at least this many logits in total are worth OpenMP's start-up cost.
constexpr int64_t kParallelElements = 1 << 15;

template <class T>
double row_log_sum_exp(const T* row, int64_t vocab) {
  T max_logit = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < vocab; ++j) max_logit = std::max(max_logit, row[j]);
  double sum = 0;
  for (int64_t j = 0; j < vocab; ++j) sum += static_cast<double>(std::exp(row[j] - max_logit));
  return static_cast<double>(max_logit) + std::log(sum);
}

// Targets as int64 after checking each is ignore_index or a vocabulary entry.
std::vector<int64_t> checked_targets(const Tensor& targets, int64_t vocab, int64_t ignore_index, std::string_view op) {
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

void check_logits_targets(const Tensor& logits, const Tensor& targets, std::string_view op) {
  check_cpu(logits, op, "logits");
  check_cpu(targets, op, "targets");
  check(logits.ndim() == 2, op, "logits must be [N, V], got " + shape_str(logits.shape()));
  check_shape(targets, {logits.dim(0)}, op, "targets");
}

void check_lse(const Tensor& lse, const Tensor& logits, std::string_view op) {
  check_cpu(lse, op, "lse");
  check_shape(lse, {logits.dim(0)}, op, "lse");
  check(lse.dtype() == DType::f32 || lse.dtype() == DType::f64, op,
        "lse must be f32 or f64, got " + std::string(dtype_name(lse.dtype())));
}

// T: logits' element type; L: saved lse's.
template <class T, class L>
CrossEntropyResult forward_impl(const Tensor& logits, const std::vector<int64_t>& targets, int64_t ignore_index,
                                Tensor& lse) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const T* x = logits.data<T>();
  L* lse_out = lse.data<L>();
  std::vector<double> row_loss(static_cast<size_t>(rows), 0.0);
  // lse is saved for every row, ignored ones included, so the saved tensor has no holes.
#pragma omp parallel for schedule(static) if (rows * vocab >= kParallelElements)
  for (int64_t n = 0; n < rows; ++n) {
    const T* row = x + n * vocab;
    const double row_lse = row_log_sum_exp(row, vocab);
    lse_out[n] = static_cast<L>(row_lse);
    const int64_t target = targets[static_cast<size_t>(n)];
    if (target != ignore_index) row_loss[static_cast<size_t>(n)] = row_lse - static_cast<double>(row[target]);
  }
  CrossEntropyResult result;
  for (int64_t n = 0; n < rows; ++n) {
    if (targets[static_cast<size_t>(n)] == ignore_index) continue;
    result.loss_sum += row_loss[static_cast<size_t>(n)];
    ++result.count;
  }
  return result;
}

template <class T, class L>
void backward_impl(const Tensor& logits, const std::vector<int64_t>& targets, const Tensor& lse, int64_t ignore_index,
                   T scale, Tensor& dlogits) {
  const int64_t rows = logits.dim(0), vocab = logits.dim(1);
  const T* x = logits.data<T>();
  const L* saved_lse = lse.data<L>();
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
    // The shift is taken in double, so an f64 lse keeps p exact even when |logits| >> 1; the
    // exponential itself runs in T.
    const double row_lse = static_cast<double>(saved_lse[n]);
    for (int64_t j = 0; j < vocab; ++j)
      drow[j] = scale * std::exp(static_cast<T>(static_cast<double>(row[j]) - row_lse));
    drow[target] -= scale;
  }
}

}  // namespace

CrossEntropyResult cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                                         Tensor& lse) {
  DSX_ROUTE_TO_CUDA(logits, cross_entropy_forward(logits, targets, ignore_index, lse));
  constexpr std::string_view op = "cross_entropy_forward";
  check_logits_targets(logits, targets, op);
  check_lse(lse, logits, op);
  check(logits.dim(1) > 0 || logits.dim(0) == 0, op, "logits have an empty vocabulary dimension");
  const auto target_values = checked_targets(targets, logits.dim(1), ignore_index, op);
  return dispatch_float(logits.dtype(), op, [&]<class T>() {
    return dispatch_float(lse.dtype(), op,
                          [&]<class L>() { return forward_impl<T, L>(logits, target_values, ignore_index, lse); });
  });
}

void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                            double scale, Tensor& dlogits) {
  DSX_ROUTE_TO_CUDA(logits, cross_entropy_backward(logits, targets, lse, ignore_index, scale, dlogits));
  constexpr std::string_view op = "cross_entropy_backward";
  check_logits_targets(logits, targets, op);
  check_lse(lse, logits, op);
  check_cpu(dlogits, op, "dlogits");
  check_shape(dlogits, logits.shape(), op, "dlogits");
  check(dlogits.dtype() == logits.dtype(), op, "dlogits must have the logits' dtype");
  const auto target_values = checked_targets(targets, logits.dim(1), ignore_index, op);
  dispatch_float(logits.dtype(), op, [&]<class T>() {
    dispatch_float(lse.dtype(), op, [&]<class L>() {
      backward_impl<T, L>(logits, target_values, lse, ignore_index, static_cast<T>(scale), dlogits);
    });
  });
}

}  // namespace dsx::ops
