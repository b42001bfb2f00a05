// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
#pragma once
#include "kernels/ops/fp8.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

using ops::Fp8Matrix;
using ops::Fp8QuantOptions;
using ops::Fp8Scaling;

// Bit-identical to the CPU ops (data and scales): both use kernels/fp8_quant_rules.h.
void fp8_quantize(const Tensor& x, Fp8Matrix& q, const Fp8QuantOptions& options = {});
void fp8_quantize_transposed(const Tensor& x, Fp8Matrix& qt, const Fp8QuantOptions& options = {});
void fp8_dequantize(const Fp8Matrix& q, Tensor& x);
Fp8Matrix fp8_transpose_blocks(const Fp8Matrix& w);

}  // namespace dsx::cuda
