// The KV-cached generator (trainer/grpo/generate.h) against the model's own full forward
// (Model::logits), on the tiny DeepSeek-V3-shaped configs of the model tests: query compression
// and direct queries, YaRN, a dense first layer, group-limited sigmoid and softmax routers with
// shared experts, tied and untied heads.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "kernels/ops/cross_entropy.h"
#include "tests/support/temp_dir.h"
#include "tests/support/user_error.h"
#include "tests/trainer/test_model_fixtures.h"
#include "trainer/grpo/generate.h"
#include "trainer/grpo/generate_engine.h"
#include "trainer/model/model.h"
#include "trainer/recipe/recipe.h"

using namespace dsx;
using grpo::Completion;
using grpo::FinishReason;
using grpo::GenerationRequest;
using grpo::Generator;
using grpo::SamplingParams;

namespace {

std::vector<int32_t> random_tokens(int64_t n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& t : out) t = token(gen);
  return out;
}

// Model::logits of one sequence, [n, vocab].
Tensor full_logits(Model& model, const std::vector<int32_t>& tokens) {
  Batch b;
  b.inputs = Tensor::from<int32_t>(std::span<const int32_t>(tokens), {1, static_cast<int64_t>(tokens.size())});
  return model.logits(b);
}

std::vector<double> last_row(const Tensor& logits) {
  return logits.slice(logits.dim(0) - 1, logits.dim(0)).to_vector();
}

// max |a - b| / max |b|
double relative_error(const Tensor& a, const Tensor& b) {
  const std::vector<double> x = a.to_vector(), y = b.to_vector();
  REQUIRE(x.size() == y.size());
  double diff = 0, scale = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    diff = std::max(diff, std::abs(x[i] - y[i]));
    scale = std::max(scale, std::abs(y[i]));
  }
  return diff / scale;
}

std::vector<double> log_softmax(const std::vector<double>& v) {
  const double top = *std::max_element(v.begin(), v.end());
  double sum = 0;
  for (double x : v) sum += std::exp(x - top);
  std::vector<double> out;
  for (double x : v) out.push_back(x - top - std::log(sum));
  return out;
}

int32_t argmax_lowest(const std::vector<double>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());  // first maximum
}

std::vector<int32_t> concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
  a.insert(a.end(), b.begin(), b.end());
  return a;
}

SamplingParams sampling(double temperature, int64_t max_new_tokens) {
  SamplingParams p;
  p.temperature = temperature;
  p.max_new_tokens = max_new_tokens;
  return p;
}

Completion generate_one(Generator& g, const std::vector<int32_t>& prompt, uint64_t seed, const SamplingParams& p) {
  const GenerationRequest r{prompt, seed};
  return g.generate({&r, 1}, p).at(0);
}

}  // namespace

TEST_CASE("Model::logits are the logits the training forward's loss is taken of", "[generate]") {
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 3);
  const Batch batch = test::make_batch(config, 2, 8, 11);  // two documents packed in the first row
  const double lm = model.forward(batch).lm;
  const Tensor logits = model.logits(batch);
  REQUIRE(logits.shape() == Shape{16, config.vocab_size});
  Tensor lse = Tensor::empty({16}, DType::f64);
  const ops::CrossEntropyResult ce = ops::cross_entropy_forward(logits, batch.targets.view({16}), -100, lse);
  CHECK(ce.loss_sum / static_cast<double>(ce.count) == Approx(lm).epsilon(1e-13));
}

TEST_CASE("Model::logits leaves the expert loads that move the router biases alone", "[generate]") {
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 3);
  model.forward(test::make_batch(config, 2, 8, 11));  // a training forward counts its tokens
  const ExpertLoadStats before = model.expert_load();
  model.logits(test::make_batch(config, 2, 8, 12));
  const ExpertLoadStats after = model.expert_load();
  REQUIRE(after.layers.size() == before.layers.size());
  REQUIRE_FALSE(before.layers.empty());
  for (size_t l = 0; l < before.layers.size(); ++l) {
    CHECK(after.layers[l].tokens_per_expert == before.layers[l].tokens_per_expert);
  }
}

