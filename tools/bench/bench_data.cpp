// bench_data: data pipeline throughput on a generated corpus.
//
//   prep    `data prep` (read JSONL, tokenize on N threads, write HDF5 shards) in MB/s and
//           tokens/s, against the bare tokenizer (encode_batch on the same documents held in
//           memory) as the baseline: the ratio shows what reading and writing cost on top.
//   loader  TokenLoader samples/s and tokens/s (shuffled windows, packing, segment ids,
//           prefetch thread), against a bare sequential TokenDataset::read of the same number
//           of tokens as the baseline.
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "data/dataset.h"
#include "data/loader.h"
#include "data/prep.h"
#include "data/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using dsx::data::TokenId;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

// CPU seconds of the whole process (all threads): on a shared machine wall time includes
// waiting for a core, so throughput per CPU second is reported beside it.
double process_cpu_seconds() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) + 1e-9 * static_cast<double>(ts.tv_nsec);
}

// Words with a Zipf-like frequency, mixed scripts and some digits, so BPE has real work.
class CorpusGenerator {
 public:
  explicit CorpusGenerator(uint64_t seed) : rng_(seed) {
    static const char* syllables[] = {"ka",  "lo", "mi", "ne", "ru", "sa", "te", "vi", "zo", "ber", "gen", "ung",
                                      "sch", "ä",  "ö",  "ü",  "ß",  "的", "学", "习", "机", "器",  "th",  "ing"};
    std::uniform_int_distribution<int> n_syl(1, 4), pick(0, 23);
    for (int w = 0; w < 20000; ++w) {
      std::string word;
      for (int k = n_syl(rng_); k > 0; --k) word += syllables[pick(rng_)];
      words_.push_back(std::move(word));
    }
  }

  std::string document(size_t approx_bytes) {
    std::string doc;
    std::uniform_real_distribution<double> u(0.0, 1.0);
    std::uniform_int_distribution<int> number(0, 99999);
    while (doc.size() < approx_bytes) {
      // Zipf(1) by inverse transform over 20000 ranks: rank ~ exp(u * ln(N)).
      const auto rank = static_cast<size_t>(std::exp(u(rng_) * std::log(static_cast<double>(words_.size())))) - 1;
      doc += words_[std::min(rank, words_.size() - 1)];
      const double r = u(rng_);
      doc += r < 0.05 ? ". " : r < 0.08 ? ", " : r < 0.09 ? " " + std::to_string(number(rng_)) + " " : " ";
    }
    return doc;
  }

 private:
  std::mt19937_64 rng_;
  std::vector<std::string> words_;
};

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out + "\"";
}

struct Args {
  double corpus_mb = 16;
  std::string tokenizer;
  int vocab_size = 4096;
  int threads = 0;
  int64_t seq_len = 2048;
  int64_t global_batch = 32;
  int64_t micro_batch = 4;
  int steps = 100;
  std::string work_dir;
};

// Writes the corpus as JSONL files; returns the documents too (for the tokenizer baseline).
std::vector<std::string> write_corpus(const Args& a, const std::string& dir) {
  CorpusGenerator gen(2024);
  std::vector<std::string> docs;
  size_t bytes = 0;
  const auto target = static_cast<size_t>(a.corpus_mb * 1e6);
  std::uniform_int_distribution<size_t> doc_size(200, 6000);
  std::mt19937_64 rng(7);
  while (bytes < target) {
    docs.push_back(gen.document(doc_size(rng)));
    bytes += docs.back().size();
  }
  constexpr size_t kFiles = 4;
  for (size_t f = 0; f < kFiles; ++f) {
    std::ofstream out(dir + "/part-" + std::to_string(f) + ".jsonl", std::ios::binary);
    for (size_t d = f; d < docs.size(); d += kFiles) out << "{\"text\": " << json_string(docs[d]) << "}\n";
  }
  return docs;
}

dsx::data::Tokenizer get_tokenizer(const Args& a, const std::string& work, const std::vector<std::string>& docs) {
  if (!a.tokenizer.empty()) return dsx::data::Tokenizer::load(a.tokenizer);
  // Train on ~2 MB of the corpus: enough merges for realistic token lengths, quick to train.
  std::string sample;
  for (const auto& d : docs) {
    if (sample.size() > 2'000'000) break;
    sample += d + "\n";
  }
  std::ofstream(work + "/train.txt", std::ios::binary) << sample;
  dsx::data::BpeTrainerOptions options;
  options.vocab_size = static_cast<size_t>(a.vocab_size);
  options.show_progress = false;
  options.threads = a.threads;
  const std::vector<std::string> files{work + "/train.txt"};
  const auto t0 = Clock::now();
  auto tok = dsx::data::train_bpe(files, options);
  std::printf("tokenizer: trained %zu tokens on %.1f MB in %.1f s\n", tok.vocab_size(), sample.size() / 1e6,
              seconds_since(t0));
  return tok;
}

