#pragma once
#include "kernels/tensor.h"

namespace dsx::ops {
// out = silu(gate) * up, silu(g) = g * sigmoid(g). gate, up, out: [N, F].
void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
// dgate, dup [N, F] (overwritten)
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup);
}  // namespace dsx::ops
