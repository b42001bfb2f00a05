// Host helpers shared by the GEMM launchers (gemm.cu, gemm_fp8.cu); not part of the op API.
#pragma once
#include <cublasLt.h>

#include <string_view>

#include "kernels/tensor.h"

namespace dsx::cuda::gemm_detail {

// The cuBLAS data type of a dsx dtype (f32, f64, bf16, fp8_e4m3).
cudaDataType_t cuda_type(DType t);

// c = beta · c (f32 or f64) without reading c when beta is 0: the empty sum of K = 0.
void scale_output(Tensor& c, double beta);

// c [M, N] = alpha · op(a) · op(b) + beta · c on row-major device tensors through cuBLASLt,
// M, N, K > 0 and shapes already checked. alpha and beta are passed as the compute type's
// scale type (double for CUBLAS_COMPUTE_64F, float otherwise).
void row_major_gemm(bool trans_a, const Tensor& a, bool trans_b, const Tensor& b, Tensor& c,
                    cublasComputeType_t compute, double alpha, double beta);

}  // namespace dsx::cuda::gemm_detail
