// The pre-training token loader: packing, shuffling, blending, DP sharding, prefetch, resume.
//
// Each source's token stream (all documents, EOS-terminated, back to back) is cut into
// windows of seq_len + 1 tokens that start every seq_len tokens (neighbours share one token),
// so every token after the first is a prediction target exactly once per epoch; the at most
// seq_len - 1 tokens after the last full window are not used. Document boundaries stay
// visible through per-token segment ids.
//
// The order is defined on global sample indices g = 0, 1, 2, ... and does not depend on the
// number of data-parallel ranks:
//   * blending: g goes to the source whose share is furthest behind its weight (largest
//     w_s * (g + 1) - taken_s, ties to the lower index; weights normalised to sum 1). After n
//     samples no source is ahead of w_s * n by a whole sample, hence none is behind by
//     k - 1 samples or more (k sources); with two sources both are within one sample;
//   * the k-th sample a source gives is window perm_{seed, source, epoch}(k mod windows) with
//     epoch = k / windows: a fresh seeded permutation every epoch of that source;
//   * step t uses global samples [t * global_batch, (t + 1) * global_batch) and DP rank r takes
//     the contiguous slice [r * global_batch / dp_size, (r + 1) * global_batch / dp_size).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/tensor.h"

namespace dsx::data {

struct DataSource {
  std::string path;  // a dataset directory (see data/dataset.h)
  double weight = 1.0;
};

struct LoaderConfig {
  std::vector<DataSource> sources;
  int64_t seq_len = 0;
  int64_t global_batch = 0;  // sequences per optimizer step over all DP ranks
  int64_t micro_batch = 0;   // sequences per forward/backward on one rank
  int dp_rank = 0;
  int dp_size = 1;
  uint64_t seed = 0;
  // Checks against the model (0 / empty: not checked): a dataset whose vocabulary is larger
  // than the model's, or that was tokenized by another tokenizer, is refused.
  int64_t expected_vocab_size = 0;
  std::string expected_tokenizer_hash;
  int prefetch_steps = 2;  // steps prepared ahead by a background thread; 0: no thread
};

// One forward/backward's worth of this rank's data. All i32 [micro_batch, seq_len] on the CPU:
// targets[b][t] = inputs[b][t + 1] of the packed window; segment_ids number the documents
// within each row from 0 (the id of inputs[b][t]'s document).
struct MicroBatch {
  Tensor inputs;
  Tensor targets;
  Tensor segment_ids;
};

struct StepBatch {
  int64_t step = 0;                 // 0-based optimizer step this batch belongs to
  int64_t first_global_sample = 0;  // global index of this rank's first row in the step
  std::vector<MicroBatch> micro_batches;
};

// Where the loader stands: enough to continue exactly, on any number of DP ranks.
struct LoaderState {
  static constexpr int kVersion = 1;
  struct Source {
    double weight = 0;    // normalised blending weight
    int64_t windows = 0;  // windows per epoch of this source
    int64_t taken = 0;    // samples taken from this source so far (epoch = taken / windows)
    bool operator==(const Source&) const = default;
  };
  uint64_t seed = 0;
  int64_t seq_len = 0;
  int64_t consumed_samples = 0;  // global samples handed out in completed steps
  int64_t steps = 0;             // completed steps
  std::vector<Source> sources;

  bool operator==(const LoaderState&) const = default;
  std::string to_json() const;
  // `origin` names where the text came from (a checkpoint file) for error messages.
  static LoaderState from_json(std::string_view text, const std::string& origin);
};

class TokenLoader {
 public:
  // Opens and checks every source. UserError on bad sources or an inconsistent config.
  explicit TokenLoader(LoaderConfig config);
  ~TokenLoader();
  TokenLoader(const TokenLoader&) = delete;
  TokenLoader& operator=(const TokenLoader&) = delete;

  // This rank's part of the next step: global_batch / dp_size rows in micro-batches.
  StepBatch next();
  // The position after the last step next() returned.
  LoaderState state() const;
  // Continues from `state` (taken on any dp_size with the same sources, seq_len and seed).
  void restore(const LoaderState& state);

  const LoaderConfig& config() const;
  int64_t micro_batches_per_step() const;
  int64_t windows_per_epoch(size_t source) const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsx::data
