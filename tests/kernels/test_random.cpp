#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <set>
#include <string>

#include "kernels/random.h"

using namespace dsx::random;

namespace {

struct Kat {
  Philox4x32Counter counter;
  Philox4x32Key key;
  uint32_t expected[4];
};

// Moments of n draws of f(i).
template <class F>
void moments(int64_t n, F&& f, double& mean, double& var, double& skew, double& excess_kurtosis) {
  double s1 = 0, s2 = 0, s3 = 0, s4 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double x = f(i);
    s1 += x;
    s2 += x * x;
    s3 += x * x * x;
    s4 += x * x * x * x;
  }
  const double N = static_cast<double>(n);
  mean = s1 / N;
  var = s2 / N - mean * mean;
  const double m3 = s3 / N - 3 * mean * s2 / N + 2 * mean * mean * mean;
  const double m4 = s4 / N - 4 * mean * s3 / N + 6 * mean * mean * s2 / N - 3 * mean * mean * mean * mean;
  skew = m3 / std::pow(var, 1.5);
  excess_kurtosis = m4 / (var * var) - 3;
}

}  // namespace

TEST_CASE("philox4x32-10 matches the Random123 known-answer vectors", "[random]") {
  // Random123 tests/kat_vectors, the three "philox4x32 10" lines: counter[4] key[2] -> result[4].
  const Kat kats[] = {
      {{{0, 0, 0, 0}}, {{0, 0}}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}},
       {{0xffffffffu, 0xffffffffu}},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}},
       {{0xa4093822u, 0x299f31d0u}},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const Kat& kat : kats) {
    const Philox4x32Counter out = philox4x32_10(kat.counter, kat.key);
    for (int i = 0; i < 4; ++i) CHECK(out.v[i] == kat.expected[i]);
  }
  // The (seed, stream, counter) mapping: key = seed words, counter = (counter, stream) words.
  const Philox4x32Counter via_words = philox_words(0x299f31d0a4093822ull, 0x0370734413198a2eull, 0x85a308d3243f6a88ull);
  CHECK(via_words.v[0] == 0xd16cfe09u);
  CHECK(via_words.v[3] == 0x24126ea1u);
}

TEST_CASE("uniform numbers lie strictly inside (0, 1)", "[random]") {
  CHECK(uint_to_unit_float(0u) > 0.0f);
  CHECK(uint_to_unit_float(0xffffffffu) < 1.0f);
  CHECK(uint_to_unit_double(0u, 0u) > 0.0);
  CHECK(uint_to_unit_double(0xffffffffu, 0xffffffffu) < 1.0);
  double mean = 0, var = 0, skew = 0, kurt = 0;
  const int64_t n = 100000;
  moments(
      n, [](int64_t i) { return uniform_double(7, 11, static_cast<uint64_t>(i)); }, mean, var, skew, kurt);
  // U(0,1): mean 1/2 (sampling sd sqrt(1/12/n) ≈ 9e-4), variance 1/12 (sd ≈ 3e-4); ~5 sd margins.
  CHECK(std::abs(mean - 0.5) < 5e-3);
  CHECK(std::abs(var - 1.0 / 12.0) < 1.5e-3);
  moments(
      n, [](int64_t i) { return static_cast<double>(uniform_float(7, 11, static_cast<uint64_t>(i))); }, mean, var, skew,
      kurt);
  CHECK(std::abs(mean - 0.5) < 5e-3);
  CHECK(std::abs(var - 1.0 / 12.0) < 1.5e-3);
}

TEST_CASE("normal numbers have the moments of N(0, 1)", "[random]") {
  const int64_t n = 200000;
  // Sampling sds for n = 2e5: mean 2.2e-3, variance 3.2e-3, skewness 5.5e-3, excess kurtosis
  // 1.1e-2; the bounds are ~4.5-5.5 sd, so a correct generator fails with probability < 1e-5
  // (and the draws are fixed, so the test is deterministic), while a wrong transform (e.g. a
  // uniform, or a missing factor 2 inside the square root) misses them by far.
  double mean = 0, var = 0, skew = 0, kurt = 0;
  moments(
      n, [](int64_t i) { return normal_double(1234, stream_of("w"), static_cast<uint64_t>(i)); }, mean, var, skew,
      kurt);
  CHECK(std::abs(mean) < 0.01);
  CHECK(std::abs(var - 1.0) < 0.015);
  CHECK(std::abs(skew) < 0.03);
  CHECK(std::abs(kurt) < 0.06);
  moments(
      n, [](int64_t i) { return static_cast<double>(normal_float(99, 3, static_cast<uint64_t>(i))); }, mean, var, skew,
      kurt);
  CHECK(std::abs(mean) < 0.01);
  CHECK(std::abs(var - 1.0) < 0.015);
  CHECK(std::abs(skew) < 0.03);
  CHECK(std::abs(kurt) < 0.06);
}

TEST_CASE("draws are a pure function of seed, stream and counter", "[random]") {
  CHECK(normal_double(5, 6, 7) == normal_double(5, 6, 7));
  CHECK(normal_double(5, 6, 7) != normal_double(5, 6, 8));
  CHECK(normal_double(5, 6, 7) != normal_double(5, 9, 7));
  CHECK(normal_double(5, 6, 7) != normal_double(4, 6, 7));
  // the high halves of the 64-bit inputs matter too
  CHECK(uniform_double(5, 6, 7) != uniform_double(5, 6, 7 + (1ull << 32)));
  CHECK(uniform_double(5, 6, 7) != uniform_double(5, 6 + (1ull << 32), 7));
  CHECK(uniform_double(5, 6, 7) != uniform_double(5 + (1ull << 32), 6, 7));
  // distinct parameter names give distinct streams
  std::set<uint64_t> streams;
  for (int layer = 0; layer < 64; ++layer) {
    for (const char* leaf : {"q_a_proj.weight", "kv_a_proj_with_mqa.weight", "o_proj.weight"}) {
      streams.insert(stream_of("model.layers." + std::to_string(layer) + ".self_attn." + leaf));
    }
  }
  CHECK(streams.size() == 64 * 3);
  static_assert(stream_of("") == 0xcbf29ce484222325ull, "FNV-1a offset basis");
  static_assert(stream_of("a") == 0xaf63dc4c8601ec8cull, "FNV-1a of \"a\"");
}