void bench_prep(const Args& a, const dsx::data::Tokenizer& tok, const std::vector<std::string>& docs,
                const std::string& work) {
  double bytes = 0;
  for (const auto& d : docs) bytes += static_cast<double>(d.size());

  auto t0 = Clock::now();
  double c0 = process_cpu_seconds();
  const auto encoded = tok.encode_batch(docs, a.threads);
  const double encode_s = seconds_since(t0);
  const double encode_cpu = process_cpu_seconds() - c0;
  double tokens = 0;
  for (const auto& e : encoded) tokens += static_cast<double>(e.size() + 1);

  dsx::data::PrepOptions options;
  options.output_dir = work + "/dataset";
  options.inputs = {work + "/corpus"};
  options.threads = a.threads;
  options.show_progress = false;
  t0 = Clock::now();
  c0 = process_cpu_seconds();
  const auto stats = dsx::data::prepare_dataset(tok, options);
  const double prep_s = seconds_since(t0);
  const double prep_cpu = process_cpu_seconds() - c0;

  std::printf("corpus:    %zu documents, %.1f MB, %.0f tokens (%.2f bytes/token)\n", docs.size(), bytes / 1e6, tokens,
              bytes / tokens);
  std::printf("baseline:  encode_batch in memory   %8.2f MB/s  %12.0f tokens/s  %8.2f MB per CPU s\n",
              bytes / 1e6 / encode_s, tokens / encode_s, bytes / 1e6 / encode_cpu);
  std::printf(
      "prep:      JSONL -> HDF5 shards     %8.2f MB/s  %12.0f tokens/s  %8.2f MB per CPU s  (%.2f x baseline "
      "wall, %.2f x per CPU s)\n",
      bytes / 1e6 / prep_s, static_cast<double>(stats.tokens) / prep_s, bytes / 1e6 / prep_cpu, encode_s / prep_s,
      encode_cpu / prep_cpu);
}

void bench_loader(const Args& a, const std::string& work) {
  const auto dataset = dsx::data::TokenDataset::open(work + "/dataset");
  dsx::data::LoaderConfig config;
  config.sources = {{work + "/dataset", 1.0}};
  config.seq_len = a.seq_len;
  config.global_batch = a.global_batch;
  config.micro_batch = a.micro_batch;
  config.seed = 1;
  dsx::data::TokenLoader loader(config);
  loader.next();  // start the prefetch thread and open the shards outside the timing
  const auto t0 = Clock::now();
  int64_t checksum = 0;
  for (int s = 0; s < a.steps; ++s) checksum += loader.next().micro_batches[0].inputs.data<int32_t>()[0];
  const double loader_s = seconds_since(t0);
  const double samples = static_cast<double>(a.steps) * static_cast<double>(a.global_batch);
  const double tokens = samples * static_cast<double>(a.seq_len);

  // Baseline: the same number of tokens read sequentially in window-sized pieces.
  std::vector<TokenId> buffer(static_cast<size_t>(a.seq_len + 1));
  const int64_t windows = (dataset.tokens() - 1) / a.seq_len;
  const auto t1 = Clock::now();
  for (int64_t i = 0; i < static_cast<int64_t>(samples); ++i) {
    dataset.read((i % windows) * a.seq_len, buffer);
    checksum += buffer[0];
  }
  const double read_s = seconds_since(t1);
  std::printf("baseline:  sequential window reads  %10.0f samples/s  %12.0f tokens/s\n", samples / read_s,
              tokens / read_s);
  std::printf(
      "loader:    shuffled, packed batches %10.0f samples/s  %12.0f tokens/s  (%.2f x baseline; seq_len %lld, "
      "batch %lld, %lld windows; checksum %lld)\n",
      samples / loader_s, tokens / loader_s, read_s / loader_s, static_cast<long long>(a.seq_len),
      static_cast<long long>(a.global_batch), static_cast<long long>(windows), static_cast<long long>(checksum));
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"bench_data: prep throughput (MB/s, tokens/s) and loader samples/s on a generated corpus"};
  Args a;
  app.add_option("--corpus-mb", a.corpus_mb, "size of the generated corpus in MB")->capture_default_str();
  app.add_option("--tokenizer", a.tokenizer, "tokenizer.json to use (default: train one on the corpus)");
  app.add_option("--vocab-size", a.vocab_size, "vocabulary of the trained tokenizer")->capture_default_str();
  app.add_option("--threads", a.threads, "tokenizer threads (0: all cores)")->capture_default_str();
  app.add_option("--seq-len", a.seq_len, "loader sequence length")->capture_default_str();
  app.add_option("--global-batch", a.global_batch, "loader sequences per step")->capture_default_str();
  app.add_option("--micro-batch", a.micro_batch, "loader sequences per micro-batch")->capture_default_str();
  app.add_option("--steps", a.steps, "loader steps to time")->capture_default_str();
  app.add_option("--work-dir", a.work_dir, "where to write corpus and dataset (default: a temporary dir, removed)");
  CLI11_PARSE(app, argc, argv);

  const bool temporary = a.work_dir.empty();
  std::string work = a.work_dir;
  if (temporary) {
    work = (fs::temp_directory_path() / ("dsx-bench-data-" + std::to_string(::getpid()))).string();
  }
  fs::create_directories(work + "/corpus");
  try {
    std::printf("bench_data: %u hardware threads, tokenizer threads %d\n", std::thread::hardware_concurrency(),
                a.threads);
    const auto docs = write_corpus(a, work + "/corpus");
    const auto tok = get_tokenizer(a, work, docs);
    bench_prep(a, tok, docs, work);
    bench_loader(a, work);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_data: %s\n", e.what());
    if (temporary) fs::remove_all(work);
    return 2;
  }
  if (temporary) fs::remove_all(work);
  return 0;
}
