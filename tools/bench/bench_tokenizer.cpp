// bench_tokenizer: dsx tokenizer encoding throughput against Hugging Face `tokenizers` on the
// same corpus, the same documents and the same tokenizer.json.
//
//   encode        Tokenizer::encode over every document in turn, one thread
//   encode_batch  Tokenizer::encode_batch over all documents on --threads threads
// Baseline: HF tokenizers (tools/bench/tokenizer_hf.py, run with <repo>/.venv/bin/python) doing
// the same; the ratio dsx/HF is the figure to watch (goal: dsx no slower than half of HF).
// Each figure is the best of --repeat passes, so both sides run with warm word caches.
//
//   bench_tokenizer [--corpus FILE]... [--tokenizer tok.json] [--mb 8] [--threads 2]
#include <fmt/core.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "kernels/error.h"

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

struct Options {
  std::vector<std::string> corpus;
  std::string tokenizer;
  double megabytes = 8.0;
  size_t vocab_size = 32000;
  size_t doc_bytes = 4096;
  int threads = 2;
  int repeat = 3;
  std::string python;
  std::string workdir;
  bool no_hf = false;
};

// Mixed-script text with a Zipf-distributed lexicon (a long tail of rare words, so the word
// cache does not hide the BPE cost), digits, code lines, punctuation and whitespace runs.
class CorpusGenerator {
 public:
  explicit CorpusGenerator(uint32_t seed) : rng_(seed) {
    const std::vector<std::string> latin = {"st", "an", "er", "in", "ge", "ch", "ä",  "ö",   "ü",   "ß",  "th",
                                            "qu", "o",  "a",  "e",  "i",  "u",  "ng", "sch", "ion", "ly", "ed"};
    const std::vector<std::string> cyrillic = {"при", "вет", "мир", "ка", "ни", "ст", "во", "ль"};
    std::uniform_int_distribution<int> syllables(1, 4), percent(0, 99);
    for (int w = 0; w < 40000; ++w) {
      std::string word;
      const int kind = percent(rng_);
      if (kind < 70) {
        for (int k = syllables(rng_); k > 0; --k) word += latin[rng_() % latin.size()];
        if (percent(rng_) < 10) word[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(word[0])));
      } else if (kind < 85) {
        for (int k = syllables(rng_); k > 0; --k) append_utf8(word, 0x4E00 + rng_() % 3000);  // CJK ideographs
      } else if (kind < 92) {
        for (int k = syllables(rng_); k > 0; --k) word += cyrillic[rng_() % cyrillic.size()];
      } else {
        word = (percent(rng_) < 50 ? "get_" : "set") + latin[rng_() % latin.size()] + latin[rng_() % latin.size()];
      }
      words_.push_back(word);
    }
  }

  std::string text(size_t bytes) {
    std::string out;
    std::uniform_real_distribution<double> u(0.0, 1.0);
    while (out.size() < bytes) {
      const double r = u(rng_);
      if (r < 0.08) {
        out += fmt::format("    if (x_{} >= {}) {{ return y[{}]; }}\n", rng_() % 100, rng_() % 100000, rng_() % 16);
        continue;
      }
      const size_t words = 5 + rng_() % 20;
      for (size_t w = 0; w < words; ++w) {
        // Zipf(1) over the lexicon by inverse transform: rank = exp(u * ln N).
        const auto rank = static_cast<size_t>(std::exp(u(rng_) * std::log(static_cast<double>(words_.size()))));
        out += words_[std::min(rank, words_.size()) - 1];
        const double p = u(rng_);
        out += p < 0.05 ? ", " : p < 0.07 ? " " + std::to_string(rng_() % 1000000) + " " : p < 0.08 ? "  " : " ";
      }
      out += u(rng_) < 0.2 ? ".\n\n" : ".\n";
    }
    return out;
  }

 private:
  static void append_utf8(std::string& s, uint32_t cp) {
    s += static_cast<char>(0xE0 | (cp >> 12));
    s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  std::mt19937 rng_;
  std::vector<std::string> words_;
};

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw dsx::UserError("cannot open corpus file " + path);
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