TEST_CASE("cached decoding reproduces the full forward at every position", "[generate]") {
  // Relative to the largest logit. The absorbed attention reorders the same sums, so only rounding
  // separates the two paths: measured at most 1.7e-15 in f64 (1.1e-16 per operation) and 6.2e-7
  // in f32 (6e-8 per operation); the bounds leave a margin of about 60 and 16.
  const auto [dtype, tolerance] = GENERATE(std::pair{DType::f64, 1e-13}, std::pair{DType::f32, 1e-5});
  for (const ModelConfig& config : {test::tiny_config(), test::tiny_config_direct_q()}) {
    Model model(config, dtype, 5);
    const std::vector<int32_t> tokens = random_tokens(13, config.vocab_size, 21);
    const Tensor reference = full_logits(model, tokens);
    Generator generator(model);
    for (const int64_t prefill : {int64_t{1}, int64_t{5}, int64_t{13}}) {
      INFO("dtype " << dtype_name(dtype) << ", q_lora_rank " << config.q_lora_rank << ", prefill " << prefill);
      const Tensor cached = generator.cached_logits(tokens, prefill);
      REQUIRE(cached.shape() == reference.shape());
      CHECK(relative_error(cached, reference) < tolerance);
    }
  }
}

TEST_CASE("a long prefill, attended in blocks of query rows, matches the full forward", "[generate]") {
  // 1600 positions · 2 heads · 1600 keys exceed the engine's 2^22 scores at once: two blocks.
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 5);
  const std::vector<int32_t> tokens = random_tokens(1600, config.vocab_size, 22);
  Generator generator(model);
  CHECK(relative_error(generator.cached_logits(tokens, 1600), full_logits(model, tokens)) < 1e-13);  // measured 1.7e-15
}

TEST_CASE("greedy decoding takes the full forward's argmax step by step", "[generate]") {
  for (const ModelConfig& config : {test::tiny_config(), test::tiny_config_direct_q()}) {
    Model model(config, DType::f64, 9);
    Generator generator(model);
    const std::vector<int32_t> prompt = random_tokens(4, config.vocab_size, 1);
    const SamplingParams greedy = sampling(0, 10);
    const Completion c = generate_one(generator, prompt, 0, greedy);
    REQUIRE(c.tokens.size() == 10);
    CHECK(c.finish == FinishReason::length);
    std::vector<int32_t> sequence = prompt;
    for (const int32_t token : c.tokens) {
      CHECK(token == argmax_lowest(last_row(full_logits(model, sequence))));
      sequence.push_back(token);
    }
    // deterministic, and the seed plays no part
    const Completion again = generate_one(generator, prompt, 12345, greedy);
    CHECK(again.tokens == c.tokens);
    CHECK(again.logprobs == c.logprobs);
  }
}

TEST_CASE("a completion depends on its own prompt and seed, not on its batch", "[generate]") {
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 9);
  Generator generator(model);
  const std::vector<int32_t> prompt = random_tokens(5, config.vocab_size, 2);
  for (const double temperature : {0.0, 1.0}) {
    INFO("temperature " << temperature);
    const SamplingParams p = sampling(temperature, 12);
    const Completion alone = generate_one(generator, prompt, 77, p);
    // other prompts of other lengths around it, and a copy of itself with another seed
    const std::vector<GenerationRequest> batch{{random_tokens(9, config.vocab_size, 3), 1},
                                               {prompt, 77},
                                               {random_tokens(2, config.vocab_size, 4), 2},
                                               {prompt, 78}};
    const std::vector<Completion> together = generator.generate(batch, p);
    REQUIRE(together.size() == 4);
    CHECK(together[1].tokens == alone.tokens);
    REQUIRE(together[1].logprobs.size() == alone.logprobs.size());
    for (size_t i = 0; i < alone.logprobs.size(); ++i) {
      CHECK(together[1].logprobs[i] == Approx(alone.logprobs[i]).margin(1e-12));  // batched GEMMs may round apart
    }
  }
}

TEST_CASE("sampling: the same seed repeats, another seed differs, top_k 1 is greedy", "[generate]") {
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 9);
  Generator generator(model);
  const std::vector<int32_t> prompt = random_tokens(3, config.vocab_size, 5);
  const SamplingParams p = sampling(1.0, 16);
  const Completion a = generate_one(generator, prompt, 1, p);
  CHECK(generate_one(generator, prompt, 1, p).tokens == a.tokens);
  CHECK(generate_one(generator, prompt, 2, p).tokens != a.tokens);

  const Completion greedy = generate_one(generator, prompt, 0, sampling(0, 16));
  SamplingParams top1 = p;
  top1.top_k = 1;
  CHECK(generate_one(generator, prompt, 3, top1).tokens == greedy.tokens);
  SamplingParams tiny_nucleus = p;
  tiny_nucleus.top_p = 1e-9;  // only the most likely token is left
  CHECK(generate_one(generator, prompt, 4, tiny_nucleus).tokens == greedy.tokens);
}

