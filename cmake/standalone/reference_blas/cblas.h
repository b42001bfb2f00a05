// The part of the CBLAS interface (with OpenBLAS's blasint and thread-count extensions) that
// dsx calls, for the standalone CUDA build on machines without OpenBLAS (DSX_REFERENCE_BLAS,
// cmake/StandaloneDependencies.cmake). Same names, types and semantics as OpenBLAS's <cblas.h>,
// implemented as plain loops in reference_blas.cpp.
#pragma once

#ifdef __cplusplus
extern "C" {
#endif

typedef int blasint;  // 32-bit, as in Debian's OpenBLAS build

typedef enum CBLAS_ORDER { CblasRowMajor = 101, CblasColMajor = 102 } CBLAS_ORDER;
typedef enum CBLAS_TRANSPOSE {
  CblasNoTrans = 111,
  CblasTrans = 112,
  CblasConjTrans = 113,
  CblasConjNoTrans = 114
} CBLAS_TRANSPOSE;
typedef CBLAS_ORDER CBLAS_LAYOUT;

void cblas_sgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, blasint m, blasint n, blasint k,
                 float alpha, const float* a, blasint lda, const float* b, blasint ldb, float beta, float* c,
                 blasint ldc);
void cblas_dgemm(CBLAS_ORDER order, CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, blasint m, blasint n, blasint k,
                 double alpha, const double* a, blasint lda, const double* b, blasint ldb, double beta, double* c,
                 blasint ldc);
void cblas_saxpy(blasint n, float alpha, const float* x, blasint incx, float* y, blasint incy);
void cblas_daxpy(blasint n, double alpha, const double* x, blasint incx, double* y, blasint incy);
void cblas_sscal(blasint n, float alpha, float* x, blasint incx);
void cblas_dscal(blasint n, double alpha, double* x, blasint incx);

// Threads the GEMMs may use (OpenBLAS extension); starts at omp_get_max_threads().
void openblas_set_num_threads(int n);
int openblas_get_num_threads(void);

#ifdef __cplusplus
}
#endif
