// Seeded permutations of [0, n) that cost O(1) memory and O(1) time per element, so a loader
// can shuffle billions of windows per epoch without materialising the order. Used by the
// token loader (windows) and the prompt loader (prompts).
#pragma once
#include <cstdint>

namespace dsx::data {

// A bijection on [0, n) chosen by `key`: a balanced Feistel network over the smallest
// power-of-four domain holding n, with cycle walking to stay inside [0, n).
class SeededPermutation {
 public:
  SeededPermutation(uint64_t n, uint64_t key);
  uint64_t operator()(uint64_t i) const;  // i < n
  uint64_t size() const { return n_; }

 private:
  uint64_t feistel(uint64_t x) const;
  static constexpr int kRounds = 6;
  uint64_t n_;
  int half_bits_;
  uint64_t half_mask_;
  uint64_t round_keys_[kRounds];
};

// A 64-bit mix of several values (splitmix64 finaliser chained): derives independent keys
// such as (seed, source, epoch) -> permutation key.
uint64_t mix_key(uint64_t a, uint64_t b, uint64_t c = 0);

}  // namespace dsx::data