TEST_CASE("sampling frequencies follow the temperature, top-k and top-p distribution", "[generate]") {
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 9);
  Generator generator(model);
  const std::vector<int32_t> prompt = random_tokens(3, config.vocab_size, 6);
  const std::vector<double> logits = last_row(full_logits(model, prompt));
  const auto V = static_cast<size_t>(config.vocab_size);
  std::vector<int32_t> by_logit(V);
  std::iota(by_logit.begin(), by_logit.end(), 0);
  std::stable_sort(by_logit.begin(), by_logit.end(), [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });

  struct Case {
    double temperature;
    int64_t top_k;
    double top_p;
  };
  for (const Case& c : {Case{0.7, 5, 1.0}, Case{1.0, 0, 0.5}, Case{1.3, 0, 1.0}}) {
    INFO("temperature " << c.temperature << " top_k " << c.top_k << " top_p " << c.top_p);
    // the expected distribution, straight from the definitions
    std::vector<double> prob(V, 0.0);
    double total = 0;
    for (size_t i = 0; i < V; ++i) total += std::exp(logits[i] / c.temperature);
    size_t keep = c.top_k > 0 ? static_cast<size_t>(c.top_k) : V;
    if (c.top_p < 1) {
      double mass = 0;
      keep = 0;
      while (mass < c.top_p) mass += std::exp(logits[by_logit[keep++]] / c.temperature) / total;
    }
    double kept = 0;
    for (size_t r = 0; r < keep; ++r) kept += std::exp(logits[by_logit[r]] / c.temperature);
    for (size_t r = 0; r < keep; ++r) prob[by_logit[r]] = std::exp(logits[by_logit[r]] / c.temperature) / kept;

    SamplingParams p = sampling(c.temperature, 1);
    p.top_k = c.top_k;
    p.top_p = c.top_p;
    constexpr int n = 4000;
    std::vector<GenerationRequest> requests;
    for (int i = 0; i < n; ++i) requests.push_back({prompt, static_cast<uint64_t>(i)});
    std::vector<double> count(V, 0.0);
    for (const Completion& done : generator.generate(requests, p)) count[static_cast<size_t>(done.tokens.at(0))] += 1;
    for (size_t i = 0; i < V; ++i) {
      INFO("token " << i << " expected p " << prob[i] << " got " << count[i] / n);
      if (prob[i] == 0) {
        CHECK(count[i] == 0);  // filtered out
      } else {
        // 5 standard deviations of a binomial frequency: fails by chance with probability < 1e-6 per token
        CHECK(std::abs(count[i] / n - prob[i]) < 5 * std::sqrt(prob[i] * (1 - prob[i]) / n) + 1e-9);
      }
    }
  }
}

TEST_CASE("logprobs are the temperature-1 log-softmax of the full forward at the sampled tokens", "[generate]") {
  const ModelConfig config = test::tiny_config_direct_q();
  Model model(config, DType::f64, 4);
  Generator generator(model);
  const std::vector<int32_t> prompt = random_tokens(6, config.vocab_size, 7);
  SamplingParams p = sampling(0.8, 9);
  p.top_k = 6;  // filters change what is drawn, not the reported log-probability
  const Completion c = generate_one(generator, prompt, 31, p);
  REQUIRE(c.tokens.size() == 9);
  const Tensor logits = full_logits(model, concat(prompt, c.tokens));
  for (size_t i = 0; i < c.tokens.size(); ++i) {
    const int64_t row = static_cast<int64_t>(prompt.size() + i) - 1;  // the position that predicts token i
    const std::vector<double> lp = log_softmax(logits.slice(row, row + 1).to_vector());
    CHECK(c.logprobs[i] == Approx(lp[static_cast<size_t>(c.tokens[i])]).margin(1e-12));
  }
}

