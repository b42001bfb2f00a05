// bf16 / fp8 codecs: exhaustive over all fp8 codes, known values, rounding ties, and — when
// the CUDA toolkit's headers are present — bit-equality with CUDA's own host conversions
// (__nv_cvt_float_to_fp8 with __NV_SATFINITE, __float2bfloat16_rn), which are what the GPU
// computes. That comparison is exact: the codecs must agree bit for bit.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>

#include "kernels/codecs.h"

#if defined(DSX_HAVE_CUDA_FP8_HEADER)
#include <cuda_bf16.h>
#include <cuda_fp8.h>
#endif

using namespace dsx::codec;

namespace {
// Reference decoder written from the format definition, independent of the codec's bit tricks.
double decode_reference(uint8_t b, int mantissa_bits, int bias) {
  const int exp_bits = 7 - mantissa_bits;
  const int sign = (b & 0x80) ? -1 : 1;
  const int exp = (b >> mantissa_bits) & ((1 << exp_bits) - 1);
  const int man = b & ((1 << mantissa_bits) - 1);
  const double frac = static_cast<double>(man) / (1 << mantissa_bits);
  if (exp == 0) return sign * frac * std::ldexp(1.0, 1 - bias);
  return sign * (1.0 + frac) * std::ldexp(1.0, exp - bias);
}
bool e4m3_is_nan(uint8_t b) { return (b & 0x7f) == 0x7f; }
bool e5m2_is_special(uint8_t b) { return ((b >> 2) & 0x1f) == 0x1f; }

// Nearest representable value by exhaustive search over codes, ties to the even code:
// the definition of round-to-nearest-even, used to check the encoder on many floats.
uint8_t encode_reference(float f, bool e4m3) {
  const double x = f;
  uint8_t best = 0;
  double best_err = INFINITY;
  for (int c = 0; c < 128; ++c) {
    const uint8_t code = static_cast<uint8_t>(c | (std::signbit(f) ? 0x80 : 0));
    if (e4m3 ? e4m3_is_nan(code) : e5m2_is_special(code)) continue;
    const double v = e4m3 ? decode_reference(code, 3, 7) : decode_reference(code, 2, 15);
    const double err = std::abs(v - x);
    if (err < best_err || (err == best_err && (code & 1) == 0)) {
      best = code;
      best_err = err;
    }
  }
  return best;
}
}  // namespace

TEST_CASE("codecs: E4M3 decodes every code as the format defines", "[codecs]") {
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const auto b = static_cast<uint8_t>(c);
    const float f = e4m3_to_float(b);
    if (e4m3_is_nan(b)) {
      REQUIRE(std::isnan(f));
      ++nans;
      continue;
    }
    REQUIRE(static_cast<double>(f) == decode_reference(b, 3, 7));
    REQUIRE(float_to_e4m3(f) == b);  // every finite code round-trips (incl. -0)
  }
  REQUIRE(nans == 2);  // S.1111.111 only: E4M3 has no infinity
  REQUIRE(e4m3_to_float(0x7e) == 448.0f);
  REQUIRE(e4m3_to_float(0x08) == std::ldexp(1.0f, -6));  // min normal
  REQUIRE(e4m3_to_float(0x01) == std::ldexp(1.0f, -9));  // min subnormal
}

TEST_CASE("codecs: E5M2 decodes every code as the format defines", "[codecs]") {
  for (int c = 0; c < 256; ++c) {
    const auto b = static_cast<uint8_t>(c);
    const float f = e5m2_to_float(b);
    if (e5m2_is_special(b)) {
      if ((b & 3) == 0) {
        REQUIRE(std::isinf(f));
      } else {
        REQUIRE(std::isnan(f));
      }
      continue;
    }
    REQUIRE(static_cast<double>(f) == decode_reference(b, 2, 15));
    REQUIRE(float_to_e5m2(f) == b);
  }
  REQUIRE(e5m2_to_float(0x7b) == 57344.0f);
  REQUIRE(e5m2_to_float(0x04) == std::ldexp(1.0f, -14));
  REQUIRE(e5m2_to_float(0x01) == std::ldexp(1.0f, -16));
}

