#include "kernels/ops/moe_permute.h"

#include <cstring>
#include <initializer_list>
#include <string>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"

namespace dsx::ops {
namespace {

// Below this many copied elements a parallel region costs more than it saves.
constexpr int64_t kParallelElements = 1 << 14;

// The plan's inverse: row_of[t·K + k] = the permuted row holding assignment t·K + k. Built serially
// (O(T·K), small next to the O(T·K·D) row traffic) and checked to be a permutation, so the parallel
// loops below never read out of range.
std::vector<int64_t> permuted_rows(const MoePlan& plan, std::string_view op) {
  check(plan.n_tokens >= 0 && plan.top_k >= 1, op,
        "plan has n_tokens " + std::to_string(plan.n_tokens) + ", top_k " + std::to_string(plan.top_k));
  const int64_t n = plan.n_tokens * plan.top_k;
  check_cpu(plan.assignment, op, "plan.assignment");
  check(plan.assignment.dtype() == DType::i64, op, "plan.assignment must be i64");
  check_shape(plan.assignment, {n}, op, "plan.assignment");
  const int64_t* assignment = plan.assignment.data<int64_t>();
  std::vector<int64_t> row_of(static_cast<size_t>(n), -1);
  for (int64_t r = 0; r < n; ++r) {
    const int64_t a = assignment[r];
    check(a >= 0 && a < n && row_of[a] < 0, op,
          "plan.assignment is not a permutation of [0, T·K): row " + std::to_string(r) + " holds " + std::to_string(a));
    row_of[a] = r;
  }
  return row_of;
}

// [rows, D] with the given row count; returns D.
int64_t check_rows(const Tensor& t, int64_t rows, std::string_view op, std::string_view name) {
  check_cpu(t, op, name);
  check(t.ndim() == 2 && t.dim(0) == rows, op,
        std::string(name) + " must be [" + std::to_string(rows) + ", D], got " + shape_str(t.shape()));
  return t.dim(1);
}

void check_same_dtype(const Tensor& a, const Tensor& b, std::string_view op) {
  check(a.dtype() == b.dtype(), op, a.describe() + " and " + b.describe() + " must share a dtype");
}

}  // namespace

MoePlan moe_plan(const Tensor& expert_ids, int64_t n_experts) {
  DSX_ROUTE_TO_CUDA(expert_ids, moe_plan(expert_ids, n_experts));
  constexpr std::string_view op = "moe_plan";
  check_cpu(expert_ids, op, "expert_ids");
  check(expert_ids.ndim() == 2, op, "expert_ids must be [T, K], got " + shape_str(expert_ids.shape()));
  check(n_experts >= 1, op, "n_experts must be >= 1, got " + std::to_string(n_experts));
  MoePlan plan;
  plan.n_tokens = expert_ids.dim(0);
  plan.top_k = expert_ids.dim(1);
  check(plan.top_k >= 1, op, "expert_ids has no choices per token");
  const int64_t n = plan.n_tokens * plan.top_k;
  plan.assignment = Tensor::empty({n}, DType::i64);
  plan.expert_offsets.assign(static_cast<size_t>(n_experts + 1), 0);
  dispatch_index(expert_ids.dtype(), op, [&]<class I>() {
    const I* id = expert_ids.data<I>();
    // Counting sort: counts, exclusive prefix sum, then a scatter in assignment order, which is what
    // makes the order within each expert's segment stable.
    for (int64_t a = 0; a < n; ++a) {
      check(id[a] >= 0 && id[a] < n_experts, op,
            "expert id " + std::to_string(id[a]) + " out of range [0, " + std::to_string(n_experts) + ")");
      ++plan.expert_offsets[static_cast<size_t>(id[a]) + 1];
    }
    for (int64_t e = 0; e < n_experts; ++e) plan.expert_offsets[e + 1] += plan.expert_offsets[e];
    std::vector<int64_t> cursor(plan.expert_offsets.begin(), plan.expert_offsets.end() - 1);
    int64_t* assignment = plan.assignment.data<int64_t>();
    for (int64_t a = 0; a < n; ++a) assignment[cursor[id[a]]++] = a;
  });
  return plan;
}

void moe_permute(const Tensor& x, const MoePlan& plan, Tensor& xp) {
  DSX_ROUTE_TO_CUDA(x, moe_permute(x, plan, xp));
  constexpr std::string_view op = "moe_permute";
  permuted_rows(plan, op);
  const int64_t d = check_rows(x, plan.n_tokens, op, "x");
  check_shape(xp, {plan.n_tokens * plan.top_k, d}, op, "xp");
  check_same_dtype(x, xp, op);
  // A pure row copy: any dtype (fp8 dispatch included) moves as bytes.
  const size_t row_bytes = static_cast<size_t>(d) * dtype_size(x.dtype());
  const char* src = static_cast<const char*>(x.raw());
  char* dst = static_cast<char*>(xp.raw());
  const int64_t* assignment = plan.assignment.data<int64_t>();
  const int64_t rows = plan.n_tokens * plan.top_k;
  const int64_t top_k = plan.top_k;
#pragma omp parallel for schedule(static) if (rows * d > kParallelElements)
  for (int64_t r = 0; r < rows; ++r) {
    std::memcpy(dst + static_cast<size_t>(r) * row_bytes, src + static_cast<size_t>(assignment[r] / top_k) * row_bytes,
                row_bytes);
  }
}

void moe_permute_backward(const Tensor& dxp, const MoePlan& plan, Tensor& dx) {
  DSX_ROUTE_TO_CUDA(dxp, moe_permute_backward(dxp, plan, dx));
  constexpr std::string_view op = "moe_permute_backward";
  const std::vector<int64_t> row_of = permuted_rows(plan, op);
  const int64_t d = check_rows(dxp, plan.n_tokens * plan.top_k, op, "dxp");
  check_shape(dx, {plan.n_tokens, d}, op, "dx");
  check_same_dtype(dxp, dx, op);
  dispatch_float(dx.dtype(), op, [&]<class T>() {
    const T* g = dxp.data<T>();
    T* out = dx.data<T>();
    const int64_t top_k = plan.top_k;
#pragma omp parallel for schedule(static) if (plan.n_tokens * top_k * d > kParallelElements)
    for (int64_t t = 0; t < plan.n_tokens; ++t) {
      T* dst = out + t * d;
      std::fill(dst, dst + d, T(0));
      for (int64_t k = 0; k < top_k; ++k) {
        const T* src = g + row_of[t * top_k + k] * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dst[j] += src[j];
      }
    }
  });
}

void moe_unpermute(const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& y) {
  DSX_ROUTE_TO_CUDA(yp, moe_unpermute(yp, weights, plan, y));
  constexpr std::string_view op = "moe_unpermute";
  const std::vector<int64_t> row_of = permuted_rows(plan, op);
  const int64_t d = check_rows(yp, plan.n_tokens * plan.top_k, op, "yp");
  check_cpu(weights, op, "weights");
  check_shape(weights, {plan.n_tokens, plan.top_k}, op, "weights");
  check_shape(y, {plan.n_tokens, d}, op, "y");
  check_same_dtype(yp, weights, op);
  check_same_dtype(yp, y, op);
  dispatch_float(y.dtype(), op, [&]<class T>() {
    const T* src_rows = yp.data<T>();
    const T* w = weights.data<T>();
    T* out = y.data<T>();
    const int64_t top_k = plan.top_k;
#pragma omp parallel for schedule(static) if (plan.n_tokens * top_k * d > kParallelElements)
    for (int64_t t = 0; t < plan.n_tokens; ++t) {
      T* dst = out + t * d;
      std::fill(dst, dst + d, T(0));
      for (int64_t k = 0; k < top_k; ++k) {
        const T wk = w[t * top_k + k];
        const T* src = src_rows + row_of[t * top_k + k] * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) dst[j] += wk * src[j];
      }
    }
  });
}

