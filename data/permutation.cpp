#include "data/permutation.h"

#include <stdexcept>

#include "kernels/random.h"

namespace dsx::data {
namespace {

using random::splitmix64;

int bits_for(uint64_t n) {
  int bits = 0;
  while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
  return bits;
}

}  // namespace

uint64_t mix_key(uint64_t a, uint64_t b, uint64_t c) {
  return splitmix64(splitmix64(splitmix64(a) ^ b) ^ c);
}

SeededPermutation::SeededPermutation(uint64_t n, uint64_t key) : n_(n) {
  if (n == 0) throw std::invalid_argument("SeededPermutation: empty domain");
  // Two equal halves of at least one bit each; the domain 4^half_bits_ is < 4n, so cycle
  // walking needs fewer than 4 Feistel evaluations on average.
  const int bits = bits_for(n);
  half_bits_ = bits < 2 ? 1 : (bits + 1) / 2;
  if (half_bits_ > 31) throw std::invalid_argument("SeededPermutation: domain larger than 2^62");
  half_mask_ = (uint64_t{1} << half_bits_) - 1;
  uint64_t k = key;
  for (auto& rk : round_keys_) {
    k = splitmix64(k);
    rk = k;
  }
}

uint64_t SeededPermutation::feistel(uint64_t x) const {
  uint64_t left = x >> half_bits_;
  uint64_t right = x & half_mask_;
  for (uint64_t rk : round_keys_) {
    const uint64_t next_right = left ^ (splitmix64(right ^ rk) & half_mask_);
    left = right;
    right = next_right;
  }
  return (left << half_bits_) | right;
}

uint64_t SeededPermutation::operator()(uint64_t i) const {
  if (i >= n_) throw std::out_of_range("SeededPermutation: index out of range");
  // Cycle walking: the Feistel map is a bijection of the power-of-four domain, so repeatedly
  // applying it from i reaches a value < n (the cycle through i returns to i at worst).
  uint64_t x = feistel(i);
  while (x >= n_) x = feistel(x);
  return x;
}

}  // namespace dsx::data
