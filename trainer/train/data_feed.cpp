#include "trainer/train/data_feed.h"

#include <fmt/core.h>

#include <cmath>

#include "data/loader.h"
#include "data/synthetic.h"
#include "data/tokenizer.h"
#include "kernels/error.h"

namespace dsx {
namespace {

class SyntheticFeed final : public DataFeed {
 public:
  SyntheticFeed(const Recipe& r, int dp_rank, int dp_size)
      : source_({.vocab_size = r.data.synthetic.vocab_size > 0 ? r.data.synthetic.vocab_size : r.model.vocab_size,
                 .seq_len = r.train.seq_len,
                 .order = r.data.synthetic.order,
                 .branching = r.data.synthetic.branching,
                 .decay = r.data.synthetic.decay,
                 .seed = static_cast<uint64_t>(r.data.seed)}),
        micro_batch_(r.train.micro_batch),
        dp_rank_(dp_rank),
        dp_size_(dp_size) {}

  std::vector<Batch> next_step(int64_t global_batch) override {
    const int64_t per_rank = global_batch / dp_size_;
    const int64_t first = consumed_ + dp_rank_ * per_rank;
    std::vector<Batch> out;
    for (int64_t row = 0; row < per_rank; row += micro_batch_) {
      data::TokenBatch b = source_.batch(first + row, micro_batch_);
      out.push_back({std::move(b.inputs), std::move(b.targets), Tensor()});
    }
    consumed_ += global_batch;
    return out;
  }
  nlohmann::json state() const override { return {{"kind", "synthetic"}, {"consumed_samples", consumed_}}; }
  void restore(const nlohmann::json& s) override {
    if (s.value("kind", "") != "synthetic") throw UserError("checkpoint: data state is not from a synthetic source");
    consumed_ = s.at("consumed_samples").get<int64_t>();
  }
  std::string describe() const override {
    return fmt::format("synthetic order-{} Markov chain, vocab {}, {} successors (loss floor {:.3f} nats)",
                       source_.config().order, source_.config().vocab_size, source_.config().branching,
                       source_.entropy_floor());
  }

 private:
  data::SyntheticSource source_;
  int64_t micro_batch_;
  int dp_rank_, dp_size_;
  int64_t consumed_ = 0;
};

class DatasetFeed final : public DataFeed {
 public:
  DatasetFeed(const Recipe& r, int dp_rank, int dp_size) : loader_(config(r, dp_rank, dp_size)) {}

  std::vector<Batch> next_step(int64_t global_batch) override {
    if (global_batch != loader_.config().global_batch) {
      throw UserError("train.batch_ramp: a changing global batch is not supported with data.kind datasets yet");
    }
    data::StepBatch step = loader_.next();
    std::vector<Batch> out;
    for (auto& mb : step.micro_batches) {
      out.push_back({std::move(mb.inputs), std::move(mb.targets), std::move(mb.segment_ids)});
    }
    return out;
  }
  nlohmann::json state() const override {
    return {{"kind", "datasets"}, {"loader", nlohmann::json::parse(loader_.state().to_json())}};
  }
  void restore(const nlohmann::json& s) override {
    if (s.value("kind", "") != "datasets") throw UserError("checkpoint: data state is not from the dataset loader");
    loader_.restore(data::LoaderState::from_json(s.at("loader").dump(), "checkpoint metadata"));
  }
  std::string describe() const override {
    std::string d = "datasets:";
    for (const auto& s : loader_.config().sources) d += fmt::format(" {} (weight {})", s.path, s.weight);
    return d;
  }

 private:
  static data::LoaderConfig config(const Recipe& r, int dp_rank, int dp_size) {
    data::LoaderConfig c;
    for (const auto& s : r.data.sources) c.sources.push_back({s.path, s.weight});
    c.seq_len = r.train.seq_len;
    c.global_batch = r.train.global_batch;
    c.micro_batch = r.train.micro_batch;
    c.dp_rank = dp_rank;
    c.dp_size = dp_size;
    c.seed = static_cast<uint64_t>(r.data.seed);
    c.expected_vocab_size = r.model.vocab_size;
    c.expected_tokenizer_hash = r.data.tokenizer_hash;
    if (c.expected_tokenizer_hash.empty() && !r.data.tokenizer.empty()) {
      c.expected_tokenizer_hash = data::Tokenizer::load(r.data.tokenizer).hash();
    }
    return c;
  }
  data::TokenLoader loader_;
};

}  // namespace

std::unique_ptr<DataFeed> make_data_feed(const Recipe& recipe, int dp_rank, int dp_size) {
  if (recipe.data.kind == DataKind::synthetic) return std::make_unique<SyntheticFeed>(recipe, dp_rank, dp_size);
  return std::make_unique<DatasetFeed>(recipe, dp_rank, dp_size);
}

}  // namespace dsx
