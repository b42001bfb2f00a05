#include "data/loader.h"

#include <fmt/core.h>

#include <cmath>
#include <condition_variable>
#include <deque>
#include <exception>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "data/dataset.h"
#include "data/permutation.h"
#include "kernels/error.h"

namespace dsx::data {
using json = nlohmann::json;

// =========================================================================================
// LoaderState <-> JSON

std::string LoaderState::to_json() const {
  json doc{{"version", kVersion}, {"seed", seed},
           {"seq_len", seq_len},  {"consumed_samples", consumed_samples},
           {"steps", steps},      {"sources", json::array()}};
  for (const auto& s : sources) {
    // "epoch" is derived (taken / windows) and written for people reading a checkpoint.
    doc["sources"].push_back({{"weight", s.weight},
                              {"windows", s.windows},
                              {"taken", s.taken},
                              {"epoch", s.windows > 0 ? s.taken / s.windows : 0}});
  }
  return doc.dump();
}

namespace {

template <class T>
T state_field(const json& obj, const char* key, const std::string& origin) {
  auto it = obj.find(key);
  if (it == obj.end()) throw UserError(fmt::format("{}: loader state lacks '{}'", origin, key));
  const bool ok = std::is_floating_point_v<T> ? it->is_number() : it->is_number_integer();
  if (!ok) throw UserError(fmt::format("{}: loader state field '{}' has the wrong type", origin, key));
  return it->get<T>();
}

}  // namespace

LoaderState LoaderState::from_json(std::string_view text, const std::string& origin) {
  json doc;
  try {
    doc = json::parse(text);
  } catch (const json::parse_error& e) {
    throw UserError(fmt::format("{}: loader state is not valid JSON: {}", origin, e.what()));
  }
  if (!doc.is_object()) throw UserError(fmt::format("{}: loader state must be a JSON object", origin));
  const int version = state_field<int>(doc, "version", origin);
  if (version > kVersion) {
    throw UserError(fmt::format("{}: loader state version {} is newer than the version {} this dsx reads", origin,
                                version, kVersion));
  }
  LoaderState state;
  state.seed = state_field<uint64_t>(doc, "seed", origin);
  state.seq_len = state_field<int64_t>(doc, "seq_len", origin);
  state.consumed_samples = state_field<int64_t>(doc, "consumed_samples", origin);
  state.steps = state_field<int64_t>(doc, "steps", origin);
  auto sources = doc.find("sources");
  if (sources == doc.end() || !sources->is_array()) {
    throw UserError(fmt::format("{}: loader state lacks the 'sources' list", origin));
  }
  for (const json& s : *sources) {
    if (!s.is_object()) throw UserError(fmt::format("{}: loader state 'sources' entries must be objects", origin));
    state.sources.push_back({state_field<double>(s, "weight", origin), state_field<int64_t>(s, "windows", origin),
                             state_field<int64_t>(s, "taken", origin)});
  }
  return state;
}

// =========================================================================================
// TokenLoader

namespace {

// The loader's position: a pure function of how many global samples were handed out.
struct Cursor {
  int64_t consumed_samples = 0;
  int64_t steps = 0;
  std::vector<int64_t> taken;  // per source
};

void check_config(const LoaderConfig& c) {
  if (c.sources.empty()) throw UserError("data.sources: at least one dataset is needed");
  for (size_t i = 0; i < c.sources.size(); ++i) {
    const double w = c.sources[i].weight;
    if (!(w > 0) || !std::isfinite(w)) {
      throw UserError(fmt::format("data.sources[{}].weight: {} must be a positive number", i, w));
    }
  }
  if (c.seq_len < 1) throw UserError(fmt::format("seq_len {} must be at least 1", c.seq_len));
  if (c.dp_size < 1) throw UserError(fmt::format("DP size {} must be at least 1", c.dp_size));
  if (c.dp_rank < 0 || c.dp_rank >= c.dp_size) {
    throw UserError(fmt::format("DP rank {} is outside 0..{}", c.dp_rank, c.dp_size - 1));
  }
  if (c.global_batch < 1 || c.global_batch % c.dp_size != 0) {
    throw UserError(
        fmt::format("global batch {} must be a positive multiple of the DP size {}", c.global_batch, c.dp_size));
  }
  const int64_t per_rank = c.global_batch / c.dp_size;
  if (c.micro_batch < 1 || per_rank % c.micro_batch != 0) {
    throw UserError(fmt::format("micro batch {} must divide the {} sequences per DP rank (global batch {} / DP {})",
                                c.micro_batch, per_rank, c.global_batch, c.dp_size));
  }
  if (c.prefetch_steps < 0) throw UserError("prefetch_steps must not be negative");
}

void check_identity_against_model(const TokenDataset& d, const LoaderConfig& c, const TokenDataset& first) {
  const TokenizerIdentity& id = d.identity();
  if (c.expected_vocab_size > 0 && id.vocab_size > c.expected_vocab_size) {
    throw UserError(fmt::format("'{}': the dataset's vocabulary has {} tokens, more than the model's vocab_size {}",
                                d.dir(), id.vocab_size, c.expected_vocab_size));
  }
  if (!c.expected_tokenizer_hash.empty() && id.tokenizer_hash != c.expected_tokenizer_hash) {
    throw UserError(fmt::format("'{}': tokenized with tokenizer hash {}, but the run's tokenizer has hash {}", d.dir(),
                                id.tokenizer_hash, c.expected_tokenizer_hash));
  }
  if (id.tokenizer_hash != first.identity().tokenizer_hash) {
    throw UserError(
        fmt::format("'{}': tokenized with tokenizer hash {}, but '{}' with {}; blended datasets must "
                    "share one tokenizer",
                    d.dir(), id.tokenizer_hash, first.dir(), first.identity().tokenizer_hash));
  }
}

}  // namespace

struct TokenLoader::Impl {
  LoaderConfig config;
  std::vector<TokenDataset> datasets;
  std::vector<double> weights;  // normalised to sum 1
  std::vector<int64_t> windows;
  int64_t rows_per_rank = 0;

