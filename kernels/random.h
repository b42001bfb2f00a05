// Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel Random Numbers: As
// Easy as 1, 2, 3", SC11), host+device code like the codecs.
//
// A counter-based generator has no state: the numbers are a pure function of
// (seed, stream, counter). dsx keys every random draw that must not depend on the parallel
// layout that way: parameter initialisation uses stream = hash of the parameter's name and
// counter = the global element index, so any rank can compute any element of any tensor.
//
// Mapping onto Philox: key = seed (two 32-bit words, low first); counter words =
// (counter low, counter high, stream low, stream high). One Philox call gives four 32-bit
// words; the helpers below turn one call into one uniform or one normal number, so the
// number for a given (seed, stream, counter) never depends on how many others were drawn.
// The integer and uniform results are bit-identical on host and device; the normal ones go
// through log/sqrt/cos, whose last bit may differ between libm and CUDA's math library.
#pragma once
#include <cmath>
#include <cstdint>
#include <string_view>

#include "kernels/codecs.h"  // DSX_HOST_DEVICE

namespace dsx::random {

struct Philox4x32Counter {
  uint32_t v[4];
};
struct Philox4x32Key {
  uint32_t v[2];
};

inline constexpr uint32_t kPhiloxM0 = 0xD2511F53u;  // multipliers of the two Feistel lanes
inline constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
inline constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;  // key schedule (golden ratio, sqrt(3) - 1)
inline constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

DSX_HOST_DEVICE void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(product >> 32);
  lo = static_cast<uint32_t>(product);
}

DSX_HOST_DEVICE Philox4x32Counter philox_round(Philox4x32Counter c, Philox4x32Key k) {
  uint32_t hi0, lo0, hi1, lo1;
  philox_mulhilo(kPhiloxM0, c.v[0], hi0, lo0);
  philox_mulhilo(kPhiloxM1, c.v[2], hi1, lo1);
  return Philox4x32Counter{{hi1 ^ c.v[1] ^ k.v[0], lo1, hi0 ^ c.v[3] ^ k.v[1], lo0}};
}

// The Philox4x32 bijection with 10 rounds (the Random123 default, Crush-resistant).
DSX_HOST_DEVICE Philox4x32Counter philox4x32_10(Philox4x32Counter counter, Philox4x32Key key) {
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      key.v[0] += kPhiloxW0;
      key.v[1] += kPhiloxW1;
    }
    counter = philox_round(counter, key);
  }
  return counter;
}

// The four 32-bit words for (seed, stream, counter).
DSX_HOST_DEVICE Philox4x32Counter philox_words(uint64_t seed, uint64_t stream, uint64_t counter) {
  const Philox4x32Counter c{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                             static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)}};
  const Philox4x32Key k{{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)}};
  return philox4x32_10(c, k);
}

// A 32-bit word to a float in (0, 1): the top 23 bits, offset by half a step, so 0 and 1 are
// never returned (the normal transform takes a logarithm). 23, not 24, bits: with 24 the largest
// value 1 - 2^-25 is not a float and would round to 1.
DSX_HOST_DEVICE float uint_to_unit_float(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * (1.0f / 8388608.0f);
}
// Two words to a double in (0, 1) with 52 random bits, offset by half a step likewise.
DSX_HOST_DEVICE double uint_to_unit_double(uint32_t lo, uint32_t hi) {
  const uint64_t bits = ((static_cast<uint64_t>(hi) << 32) | lo) >> 12;
  return (static_cast<double>(bits) + 0.5) * (1.0 / 4503599627370496.0);
}

DSX_HOST_DEVICE float uniform_float(uint64_t seed, uint64_t stream, uint64_t counter) {
  return uint_to_unit_float(philox_words(seed, stream, counter).v[0]);
}
DSX_HOST_DEVICE double uniform_double(uint64_t seed, uint64_t stream, uint64_t counter) {
  const Philox4x32Counter w = philox_words(seed, stream, counter);
  return uint_to_unit_double(w.v[0], w.v[1]);
}

// Standard normal numbers by the Box-Muller transform of the call's words: z = sqrt(-2 ln u1)
// cos(2π u2). (The sine partner is dropped so that each counter gives exactly one number.)
DSX_HOST_DEVICE float normal_float(uint64_t seed, uint64_t stream, uint64_t counter) {
  const Philox4x32Counter w = philox_words(seed, stream, counter);
  const float u1 = uint_to_unit_float(w.v[0]);
  const float u2 = uint_to_unit_float(w.v[1]);
  return sqrtf(-2.0f * logf(u1)) * cosf(6.2831853071795864769f * u2);
}
DSX_HOST_DEVICE double normal_double(uint64_t seed, uint64_t stream, uint64_t counter) {
  const Philox4x32Counter w = philox_words(seed, stream, counter);
  const double u1 = uint_to_unit_double(w.v[0], w.v[1]);
  const double u2 = uint_to_unit_double(w.v[2], w.v[3]);
  return sqrt(-2.0 * log(u1)) * cos(6.283185307179586476925 * u2);
}

// A 64-bit stream key from a name (FNV-1a): parameters are keyed by their Hugging Face name.
constexpr uint64_t stream_of(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (char c : name) {
    h ^= static_cast<uint8_t>(c);
    h *= 0x100000001b3ull;
  }
  return h;
}

// SplitMix64: a fast, well-mixed 64-bit hash for deriving independent seeds from indices
// (data order, synthetic streams). Not a substitute for Philox where streams must be long.
DSX_HOST_DEVICE uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace dsx::random
