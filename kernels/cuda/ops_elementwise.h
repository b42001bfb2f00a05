// CUDA ops of this group: declarations with the same signatures as kernels/ops/*.h.
// elementwise.h (elementwise.cu), embedding.h (embedding.cu), swiglu.h (swiglu.cu) and
// rope.h (rope.cu): the gather, elementwise and rotation ops of the activations.
#pragma once
#include <cstdint>

#include "kernels/ops/rope.h"
#include "kernels/tensor.h"

namespace dsx::cuda {

void add_(Tensor& y, const Tensor& x, double alpha = 1.0);
void scale_(Tensor& y, double alpha);
void copy_columns(const Tensor& x, int64_t begin, Tensor& out);
void set_columns(Tensor& dst, int64_t begin, const Tensor& src, bool accumulate = false);

void embedding_forward(const Tensor& ids, const Tensor& table, Tensor& out);
void embedding_backward_weight(const Tensor& ids, const Tensor& dout, Tensor& dtable);

void swiglu_forward(const Tensor& gate, const Tensor& up, Tensor& out);
void swiglu_backward(const Tensor& gate, const Tensor& up, const Tensor& dout, Tensor& dgate, Tensor& dup);

void rope_forward(const Tensor& x, const Tensor& positions, const ops::RopeTable& table, Tensor& out);
void rope_backward(const Tensor& dout, const Tensor& positions, const ops::RopeTable& table, Tensor& dx);

}  // namespace dsx::cuda
