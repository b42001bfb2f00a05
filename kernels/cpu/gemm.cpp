#include "kernels/ops/gemm.h"

#include <cblas.h>

#include <climits>
#include <string>
#include <type_traits>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"

namespace dsx::ops {
namespace {

// OpenBLAS takes blasint (32-bit in Debian's build) sizes and leading dimensions.
blasint blas_size(int64_t n, std::string_view op) {
  check(n <= static_cast<int64_t>(INT_MAX), op,
        [&] { return "dimension " + std::to_string(n) + " exceeds the BLAS int range"; });
  return static_cast<blasint>(n);
}

// c = beta · c without reading c when beta is 0, so an uninitialised c cannot leak NaN.
template <class T>
void scale_output(T* c, int64_t n, T beta) {
  for (int64_t i = 0; i < n; ++i) c[i] = beta == T(0) ? T(0) : beta * c[i];
}

CBLAS_TRANSPOSE blas_trans(bool t) {
  return t ? CblasTrans : CblasNoTrans;
}

std::string operands(const Tensor& a, const Tensor& b, const Tensor& c) {
  return "a " + a.describe() + ", b " + b.describe() + ", c " + c.describe();
}

}  // namespace

void gemm(bool trans_a, bool trans_b, double alpha, const Tensor& a, const Tensor& b, double beta, Tensor& c) {
  DSX_ROUTE_TO_CUDA(c, gemm(trans_a, trans_b, alpha, a, b, beta, c));
  constexpr std::string_view op = "gemm";
  check_cpu(a, op, "a");
  check_cpu(b, op, "b");
  check_cpu(c, op, "c");
  check(a.ndim() == 2 && b.ndim() == 2 && c.ndim() == 2, op,
        [&] { return "a, b and c must be 2-D, got " + operands(a, b, c); });
  check(a.dtype() == c.dtype() && b.dtype() == c.dtype(), op,
        [&] { return "a, b and c must share one dtype, got " + operands(a, b, c); });
  const int64_t m = trans_a ? a.dim(1) : a.dim(0);
  const int64_t k = trans_a ? a.dim(0) : a.dim(1);
  const int64_t k_b = trans_b ? b.dim(1) : b.dim(0);
  const int64_t n = trans_b ? b.dim(0) : b.dim(1);
  check(k == k_b, op, [&] {
    return "inner dimensions differ: op(a) is [" + std::to_string(m) + ", " + std::to_string(k) + "], op(b) is [" +
           std::to_string(k_b) + ", " + std::to_string(n) + "]";
  });
  check_shape(c, {m, n}, op, "c");
  dispatch_float(c.dtype(), op, [&]<class T>() {
    T* cs = c.data<T>();
    if (m == 0 || n == 0) return;
    if (k == 0) {  // op(a)·op(b) is an empty sum; BLAS implementations disagree on this edge
      scale_output(cs, m * n, static_cast<T>(beta));
      return;
    }
    const blasint bm = blas_size(m, op), bn = blas_size(n, op), bk = blas_size(k, op);
    const blasint lda = blas_size(a.dim(1), op), ldb = blas_size(b.dim(1), op), ldc = bn;
    if constexpr (std::is_same_v<T, float>) {
      cblas_sgemm(CblasRowMajor, blas_trans(trans_a), blas_trans(trans_b), bm, bn, bk, static_cast<float>(alpha),
                  a.data<float>(), lda, b.data<float>(), ldb, static_cast<float>(beta), cs, ldc);
    } else {
      cblas_dgemm(CblasRowMajor, blas_trans(trans_a), blas_trans(trans_b), bm, bn, bk, alpha, a.data<double>(), lda,
                  b.data<double>(), ldb, beta, cs, ldc);
    }
  });
}

}  // namespace dsx::ops
