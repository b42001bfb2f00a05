#include "trainer/grpo/generate.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>

#include "data/tokenizer.h"
#include "kernels/error.h"
#include "kernels/random.h"
#include "trainer/grpo/generate_engine.h"
#include "trainer/model/model.h"

namespace dsx::grpo {

namespace {

using detail::CacheSpan;
using detail::DecodeEngine;
using detail::LatentCache;

// The Philox stream of sampling draws: request seed = key, generated-token index = counter.
constexpr uint64_t kSamplingStream = random::stream_of("dsx.grpo.generate.sample");
// Prompts are prefilled in groups of about this many tokens, bounding the activations' memory.
constexpr int64_t kPrefillChunkTokens = 4096;

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

void check_sampling(const SamplingParams& p) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) {
    throw UserError(fmt::format("sampling: temperature must be a finite number >= 0, got {}", p.temperature));
  }
  if (p.top_k < 0) throw UserError(fmt::format("sampling: top_k must be >= 0 (0 = off), got {}", p.top_k));
  if (!(p.top_p > 0 && p.top_p <= 1)) {
    throw UserError(fmt::format("sampling: top_p must be in (0, 1] (1 = off), got {}", p.top_p));
  }
  if (p.max_new_tokens < 0) {
    throw UserError(fmt::format("sampling: max_new_tokens must be >= 0, got {}", p.max_new_tokens));
  }
  for (const std::string& stop : p.stop_strings) {
    if (stop.empty()) throw UserError("sampling: a stop string is empty");
  }
}

void check_prompt(std::span<const int32_t> prompt, int64_t vocab, const std::string& what) {
  if (prompt.empty()) throw UserError(what + ": the prompt is empty");
  for (const int32_t id : prompt) {
    if (id < 0 || id >= vocab) {
      throw UserError(fmt::format("{}: token id {} is outside the model's vocabulary [0, {})", what, id, vocab));
    }
  }
}

// log Σ exp(v), stable.
double log_sum_exp(std::span<const double> v) {
  const double top = *std::max_element(v.begin(), v.end());
  double sum = 0;
  for (const double x : v) sum += std::exp(x - top);
  return top + std::log(sum);
}

// The highest logit; ties go to the lowest id.
int32_t argmax(std::span<const double> logits) {
  return static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
}

// Temperature, then top-k, then top-p, then inverse-CDF sampling with u in (0, 1).
int32_t draw(std::span<const double> logits, const SamplingParams& p, double u) {
  const auto V = static_cast<int64_t>(logits.size());
  std::vector<int32_t> ids(static_cast<size_t>(V));
  std::iota(ids.begin(), ids.end(), 0);
  // candidates by decreasing logit, ties to the lower id (the order greedy decoding uses)
  const auto better = [&](int32_t a, int32_t b) {
    return logits[static_cast<size_t>(a)] > logits[static_cast<size_t>(b)] ||
           (logits[static_cast<size_t>(a)] == logits[static_cast<size_t>(b)] && a < b);
  };
  int64_t keep = V;
  if (p.top_k > 0 && p.top_k < V) {
    keep = p.top_k;
    std::partial_sort(ids.begin(), ids.begin() + keep, ids.end(), better);
  } else if (p.top_p < 1) {
    std::sort(ids.begin(), ids.end(), better);
  }
  double top = -INFINITY;
  for (int64_t i = 0; i < keep; ++i) top = std::max(top, logits[static_cast<size_t>(ids[static_cast<size_t>(i)])]);
  std::vector<double> weight(static_cast<size_t>(keep));
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) {
    weight[static_cast<size_t>(i)] =
        std::exp((logits[static_cast<size_t>(ids[static_cast<size_t>(i)])] - top) / p.temperature);
    total += weight[static_cast<size_t>(i)];
  }
  if (p.top_p < 1) {  // the smallest prefix (most likely first) holding top_p of the mass
    double mass = 0;
    int64_t n = 0;
    while (n < keep && mass < p.top_p * total) mass += weight[static_cast<size_t>(n++)];
    keep = std::max<int64_t>(n, 1);
    total = mass;
  }
  const double target = u * total;
  double cumulative = 0;
  for (int64_t i = 0; i < keep; ++i) {
    cumulative += weight[static_cast<size_t>(i)];
    if (target < cumulative) return ids[static_cast<size_t>(i)];
  }
  return ids[static_cast<size_t>(keep - 1)];  // u·total rounded up to the last edge
}