TEST_CASE("codecs: fp8 encoding rounds to nearest even and saturates", "[codecs]") {
  SECTION("E4M3 known values") {
    REQUIRE(float_to_e4m3(448.0f) == 0x7e);
    REQUIRE(float_to_e4m3(1e9f) == 0x7e);
    REQUIRE(float_to_e4m3(-1e9f) == 0xfe);
    REQUIRE(float_to_e4m3(INFINITY) == 0x7e);  // no infinity: saturate
    REQUIRE(float_to_e4m3(464.0f) == 0x7e);    // tie between 448 and (virtual) 480 -> even code
    REQUIRE(float_to_e4m3(NAN) == 0x7f);
    REQUIRE(float_to_e4m3(-NAN) == 0x7f);
    REQUIRE(float_to_e4m3(std::ldexp(1.0f, -10)) == 0x00);          // half the min subnormal: tie to even 0
    REQUIRE(float_to_e4m3(std::ldexp(1.5f, -10)) == 0x01);          // above the tie
    REQUIRE(float_to_e4m3(std::ldexp(3.0f, -10)) == 0x02);          // 1.5 subnormal steps: tie to even 2
    REQUIRE(float_to_e4m3(1.0625f) == float_to_e4m3(1.0f));         // tie 1 | 1.125 -> even (1.0)
    REQUIRE(float_to_e4m3(1.1875f) == float_to_e4m3(1.25f));        // tie 1.125 | 1.25 -> even (1.25)
  }
  SECTION("E5M2 known values") {
    REQUIRE(float_to_e5m2(57344.0f) == 0x7b);
    REQUIRE(float_to_e5m2(1e9f) == 0x7b);
    REQUIRE(float_to_e5m2(-INFINITY) == 0xfb);
    REQUIRE(e5m2_is_special(float_to_e5m2(NAN)));
    REQUIRE(std::isnan(e5m2_to_float(float_to_e5m2(NAN))));
  }
  SECTION("against exhaustive nearest-even search on random floats across the ranges") {
    std::mt19937 gen(7);
    std::uniform_real_distribution<float> exponent(-20.0f, 18.0f);
    std::uniform_real_distribution<float> mantissa(1.0f, 2.0f);
    for (int i = 0; i < 20000; ++i) {
      float f = std::ldexp(mantissa(gen), static_cast<int>(exponent(gen)));
      if (i % 2) f = -f;
      const bool in_e4m3 = std::abs(f) <= 448.0f;
      if (in_e4m3) REQUIRE(float_to_e4m3(f) == encode_reference(f, true));
      if (std::abs(f) <= 57344.0f) REQUIRE(float_to_e5m2(f) == encode_reference(f, false));
    }
  }
}

TEST_CASE("codecs: bf16 rounds to nearest even and keeps NaN", "[codecs]") {
  REQUIRE(float_to_bf16(1.0f) == 0x3f80);
  REQUIRE(float_to_bf16(1.0f + std::ldexp(1.0f, -8)) == 0x3f80);   // tie -> even
  REQUIRE(float_to_bf16(1.0f + 3 * std::ldexp(1.0f, -8)) == 0x3f82);  // tie -> even (up)
  REQUIRE(float_to_bf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)) == 0x3f81);
  REQUIRE(float_to_bf16(INFINITY) == 0x7f80);
  REQUIRE(float_to_bf16(3.4e38f) == 0x7f80);  // rounds past the max finite bf16 to inf
  REQUIRE(std::isnan(bf16_to_float(float_to_bf16(NAN))));
  REQUIRE(std::isnan(bf16_to_float(float_to_bf16(-NAN))));
  for (uint32_t b = 0; b < 0x10000; ++b) {  // every bf16 value round-trips exactly
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    if (!std::isnan(f)) REQUIRE(float_to_bf16(f) == b);
  }
}

#if defined(DSX_HAVE_CUDA_FP8_HEADER)
TEST_CASE("codecs: bit-identical to CUDA's host conversions", "[codecs][cuda_reference]") {
  std::mt19937 gen(11);
  std::uniform_int_distribution<uint32_t> bits;
  auto check_one = [](float f) {
    REQUIRE(float_to_e4m3(f) == __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E4M3));
    const uint8_t e5 = float_to_e5m2(f);
    const uint8_t cu5 = __nv_cvt_float_to_fp8(f, __NV_SATFINITE, __NV_E5M2);
    if (std::isnan(f)) {
      REQUIRE(std::isnan(e5m2_to_float(e5)));
      REQUIRE(std::isnan(e5m2_to_float(cu5)));
    } else {
      REQUIRE(e5 == cu5);
    }
    const __nv_bfloat16 b = __float2bfloat16_rn(f);
    uint16_t cb;
    std::memcpy(&cb, &b, 2);
    if (!std::isnan(f)) REQUIRE(float_to_bf16(f) == cb);
  };
  for (int i = 0; i < 200000; ++i) check_one(bits_float(bits(gen)));  // every exponent range
  for (float f : {0.0f, -0.0f, 448.0f, 464.0f, 465.0f, 57344.0f, 61440.0f, INFINITY, -INFINITY, 1e-30f}) check_one(f);
  for (int c = 0; c < 256; ++c) {  // decoding too
    const auto b = static_cast<uint8_t>(c);
    const __half_raw h4 = __nv_cvt_fp8_to_halfraw(b, __NV_E4M3);
    const __half_raw h5 = __nv_cvt_fp8_to_halfraw(b, __NV_E5M2);
    const float f4 = __half2float(__half(h4));
    const float f5 = __half2float(__half(h5));
    if (std::isnan(f4)) {
      REQUIRE(std::isnan(e4m3_to_float(b)));
    } else {
      REQUIRE(e4m3_to_float(b) == f4);
    }
    if (std::isnan(f5)) {
      REQUIRE(std::isnan(e5m2_to_float(b)));
    } else {
      REQUIRE(e5m2_to_float(b) == f5);
    }
  }
}
#endif