  // Prefetch: the producer thread owns `producer`; everything else is under `mutex`.
  mutable std::mutex mutex;
  std::condition_variable ready;
  std::condition_variable space;
  std::deque<std::pair<StepBatch, Cursor>> queue;  // prepared steps with the cursor after each
  Cursor producer;
  Cursor consumed;
  std::exception_ptr error;
  bool stop = false;
  std::thread thread;

  size_t pick_source(int64_t global_sample, const std::vector<int64_t>& taken) const {
    size_t best = 0;
    double best_deficit = -1e300;
    for (size_t s = 0; s < weights.size(); ++s) {
      const double deficit = weights[s] * static_cast<double>(global_sample + 1) - static_cast<double>(taken[s]);
      if (deficit > best_deficit) {
        best_deficit = deficit;
        best = s;
      }
    }
    return best;
  }

  // Writes the k-th sample of source s into one row of inputs/targets/segment ids.
  void fill_row(size_t s, int64_t k, int32_t* inputs, int32_t* targets, int32_t* segments, std::vector<TokenId>& tokens,
                std::vector<int32_t>& segment_buf) const {
    const int64_t L = config.seq_len;
    const int64_t epoch = k / windows[s];
    const SeededPermutation perm(static_cast<uint64_t>(windows[s]), mix_key(config.seed, s, epoch));
    const int64_t window = static_cast<int64_t>(perm(static_cast<uint64_t>(k % windows[s])));
    const TokenDataset& d = datasets[s];
    d.read(window * L, tokens, segment_buf);
    const int64_t vocab = d.identity().vocab_size;
    for (int64_t t = 0; t <= L; ++t) {
      if (static_cast<int64_t>(tokens[t]) >= vocab) {
        throw UserError(fmt::format("'{}': token id {} at position {} is outside the dataset's vocabulary of {}",
                                    d.dir(), tokens[t], window * L + t, vocab));
      }
    }
    for (int64_t t = 0; t < L; ++t) {
      inputs[t] = static_cast<int32_t>(tokens[t]);
      targets[t] = static_cast<int32_t>(tokens[t + 1]);
      segments[t] = segment_buf[t];
    }
  }

