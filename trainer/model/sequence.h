// What every module of one micro-batch shares about its token layout.
#pragma once
#include <cstdint>

#include "kernels/ops/rope.h"
#include "kernels/tensor.h"

namespace dsx {

// Tokens are laid out [batch, seq_len] row-major, T = batch · seq_len rows in every activation.
struct SequenceInfo {
  int64_t batch = 0;
  int64_t seq_len = 0;
  Tensor positions;     // [T] i32: index of each token in its sequence (the RoPE position)
  Tensor segment_ids;   // [batch, seq_len] document ids for masked attention, or undefined
  ops::RopeTable rope;  // covers positions < seq_len, in the compute dtype
  int64_t tokens() const { return batch * seq_len; }
};

}  // namespace dsx