TEST_CASE("generation stops at EOS, at stop strings and at max_new_tokens", "[generate]") {
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f64, 9);
  const std::vector<int32_t> prompt = random_tokens(4, config.vocab_size, 8);
  Generator plain(model);
  const Completion free_run = generate_one(plain, prompt, 0, sampling(0, 12));
  REQUIRE(free_run.tokens.size() == 12);
  CHECK(free_run.finish == FinishReason::length);

  SECTION("EOS ends the completion and is kept") {
    SamplingParams p = sampling(0, 12);
    p.eos_token_id = free_run.tokens[3];
    const auto first = static_cast<size_t>(std::find(free_run.tokens.begin(), free_run.tokens.end(), p.eos_token_id) -
                                           free_run.tokens.begin());
    const Completion c = generate_one(plain, prompt, 0, p);
    CHECK(c.finish == FinishReason::eos);
    CHECK(c.tokens == std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + first + 1));
    CHECK(c.logprobs.size() == c.tokens.size());
  }
  SECTION("max_new_tokens") {
    const Completion c = generate_one(plain, prompt, 0, sampling(0, 5));
    CHECK(c.finish == FinishReason::length);
    CHECK(c.tokens == std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + 5));
    const Completion none = generate_one(plain, prompt, 0, sampling(0, 0));
    CHECK(none.tokens.empty());
    CHECK(none.finish == FinishReason::length);
  }
  SECTION("a stop string in the decoded text ends the completion and is kept") {
    // A byte-level tokenizer without merges: ids 0-4 are its special tokens, 5.. single bytes.
    test::TempDir dir;
    std::ofstream(dir / "corpus.txt") << "a small corpus\n";
    data::BpeTrainerOptions options;
    options.vocab_size = 261;
    options.show_progress = false;
    options.threads = 1;
    const data::Tokenizer tokenizer = data::train_bpe(std::vector<std::string>{dir / "corpus.txt"}, options);
    const auto decode = [&](const std::vector<int32_t>& ids) {
      const std::vector<data::TokenId> u(ids.begin(), ids.end());
      return tokenizer.decode(u);
    };
    Generator generator(model, &tokenizer);
    SamplingParams p = sampling(0, 12);
    p.stop_strings = {"never appears \x7f", decode({free_run.tokens[4], free_run.tokens[5]})};
    // expected: the first prefix whose text contains the stop string
    size_t stop_at = 0;
    while (decode({free_run.tokens.begin(), free_run.tokens.begin() + stop_at + 1}).find(p.stop_strings[1]) ==
           std::string::npos) {
      ++stop_at;
    }
    const Completion c = generator.generate(std::vector<GenerationRequest>{{prompt, 0}}, p).at(0);
    CHECK(c.finish == FinishReason::stop_string);
    CHECK(c.tokens == std::vector<int32_t>(free_run.tokens.begin(), free_run.tokens.begin() + stop_at + 1));
  }
}

TEST_CASE("bad sampling parameters and prompts are user errors", "[generate]") {
  Model model(test::tiny_config(), DType::f32, 1);
  Generator generator(model);
  const auto message = [&](SamplingParams p, std::vector<int32_t> tokens = {1, 2}) {
    return test::user_error([&] { generate_one(generator, tokens, 0, p); });
  };
  SamplingParams p;
  p.temperature = -1;
  CHECK_THAT(message(p), Catch::Contains("temperature"));
  p = {};
  p.top_p = 0;
  CHECK_THAT(message(p), Catch::Contains("top_p"));
  p = {};
  p.top_k = -2;
  CHECK_THAT(message(p), Catch::Contains("top_k"));
  p = {};
  p.max_new_tokens = -1;
  CHECK_THAT(message(p), Catch::Contains("max_new_tokens"));
  CHECK_THAT(message({}, {}), Catch::Contains("the prompt is empty"));
  CHECK_THAT(message({}, {1, 24}), Catch::Contains("token id 24 is outside the model's vocabulary [0, 24)"));
}

TEST_CASE("KV cache bytes per token: MLA's latent against per-head keys and values", "[generate]") {
  // DeepSeek-V3 from the shipped recipe: per token and layer 512 + 64 = 576 latent values against
  // 128 heads · (128 + 64 + 128) = 40960 key and value values, 71.1 times more.
  const ModelConfig v3 = load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/deepseek-v3-671b.yaml").model;
  const int64_t latent = grpo::latent_kv_bytes_per_token(v3, DType::bf16);
  const int64_t plain = grpo::plain_kv_bytes_per_token(v3, DType::bf16);
  CHECK(latent == 576 * 61 * 2);   // 70,272 bytes: 68.6 KiB per token
  CHECK(plain == 40960 * 61 * 2);  // 4,997,120 bytes: 4.77 MiB per token
  CHECK(static_cast<double>(plain) / static_cast<double>(latent) == Approx(40960.0 / 576.0));
  CHECK(std::round(10.0 * static_cast<double>(plain) / static_cast<double>(latent)) == 711);

  // The engine's cache holds exactly the latent: its tensors' bytes per position equal the formula.
  const ModelConfig tiny = test::tiny_config();
  Model model(tiny, DType::f32, 1);
  const grpo::detail::DecodeEngine engine(model, 8);
  const grpo::detail::LatentCache cache = engine.new_cache(8);
  size_t bytes = 0;
  for (size_t l = 0; l < cache.latent.size(); ++l) bytes += cache.latent[l].nbytes() + cache.rope_key[l].nbytes();
  CHECK(static_cast<int64_t>(bytes / 8) == grpo::latent_kv_bytes_per_token(tiny, DType::f32));
  CHECK(grpo::latent_kv_bytes_per_token(tiny, DType::f32) == (8 + 4) * 3 * 4);
  CHECK(grpo::plain_kv_bytes_per_token(tiny, DType::f32) == (4 + 4 + 6) * 2 * 3 * 4);
}