  // Prepares the step at `c` for this rank and advances `c` past it.
  StepBatch produce(Cursor& c) const {
    const int64_t first_row = config.dp_rank * rows_per_rank;
    std::vector<std::pair<size_t, int64_t>> rows(static_cast<size_t>(rows_per_rank));
    // Every rank walks the whole global batch so all ranks agree on the blending counters.
    for (int64_t i = 0; i < config.global_batch; ++i) {
      const size_t s = pick_source(c.consumed_samples + i, c.taken);
      const int64_t k = c.taken[s]++;
      if (i >= first_row && i < first_row + rows_per_rank) rows[static_cast<size_t>(i - first_row)] = {s, k};
    }
    StepBatch batch;
    batch.step = c.steps;
    batch.first_global_sample = c.consumed_samples + first_row;
    c.consumed_samples += config.global_batch;
    c.steps += 1;

    const int64_t L = config.seq_len;
    const int64_t mb = config.micro_batch;
    std::vector<TokenId> tokens(static_cast<size_t>(L + 1));
    std::vector<int32_t> segment_buf(static_cast<size_t>(L + 1));
    for (int64_t m = 0; m < rows_per_rank / mb; ++m) {
      MicroBatch micro{Tensor::empty({mb, L}, DType::i32), Tensor::empty({mb, L}, DType::i32),
                       Tensor::empty({mb, L}, DType::i32)};
      for (int64_t r = 0; r < mb; ++r) {
        const auto [s, k] = rows[static_cast<size_t>(m * mb + r)];
        fill_row(s, k, micro.inputs.data<int32_t>() + r * L, micro.targets.data<int32_t>() + r * L,
                 micro.segment_ids.data<int32_t>() + r * L, tokens, segment_buf);
      }
      batch.micro_batches.push_back(std::move(micro));
    }
    return batch;
  }

  void run_producer() {
    try {
      for (;;) {
        {
          std::unique_lock lock(mutex);
          space.wait(lock, [&] { return stop || queue.size() < static_cast<size_t>(config.prefetch_steps); });
          if (stop) return;
        }
        StepBatch batch = produce(producer);
        {
          std::lock_guard lock(mutex);
          if (stop) return;
          queue.emplace_back(std::move(batch), producer);
        }
        ready.notify_one();
      }
    } catch (...) {
      std::lock_guard lock(mutex);
      error = std::current_exception();
      ready.notify_all();
    }
  }

  void start_producer() {
    if (thread.joinable()) return;
    stop = false;
    producer = consumed;
    thread = std::thread([this] { run_producer(); });
  }

  void stop_producer() {
    {
      std::lock_guard lock(mutex);
      stop = true;
    }
    space.notify_all();
    if (thread.joinable()) thread.join();
    queue.clear();
    error = nullptr;
  }

