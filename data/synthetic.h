// A deterministic synthetic token source with learnable structure, for tests, CI and recipes
// that must run anywhere with no data preparation.
//
// Tokens follow a sparse Markov chain of order `order`: every context (the previous `order`
// tokens) has `branching` possible successors, fixed by hashing (seed, context, k), taken with
// probabilities ∝ decay^k (decay 1: equally likely). The best achievable loss is therefore
// known: the entropy of those probabilities (entropy_floor()), far below ln(vocab) where an
// untrained model starts. Order > 1 makes attention necessary to reach it.
// Sample g (a window of seq_len + 1 tokens) depends only on (seed, g): the order is defined on
// global sample indices, so it is the same for any number of data-parallel ranks, and the
// position is a single integer (exact resume).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/tensor.h"

namespace dsx::data {

struct SyntheticConfig {
  int64_t vocab_size = 256;
  int64_t seq_len = 64;
  int64_t order = 1;      // tokens of context that determine the successor list
  int64_t branching = 4;  // successors per context
  double decay = 0.5;     // successor k has probability ∝ decay^k
  uint64_t seed = 1234;
};

// One micro-batch of next-token prediction: [rows, seq_len] i32 each. segment_ids is
// undefined for sources without document boundaries.
struct TokenBatch {
  Tensor inputs;
  Tensor targets;
  Tensor segment_ids;
};

class SyntheticSource {
 public:
  explicit SyntheticSource(const SyntheticConfig& config);
  // The window of global sample index g: seq_len + 1 tokens.
  std::vector<int32_t> window(int64_t g) const;
  // Rows [first, first + count) of the global sample sequence as a batch.
  TokenBatch batch(int64_t first, int64_t count) const;
  // Nats per token: exact for order 1; for higher orders the value without successor
  // collisions (an upper bound: a repeated successor only lowers the entropy).
  double entropy_floor() const;
  const SyntheticConfig& config() const { return config_; }

 private:
  int32_t successor(const int32_t* context, size_t k) const;  // context: the previous `order` tokens

  SyntheticConfig config_;
  std::vector<double> cumulative_;  // [branching] cumulative probabilities
};

}  // namespace dsx::data
