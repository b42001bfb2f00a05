// Reference loops for the CBLAS calls dsx makes (cblas.h beside this file). Used only by the
// standalone CUDA build on machines without OpenBLAS (DSX_REFERENCE_BLAS): there the CPU ops
// are references for the GPU tests on small shapes, so these favour obvious correctness over
// speed: one pass per output row, the inner loop over contiguous memory so the compiler
// vectorises it, rows split over OpenMP threads. Sums run in the operand type, as OpenBLAS's do.
#include "cblas.h"

#include <omp.h>

#include <atomic>
#include <cstdint>

namespace {

std::atomic<int> g_threads{0};  // 0: not set yet, use omp_get_max_threads()

int gemm_threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : omp_get_max_threads();
}

// Element (row, col) of op(X) for a row-major X with leading dimension ld.
template <class T>
T element(const T* x, blasint ld, bool trans, int64_t row, int64_t col) {
  return trans ? x[col * ld + row] : x[row * ld + col];
}

// One output row: c_row = alpha · op(A)[i, :] · op(B) + beta · c_row (c_row not read when beta is 0).
template <class T>
void gemm_row(int64_t i, bool ta, bool tb, int64_t n, int64_t k, T alpha, const T* a, blasint lda, const T* b,
              blasint ldb, T beta, T* c_row) {
  for (int64_t j = 0; j < n; ++j) c_row[j] = beta == T(0) ? T(0) : beta * c_row[j];
  if (alpha == T(0)) return;
  if (!tb) {  // rows of B are contiguous: accumulate alpha·A(i,p) times row p of B
    for (int64_t p = 0; p < k; ++p) {
      const T s = alpha * element(a, lda, ta, i, p);
      const T* b_row = b + p * ldb;
      for (int64_t j = 0; j < n; ++j) c_row[j] += s * b_row[j];
    }
    return;
  }
  for (int64_t j = 0; j < n; ++j) {  // op(B)[:, j] is row j of B: a dot product per output
    const T* b_row = b + j * ldb;
    T sum = T(0);
    for (int64_t p = 0; p < k; ++p) sum += element(a, lda, ta, i, p) * b_row[p];
    c_row[j] += alpha * sum;
  }
}

template <class T>
void gemm(CBLAS_ORDER order, CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, blasint m, blasint n, blasint k, T alpha,
          const T* a, blasint lda, const T* b, blasint ldb, T beta, T* c, blasint ldc) {
  if (order == CblasColMajor) {
    // A column-major matrix read row-major is its transpose: Cᵀ = op(B)ᵀ · op(A)ᵀ, row-major.
    gemm<T>(CblasRowMajor, trans_b, trans_a, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
    return;
  }
  if (m <= 0 || n <= 0) return;
  const bool ta = trans_a == CblasTrans || trans_a == CblasConjTrans;
  const bool tb = trans_b == CblasTrans || trans_b == CblasConjTrans;
  const int64_t work = static_cast<int64_t>(m) * n * (k > 0 ? k : 1);
  [[maybe_unused]] const int threads = work >= (int64_t{1} << 15) ? gemm_threads() : 1;  // unused without OpenMP
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t i = 0; i < m; ++i) {
    gemm_row<T>(i, ta, tb, n, k, alpha, a, lda, b, ldb, beta, c + i * ldc);
  }
}

// BLAS strides: a negative increment walks the vector from its far end.
int64_t first_index(blasint n, blasint inc) {
  return inc >= 0 ? 0 : static_cast<int64_t>(1 - n) * inc;
}

template <class T>
void axpy(blasint n, T alpha, const T* x, blasint incx, T* y, blasint incy) {
  if (n <= 0 || alpha == T(0)) return;
  int64_t ix = first_index(n, incx), iy = first_index(n, incy);
  for (blasint i = 0; i < n; ++i, ix += incx, iy += incy) y[iy] += alpha * x[ix];
}

template <class T>
void scal(blasint n, T alpha, T* x, blasint incx) {
  if (n <= 0 || incx <= 0) return;  // BLAS: a non-positive increment leaves x unchanged
  // alpha = 0 writes zeros without reading x (NaN/Inf do not survive), as OpenBLAS 0.3.21 does.
  for (int64_t i = 0, ix = 0; i < n; ++i, ix += incx) x[ix] = alpha == T(0) ? T(0) : alpha * x[ix];
}

}  // namespace

extern "C" {

void cblas_sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, blasint m, blasint n, blasint k,
                 float alpha, const float* a, blasint lda, const float* b, blasint ldb, float beta, float* c,
                 blasint ldc) {
  gemm<float>(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, blasint m, blasint n, blasint k,
                 double alpha, const double* a, blasint lda, const double* b, blasint ldb, double beta, double* c,
                 blasint ldc) {
  gemm<double>(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_saxpy(blasint n, float alpha, const float* x, blasint incx, float* y, blasint incy) {
  axpy<float>(n, alpha, x, incx, y, incy);
}

void cblas_daxpy(blasint n, double alpha, const double* x, blasint incx, double* y, blasint incy) {
  axpy<double>(n, alpha, x, incx, y, incy);
}

void cblas_sscal(blasint n, float alpha, float* x, blasint incx) {
  scal<float>(n, alpha, x, incx);
}

void cblas_dscal(blasint n, double alpha, double* x, blasint incx) {
  scal<double>(n, alpha, x, incx);
}

void openblas_set_num_threads(int n) {
  g_threads.store(n > 0 ? n : 1, std::memory_order_relaxed);
}

int openblas_get_num_threads(void) {
  return gemm_threads();
}

}  // extern "C"
