#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// ids [N] (i32|i64, each in [0, V)), table [V, D] -> out [N, D]. Out-of-range ids throw.
void embedding_forward(const Tensor& ids, const Tensor& table, Tensor& out);
// dtable[ids[n], :] += dout[n, :]  (accumulates). Threads split columns, so repeated ids sum
// in token order and the result does not depend on the thread count.
void embedding_backward_weight(const Tensor& ids, const Tensor& dout, Tensor& dtable);
}  // namespace dsx::ops