std::vector<double> row_values(const Tensor& logits, int64_t row) {
  return logits.slice(row, row + 1).to_vector();
}

// One request in flight.
struct Stream {
  const GenerationRequest* request = nullptr;
  Completion* completion = nullptr;
  LatentCache cache;
  std::string text;  // the completion decoded so far (only with stop strings)
  bool done = false;
};

// Appends the token's text and looks for a stop string ending inside it: byte-level BPE decodes
// token by token, so the text grows by concatenation. A stop string that one token completes and
// overruns (stop "\n", token "\n\n") stops too. Ids beyond the tokenizer's vocabulary add no text.
bool completes_stop_string(Stream& s, int32_t token, const std::vector<std::string>& stops,
                           const data::Tokenizer& tokenizer) {
  const size_t before = s.text.size();
  if (static_cast<size_t>(token) < tokenizer.vocab_size()) {
    const data::TokenId id = static_cast<data::TokenId>(token);
    s.text += tokenizer.decode(std::span<const data::TokenId>(&id, 1));
  }
  if (s.text.size() == before) return false;
  return std::any_of(stops.begin(), stops.end(), [&](const std::string& stop) {
    const size_t from = before + 1 > stop.size() ? before + 1 - stop.size() : 0;
    return s.text.find(stop, from) != std::string::npos;
  });
}

// Samples the next token of `s` from its logits and records why it stops, if it does.
void accept(Stream& s, std::span<const double> logits, const SamplingParams& params, const data::Tokenizer* tokenizer) {
  Completion& c = *s.completion;
  const auto index = static_cast<uint64_t>(c.tokens.size());
  const int32_t token = params.temperature == 0
                            ? argmax(logits)
                            : draw(logits, params, random::uniform_double(s.request->seed, kSamplingStream, index));
  c.tokens.push_back(token);
  c.logprobs.push_back(logits[static_cast<size_t>(token)] - log_sum_exp(logits));
  if (token == params.eos_token_id) {
    c.finish = FinishReason::eos;
    s.done = true;
    return;
  }
  if (!params.stop_strings.empty() && completes_stop_string(s, token, params.stop_strings, *tokenizer)) {
    c.finish = FinishReason::stop_string;
    s.done = true;
    return;
  }
  if (static_cast<int64_t>(c.tokens.size()) >= params.max_new_tokens) {
    c.finish = FinishReason::length;
    s.done = true;
  }
}

// Runs every prompt through the model into its stream's cache and samples each first token.
// Identical prompts (a GRPO group) are run once and their cache copied.
void prefill(DecodeEngine& engine, std::vector<Stream>& streams, const SamplingParams& params,
             const data::Tokenizer* tokenizer) {
  std::map<std::vector<int32_t>, size_t> first_with;
  std::vector<size_t> unique;
  std::vector<size_t> source(streams.size());
  for (size_t i = 0; i < streams.size(); ++i) {
    const auto [it, inserted] = first_with.emplace(streams[i].request->prompt, i);
    source[i] = it->second;
    if (inserted) unique.push_back(i);
  }
  std::vector<std::vector<double>> last_logits(streams.size());
  for (size_t begin = 0; begin < unique.size();) {
    std::vector<int32_t> tokens;
    std::vector<CacheSpan> spans;
    size_t end = begin;
    do {  // at least one prompt per chunk, however long
      Stream& s = streams[unique[end++]];
      tokens.insert(tokens.end(), s.request->prompt.begin(), s.request->prompt.end());
      spans.push_back({&s.cache, static_cast<int64_t>(s.request->prompt.size())});
    } while (end < unique.size() &&
             tokens.size() + streams[unique[end]].request->prompt.size() <= static_cast<size_t>(kPrefillChunkTokens));
    const Tensor hidden = engine.forward(tokens, spans);
    Tensor last_rows = Tensor::empty({static_cast<int64_t>(spans.size()), hidden.dim(1)}, hidden.dtype());
    int64_t row = 0;
    for (size_t k = 0; k < spans.size(); ++k) {
      row += spans[k].rows;
      Tensor dst = last_rows.slice(static_cast<int64_t>(k), static_cast<int64_t>(k) + 1);
      dst.copy_from(hidden.slice(row - 1, row));
    }
    const Tensor logits = engine.logits(last_rows);
    for (size_t k = 0; k < spans.size(); ++k)
      last_logits[unique[begin + k]] = row_values(logits, static_cast<int64_t>(k));
    begin = end;
  }
  for (size_t i = 0; i < streams.size(); ++i) {
    if (source[i] != i) streams[i].cache.copy_prefix(streams[source[i]].cache, streams[source[i]].cache.length);
    accept(streams[i], last_logits[source[i]], params, tokenizer);
  }
}

}  // namespace