// A document ends at the first line feed at least doc_bytes after its start (tokenizer_hf.py
// cuts the same way).
std::vector<std::string> split_documents(const std::string& corpus, size_t doc_bytes) {
  std::vector<std::string> docs;
  size_t start = 0;
  while (start < corpus.size()) {
    size_t end = corpus.find('\n', std::min(corpus.size(), start + doc_bytes));
    end = end == std::string::npos ? corpus.size() : end + 1;
    docs.push_back(corpus.substr(start, end - start));
    start = end;
  }
  return docs;
}

template <typename F>
double best_seconds(int repeat, F&& body) {
  double best = 1e30;
  for (int r = 0; r < repeat; ++r) {
    const auto t0 = Clock::now();
    body();
    best = std::min(best, std::chrono::duration<double>(Clock::now() - t0).count());
  }
  return best;
}

struct HfResult {
  bool ok = false;
  std::string reason;
  double encode_mb_s = 0, batch_mb_s = 0;
  size_t tokens = 0;
  std::string version;
};

HfResult run_hf(const Options& o, const std::string& tokenizer_path, const std::string& corpus_path) {
  HfResult result;
  if (o.no_hf) {
    result.reason = "--no-hf";
    return result;
  }
  const fs::path script = fs::path(__FILE__).parent_path() / "tokenizer_hf.py";
  const std::string python =
      o.python.empty() ? (fs::path(__FILE__).parent_path().parent_path().parent_path() / ".venv/bin/python").string()
                       : o.python;
  if (!fs::exists(python)) {
    result.reason = python + " not found (run tools/python-env.sh)";
    return result;
  }
  const std::string command =
      fmt::format("'{}' '{}' --tokenizer '{}' --corpus '{}' --doc-bytes {} --threads {} --repeat {} --json", python,
                  script.string(), tokenizer_path, corpus_path, o.doc_bytes, o.threads, o.repeat);
  FILE* pipe = ::popen(command.c_str(), "r");
  if (!pipe) {
    result.reason = "cannot start " + python;
    return result;
  }
  std::string output;
  char buffer[4096];
  while (size_t n = std::fread(buffer, 1, sizeof buffer, pipe)) output.append(buffer, n);
  const int status = ::pclose(pipe);
  const size_t brace = output.rfind("\n{");
  if (status != 0 || output.empty()) {
    result.reason = "tokenizer_hf.py failed: " + output;
    return result;
  }
  const auto j = nlohmann::json::parse(output.substr(brace == std::string::npos ? 0 : brace + 1));
  result.ok = true;
  result.encode_mb_s = j.at("encode_mb_s");
  result.batch_mb_s = j.at("batch_mb_s");
  result.tokens = j.at("tokens");
  result.version = j.at("version");
  return result;
}

