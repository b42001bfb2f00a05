// Scalar number formats shared by the CPU and CUDA backends.
//
// Everything here is host+device code: the CUDA kernels include this very header, so the
// CPU tests pin down exactly what the GPU computes. All conversions from float round to
// nearest, ties to even. NaN stays NaN in every format (fp8: the canonical code 0x7F / 0x7E,
// sign dropped, as CUDA's conversions do; bf16: a quiet NaN with the input's sign).
//   bf16      1-8-7, same range as fp32.
//   fp8 E4M3  1-4-3, bias 7, max ±448, min normal 2^-6, min subnormal 2^-9; no infinity:
//             finite overflow and ±inf saturate to ±448 (CUDA's __NV_SATFINITE), NaN = S.1111.111.
//   fp8 E5M2  1-5-2, bias 15, max ±57344, min normal 2^-14, min subnormal 2^-16; finite
//             overflow and ±inf saturate to ±57344 (__NV_SATFINITE), NaN = S.11111.1x.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DSX_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DSX_HOST_DEVICE inline
#endif

namespace dsx::codec {

DSX_HOST_DEVICE uint32_t float_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
}

DSX_HOST_DEVICE float bits_float(uint32_t u) {
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}

// ---- bf16 -------------------------------------------------------------------------------
DSX_HOST_DEVICE uint16_t float_to_bf16(float f) {
  const uint32_t u = float_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding_bias) >> 16);
}

DSX_HOST_DEVICE float bf16_to_float(uint16_t b) { return bits_float(static_cast<uint32_t>(b) << 16); }

// ---- fp8 --------------------------------------------------------------------------------
// One encoder for both fp8 formats, parameterised by mantissa bits and exponent bias.
// Normal range: keep the float's top (1 + 8 + M) bits with round-to-nearest-even and rebias
// the exponent; subnormal range: the fp8 grid is uniform (step 2^(1-bias-M)), so scale and
// round to an integer; that count is also the right code when it rounds up to the min normal.
template <int kMantissaBits, int kBias, uint8_t kMaxFinite>
DSX_HOST_DEVICE uint8_t float_to_fp8(float f) {
  const uint32_t u = float_bits(f);
  const uint8_t sign = static_cast<uint8_t>((u >> 24) & 0x80u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {  // NaN -> the canonical positive NaN code, as CUDA's cvt gives
    return static_cast<uint8_t>(kMantissaBits == 3 ? 0x7fu : 0x7eu);
  }
  const uint32_t min_normal_bits = static_cast<uint32_t>(127 + 1 - kBias) << 23;
  uint32_t code;
  if (a >= min_normal_bits) {
    constexpr int kDrop = 23 - kMantissaBits;
    const uint32_t rounded = (a + ((1u << (kDrop - 1)) - 1u) + ((a >> kDrop) & 1u)) >> kDrop;
    code = rounded - (static_cast<uint32_t>(127 - kBias) << kMantissaBits);
    if (code > kMaxFinite) code = kMaxFinite;  // saturate finite overflow and inf
  } else {
    // exact scaling by a power of two, then rint (round-half-even in the default FP mode)
    const float steps = bits_float(a) * bits_float(static_cast<uint32_t>(127 + kBias - 1 + kMantissaBits) << 23);
#if defined(__CUDA_ARCH__)
    code = static_cast<uint32_t>(rintf(steps));
#else
    code = static_cast<uint32_t>(__builtin_rintf(steps));
#endif
  }
  return static_cast<uint8_t>(sign | code);
}

template <int kMantissaBits, int kBias>
DSX_HOST_DEVICE float fp8_to_float(uint8_t b) {
  constexpr int kExpBits = 7 - kMantissaBits;
  constexpr uint32_t kExpMax = (1u << kExpBits) - 1u;
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t exp = (b >> kMantissaBits) & kExpMax;
  const uint32_t man = b & ((1u << kMantissaBits) - 1u);
  if (kMantissaBits == 3 && exp == kExpMax && man == 7u) return bits_float(sign | 0x7fc00000u);
  if (kMantissaBits == 2 && exp == kExpMax) {
    return bits_float(sign | (man == 0 ? 0x7f800000u : 0x7fc00000u));
  }
  if (exp == 0) {  // subnormal: man * 2^(1 - bias - M), exact in float
    const float scale = bits_float(static_cast<uint32_t>(127 + 1 - kBias - kMantissaBits) << 23);
    return bits_float(sign | float_bits(static_cast<float>(man) * scale));
  }
  return bits_float(sign | ((exp - kBias + 127u) << 23) | (man << (23 - kMantissaBits)));
}

DSX_HOST_DEVICE uint8_t float_to_e4m3(float f) { return float_to_fp8<3, 7, 0x7e>(f); }
DSX_HOST_DEVICE float e4m3_to_float(uint8_t b) { return fp8_to_float<3, 7>(b); }
DSX_HOST_DEVICE uint8_t float_to_e5m2(float f) { return float_to_fp8<2, 15, 0x7b>(f); }
DSX_HOST_DEVICE float e5m2_to_float(uint8_t b) { return fp8_to_float<2, 15>(b); }

inline constexpr float kE4M3Max = 448.0f;
inline constexpr float kE5M2Max = 57344.0f;

}  // namespace dsx::codec
