// A deterministic synthetic token source with learnable structure, for tests, CI and recipes
// that must run anywhere with no data preparation.
//
// Tokens follow a sparse first-order Markov chain: every token t has `branching` possible
// successors drawn once from the vocabulary (by seed), taken with fixed probabilities that
// decay geometrically. The best achievable loss is therefore known: the entropy of those
// probabilities (entropy_floor()), well below ln(vocab) where an untrained model starts.
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
  int64_t branching = 4;  // successors per token
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
  double entropy_floor() const;  // nats per token
  const SyntheticConfig& config() const { return config_; }

 private:
  SyntheticConfig config_;
  std::vector<int32_t> successors_;  // [vocab, branching]
  std::vector<double> cumulative_;   // [branching] cumulative probabilities
};

}  // namespace dsx::data