  StepBatch next() {
    if (config.prefetch_steps == 0) {
      Cursor c = consumed;
      StepBatch batch = produce(c);
      consumed = std::move(c);
      return batch;
    }
    if (!thread.joinable() && !error) start_producer();
    std::unique_lock lock(mutex);
    ready.wait(lock, [&] { return !queue.empty() || error; });
    if (queue.empty()) std::rethrow_exception(error);
    auto [batch, after] = std::move(queue.front());
    queue.pop_front();
    consumed = std::move(after);
    lock.unlock();
    space.notify_one();
    return batch;
  }
};

TokenLoader::TokenLoader(LoaderConfig config) : impl_(std::make_unique<Impl>()) {
  check_config(config);
  Impl& im = *impl_;
  double total_weight = 0;
  for (const auto& s : config.sources) total_weight += s.weight;
  for (const auto& s : config.sources) {
    TokenDataset d = TokenDataset::open(s.path);
    check_identity_against_model(d, config, im.datasets.empty() ? d : im.datasets.front());
    const int64_t windows = (d.tokens() - 1) / config.seq_len;
    if (windows < 1) {
      throw UserError(fmt::format("'{}': holds {} tokens, too few for one window of seq_len + 1 = {}", d.dir(),
                                  d.tokens(), config.seq_len + 1));
    }
    im.windows.push_back(windows);
    im.weights.push_back(s.weight / total_weight);
    im.datasets.push_back(std::move(d));
  }
  im.rows_per_rank = config.global_batch / config.dp_size;
  im.consumed.taken.assign(config.sources.size(), 0);
  im.config = std::move(config);
}

TokenLoader::~TokenLoader() {
  impl_->stop_producer();
}

StepBatch TokenLoader::next() {
  return impl_->next();
}

LoaderState TokenLoader::state() const {
  std::lock_guard lock(impl_->mutex);
  const Cursor& c = impl_->consumed;
  LoaderState state;
  state.seed = impl_->config.seed;
  state.seq_len = impl_->config.seq_len;
  state.consumed_samples = c.consumed_samples;
  state.steps = c.steps;
  for (size_t s = 0; s < c.taken.size(); ++s)
    state.sources.push_back({impl_->weights[s], impl_->windows[s], c.taken[s]});
  return state;
}

void TokenLoader::restore(const LoaderState& state) {
  const Impl& im = *impl_;
  const auto mismatch = [](const std::string& what) {
    return UserError("loader state does not match the data configuration: " + what);
  };
  if (state.seed != im.config.seed) throw mismatch(fmt::format("seed {} vs {}", state.seed, im.config.seed));
  if (state.seq_len != im.config.seq_len) {
    throw mismatch(fmt::format("seq_len {} vs {}", state.seq_len, im.config.seq_len));
  }
  if (state.sources.size() != im.datasets.size()) {
    throw mismatch(fmt::format("{} sources vs {}", state.sources.size(), im.datasets.size()));
  }
  int64_t taken_total = 0;
  for (size_t s = 0; s < state.sources.size(); ++s) {
    const auto& src = state.sources[s];
    if (src.windows != im.windows[s]) {
      throw mismatch(fmt::format("source {} ('{}') has {} windows per epoch, the state says {}", s,
                                 im.datasets[s].dir(), im.windows[s], src.windows));
    }
    if (std::abs(src.weight - im.weights[s]) > 1e-12) {
      throw mismatch(fmt::format("source {} ('{}') has normalised weight {}, the state says {}", s,
                                 im.datasets[s].dir(), im.weights[s], src.weight));
    }
    if (src.taken < 0) throw mismatch(fmt::format("source {} has a negative sample count", s));
    taken_total += src.taken;
  }
  if (taken_total != state.consumed_samples || state.steps < 0) {
    throw mismatch(
        fmt::format("per-source counts sum to {} but {} samples were consumed", taken_total, state.consumed_samples));
  }
  impl_->stop_producer();
  Cursor c;
  c.consumed_samples = state.consumed_samples;
  c.steps = state.steps;
  for (const auto& s : state.sources) c.taken.push_back(s.taken);
  std::lock_guard lock(impl_->mutex);
  impl_->consumed = std::move(c);
}

const LoaderConfig& TokenLoader::config() const {
  return impl_->config;
}
int64_t TokenLoader::micro_batches_per_step() const {
  return impl_->rows_per_rank / impl_->config.micro_batch;
}
int64_t TokenLoader::windows_per_epoch(size_t source) const {
  return impl_->windows.at(source);
}

}  // namespace dsx::data
