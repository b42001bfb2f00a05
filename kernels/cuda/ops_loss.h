// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
// cross_entropy.h (cross_entropy.cu).
#pragma once
#include <cstdint>

#include "kernels/ops/cross_entropy.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

ops::CrossEntropyResult cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t ignore_index,
                                              Tensor& lse);
void cross_entropy_backward(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index,
                            double scale, Tensor& dlogits);
void token_logprobs(const Tensor& logits, const Tensor& targets, const Tensor& lse, int64_t ignore_index, Tensor& logp,
                    Tensor& entropy);
void cross_entropy_backward_weighted(const Tensor& logits, const Tensor& targets, const Tensor& lse,
                                     int64_t ignore_index, const Tensor& row_scale, Tensor& dlogits);

}  // namespace dsx::cuda