int run(const Options& o) {
  const fs::path work = o.workdir.empty()
                            ? fs::temp_directory_path() / ("dsx-bench-tokenizer-" + std::to_string(::getpid()))
                            : fs::path(o.workdir);
  fs::create_directories(work);
  std::string corpus;
  std::string corpus_name;
  if (o.corpus.empty()) {
    corpus = CorpusGenerator(2024).text(static_cast<size_t>(o.megabytes * 1e6));
    corpus_name = "generated mixed-script text";
  } else {
    for (const std::string& f : o.corpus) corpus += read_file(f);
    corpus_name = fmt::format("{} file(s)", o.corpus.size());
  }
  const std::string corpus_path = (work / "corpus.txt").string();
  std::ofstream(corpus_path, std::ios::binary) << corpus;

  std::string tokenizer_path = o.tokenizer;
  double train_seconds = 0;
  if (tokenizer_path.empty()) {
    tokenizer_path = (work / "tokenizer.json").string();
    dsx::data::BpeTrainerOptions train;
    train.vocab_size = o.vocab_size;
    train.show_progress = false;
    train.threads = o.threads;
    const auto t0 = Clock::now();
    const std::vector<std::string> files = {corpus_path};
    dsx::data::train_bpe(files, train).save(tokenizer_path);
    train_seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  }
  const auto tokenizer = dsx::data::Tokenizer::load(tokenizer_path);
  const std::vector<std::string> docs = split_documents(corpus, o.doc_bytes);
  const double mb = static_cast<double>(corpus.size()) / 1e6;

  size_t tokens = 0;
  const double single = best_seconds(o.repeat, [&] {
    tokens = 0;
    for (const std::string& d : docs) tokens += tokenizer.encode(d).size();
  });
  const double batch = best_seconds(o.repeat, [&] { tokenizer.encode_batch(docs, o.threads); });

  fmt::print("corpus     {}: {:.1f} MB in {} documents of ~{} bytes\n", corpus_name, mb, docs.size(), o.doc_bytes);
  fmt::print("tokenizer  {} ({} tokens{}), {:.3f} tokens per byte\n", tokenizer_path, tokenizer.vocab_size(),
             o.tokenizer.empty() ? fmt::format(", trained here in {:.1f} s", train_seconds) : "",
             static_cast<double>(tokens) / static_cast<double>(corpus.size()));
  const HfResult hf = run_hf(o, tokenizer_path, corpus_path);
  fmt::print("\n{:<28}{:>12}{:>12}{:>10}\n", "", "dsx MB/s", "HF MB/s", "dsx/HF");
  auto row = [&](const std::string& name, double dsx_mb_s, double hf_mb_s) {
    if (hf.ok)
      fmt::print("{:<28}{:>12.2f}{:>12.2f}{:>10.2f}\n", name, dsx_mb_s, hf_mb_s, dsx_mb_s / hf_mb_s);
    else
      fmt::print("{:<28}{:>12.2f}{:>12}{:>10}\n", name, dsx_mb_s, "-", "-");
  };
  row("encode, 1 thread", mb / single, hf.encode_mb_s);
  row(fmt::format("encode_batch, {} threads", o.threads), mb / batch, hf.batch_mb_s);
  if (hf.ok) {
    fmt::print("\nHF tokenizers {}; token counts dsx {} HF {}{}\n", hf.version, tokens, hf.tokens,
               tokens == hf.tokens ? " (equal)" : " (DIFFERENT)");
  } else {
    fmt::print("\nHF comparison skipped: {}\n", hf.reason);
  }
  if (o.workdir.empty()) fs::remove_all(work);
  return hf.ok && tokens != hf.tokens ? 1 : 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{
      "bench_tokenizer: dsx byte-level BPE encoding MB/s (one thread, and encode_batch on --threads) against "
      "Hugging Face tokenizers on the same corpus and tokenizer.json (via tools/bench/tokenizer_hf.py and "
      "<repo>/.venv/bin/python; run tools/python-env.sh first). Without --tokenizer, a tokenizer is trained on the "
      "corpus first."};
  app.add_option("--corpus", o.corpus, "UTF-8 text file(s) to encode (default: generated mixed-script text)");
  app.add_option("--tokenizer", o.tokenizer, "tokenizer.json to use (default: train one on the corpus)");
  app.add_option("--mb", o.megabytes, "size of the generated corpus in MB")->capture_default_str();
  app.add_option("--vocab-size", o.vocab_size, "vocabulary size when training")->capture_default_str();
  app.add_option("--doc-bytes", o.doc_bytes, "document size the corpus is cut into")->capture_default_str();
  app.add_option("--threads", o.threads, "threads for encode_batch (dsx and HF)")->capture_default_str();
  app.add_option("--repeat", o.repeat, "passes per measurement; the best counts")->capture_default_str();
  app.add_option("--python", o.python, "Python with HF tokenizers (default: <repo>/.venv/bin/python)");
  app.add_option("--workdir", o.workdir, "keep corpus and tokenizer here (default: a temporary folder)");
  app.add_flag("--no-hf", o.no_hf, "measure dsx only");
  CLI11_PARSE(app, argc, argv);
  try {
    return run(o);
  } catch (const dsx::UserError& e) {
    fmt::print(stderr, "bench_tokenizer: error: {}\n", e.what());
    return 2;
  }
}