void moe_unpermute_backward(const Tensor& dy, const Tensor& yp, const Tensor& weights, const MoePlan& plan, Tensor& dyp,
                            Tensor& dweights) {
  DSX_ROUTE_TO_CUDA(dy, moe_unpermute_backward(dy, yp, weights, plan, dyp, dweights));
  constexpr std::string_view op = "moe_unpermute_backward";
  const std::vector<int64_t> row_of = permuted_rows(plan, op);
  const int64_t d = check_rows(yp, plan.n_tokens * plan.top_k, op, "yp");
  check_shape(dy, {plan.n_tokens, d}, op, "dy");
  check_cpu(weights, op, "weights");
  check_shape(weights, {plan.n_tokens, plan.top_k}, op, "weights");
  check_shape(dyp, yp.shape(), op, "dyp");
  check_shape(dweights, weights.shape(), op, "dweights");
  for (const Tensor* t : std::initializer_list<const Tensor*>{&dy, &weights, &dyp, &dweights}) {
    check_same_dtype(yp, *t, op);
  }
  dispatch_float(yp.dtype(), op, [&]<class T>() {
    const T* g = dy.data<T>();
    const T* src_rows = yp.data<T>();
    const T* w = weights.data<T>();
    T* dsrc = dyp.data<T>();
    T* dw = dweights.data<T>();
    const int64_t top_k = plan.top_k;
#pragma omp parallel for schedule(static) if (plan.n_tokens * top_k * d > kParallelElements)
    for (int64_t t = 0; t < plan.n_tokens; ++t) {
      const T* gt = g + t * d;
      for (int64_t k = 0; k < top_k; ++k) {
        const int64_t row = row_of[t * top_k + k];
        const T wk = w[t * top_k + k];
        const T* src = src_rows + row * d;
        T* dst = dsrc + row * d;
        // The weight gradient is a length-D dot product: accumulated in double so f32 keeps its accuracy.
        double dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < d; ++j) {
          dst[j] = wk * gt[j];
          dot += static_cast<double>(gt[j]) * static_cast<double>(src[j]);
        }
        dw[t * top_k + k] = static_cast<T>(dot);
      }
    }
  });
}

}  // namespace dsx::ops