Generator::Generator(Model& model, const data::Tokenizer* tokenizer) : model_(&model), tokenizer_(tokenizer) {}

std::vector<Completion> Generator::generate(std::span<const GenerationRequest> requests, const SamplingParams& params) {
  check_sampling(params);
  const int64_t vocab = model_->config().vocab_size;
  stats_ = {};
  for (size_t i = 0; i < requests.size(); ++i) {
    check_prompt(requests[i].prompt, vocab, fmt::format("generate: request {}", i));
    stats_.prompt_tokens += static_cast<int64_t>(requests[i].prompt.size());
  }
  if (!params.stop_strings.empty() && tokenizer_ == nullptr) {
    throw std::invalid_argument("Generator::generate: stop strings need the Generator to have a tokenizer");
  }
  std::vector<Completion> out(requests.size());
  if (requests.empty() || params.max_new_tokens == 0) return out;

  // The last sampled token is never run through the model, so it needs no cache row.
  int64_t max_positions = 0;
  for (const GenerationRequest& r : requests) {
    max_positions = std::max(max_positions, static_cast<int64_t>(r.prompt.size()) + params.max_new_tokens - 1);
  }
  DecodeEngine engine(*model_, max_positions);
  std::vector<Stream> streams(requests.size());
  for (size_t i = 0; i < requests.size(); ++i) {
    streams[i].request = &requests[i];
    streams[i].completion = &out[i];
    streams[i].cache = engine.new_cache(static_cast<int64_t>(requests[i].prompt.size()) + params.max_new_tokens - 1);
  }

  const auto prefill_start = std::chrono::steady_clock::now();
  prefill(engine, streams, params, tokenizer_);
  stats_.prefill_s = seconds_since(prefill_start);

  const auto decode_start = std::chrono::steady_clock::now();
  for (;;) {
    std::vector<Stream*> active;
    std::vector<int32_t> tokens;
    std::vector<CacheSpan> spans;
    for (Stream& s : streams) {
      if (s.done) {
        s.cache = {};  // release the memory of finished sequences early
        continue;
      }
      active.push_back(&s);
      tokens.push_back(s.completion->tokens.back());
      spans.push_back({&s.cache, 1});
    }
    if (active.empty()) break;
    const Tensor logits = engine.logits(engine.forward(tokens, spans));
    for (size_t k = 0; k < active.size(); ++k)
      accept(*active[k], row_values(logits, static_cast<int64_t>(k)), params, tokenizer_);
  }
  stats_.decode_s = seconds_since(decode_start);
  for (const Completion& c : out) stats_.generated_tokens += static_cast<int64_t>(c.tokens.size());
  return out;
}

Tensor Generator::cached_logits(std::span<const int32_t> tokens, int64_t prefill) {
  const auto n = static_cast<int64_t>(tokens.size());
  check_prompt(tokens, model_->config().vocab_size, "cached_logits");
  if (prefill < 1 || prefill > n) {
    throw std::invalid_argument(fmt::format("cached_logits: prefill must be in [1, {}], got {}", n, prefill));
  }
  DecodeEngine engine(*model_, n);
  LatentCache cache = engine.new_cache(n);
  Tensor out = Tensor::empty({n, model_->config().vocab_size}, engine.dtype());
  const CacheSpan prompt_span{&cache, prefill};
  Tensor first = out.slice(0, prefill);
  first.copy_from(engine.logits(engine.forward(tokens.first(static_cast<size_t>(prefill)), {&prompt_span, 1})));
  const CacheSpan one{&cache, 1};
  for (int64_t t = prefill; t < n; ++t) {
    Tensor row = out.slice(t, t + 1);
    row.copy_from(engine.logits(engine.forward(tokens.subspan(static_cast<size_t>(t), 1), {&one, 1})));
  }
  return out;
}

int64_t latent_kv_bytes_per_token(const ModelConfig& config, DType dtype) {
  return (config.kv_lora_rank + config.qk_rope_head_dim) * config.num_hidden_layers *
         static_cast<int64_t>(dtype_size(dtype));
}

int64_t plain_kv_bytes_per_token(const ModelConfig& config, DType dtype) {
  return (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * config.num_attention_heads *
         config.num_hidden_layers * static_cast<int64_t>(dtype_size(dtype));
}

}  // namespace dsx::grpo
