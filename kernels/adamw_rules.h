// How AdamW moments are read and stored, host+device code shared by the CPU op
// (kernels/cpu/adamw.cpp) and the CUDA kernel (kernels/cuda/adamw.cu), so both round the same.
// A moment is kept in the parameter's precision P or in bf16; the update computes in P.
#pragma once
#include <cstdint>
#include <type_traits>

#include "kernels/codecs.h"
#include "kernels/dtype.h"

namespace dsx::adamw_rules {

// double -> bf16 with one correct round-to-nearest-even. Going through float with the usual
// rounding would round twice (a double just above a bf16 tie can land exactly on the tie and
// then go to even, the wrong way); rounding to float with round-to-odd first keeps the
// information that the value was not a tie, and float has enough extra bits (24 >= 8 + 2) for
// the second rounding to be exact.
DSX_HOST_DEVICE uint16_t double_to_bf16_bits(double d) {
  const float f = static_cast<float>(d);
  const bool finite = (codec::float_bits(f) & 0x7f800000u) != 0x7f800000u;
  if (!finite || static_cast<double>(f) == d) return codec::float_to_bf16(f);
  uint32_t u = codec::float_bits(f);
  const double rounded = static_cast<double>(f);
  if ((rounded < 0 ? -rounded : rounded) > (d < 0 ? -d : d)) --u;  // truncate toward zero
  u |= 1u;                                                         // odd marks "inexact"
  return codec::float_to_bf16(codec::bits_float(u));
}

template <class P, class M>
DSX_HOST_DEVICE P load_moment(const M& m) {
  if constexpr (std::is_same_v<M, bf16>) {
    return static_cast<P>(codec::bf16_to_float(m.bits));
  } else {
    return m;
  }
}

// Stores a moment computed in P: rounded once to nearest even when M is bf16.
template <class P, class M>
DSX_HOST_DEVICE void store_moment(M& m, P value) {
  if constexpr (std::is_same_v<M, bf16>) {
    if constexpr (std::is_same_v<P, float>) {
      m.bits = codec::float_to_bf16(value);
    } else {
      m.bits = double_to_bf16_bits(value);
    }
  } else {
    m = value;
  }
}

}  // namespace dsx::adamw_rules
