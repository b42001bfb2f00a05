// Shared pieces of the tokenizer tests: a deterministic mixed corpus, scratch directories,
// tokenizers trained once per test run.
#pragma once
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "kernels/error.h"

namespace dsx::data::test {

// A directory under the system temp folder, removed with everything in it at scope exit.
class ScratchDir {
 public:
  explicit ScratchDir(const std::string& tag) {
    static int counter = 0;
    path_ = std::filesystem::temp_directory_path() /
            ("dsx-" + tag + "-" + std::to_string(::getpid()) + "-" + std::to_string(counter++));
    std::filesystem::create_directories(path_);
  }
  ~ScratchDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  std::string write(const std::string& name, const std::string& bytes) const {
    std::ofstream(file(name), std::ios::binary) << bytes;
    return file(name);
  }

 private:
  std::filesystem::path path_;
};

// Documents covering what the tokenizer must handle: English with contractions, German
// umlauts, Chinese and Japanese, other scripts, combining marks, code, emoji (ZWJ sequences
// and modifiers included), whitespace runs of every kind, digits, special tokens in text.
inline std::vector<std::string> mixed_documents() {
  return {
      "The quick brown fox jumps over the lazy dog.",
      "It's what they'd've wanted, isn't it? I'LL SEE.",
      "Grüße aus München! Die Bäume blühen über den Flüssen. Äpfel, Öl und Übermut.",
      "中文分词测试，你好世界。深度求索发布了新的模型。",
      "日本語のテキストとカタカナ、ひらがな。한국어 문장입니다.",
      "Привет, мир! Ελληνικά γράμματα. مرحبا بالعالم",
      "café naïve résumé e\u0301 a\u0308",
      "def f(x):\n    return x ** 2  # square\n",
      "for (int i = 0; i < n; ++i) { sum += a[i]; }\n\treturn sum;",
      "😀🎉👍🏽 family: 👨\u200d👩\u200d👧\u200d👦 flags 🇩🇪🇨🇳 ✓ → ∑ ∞",
      "  two  spaces\tand\ttabs\n\n\nthree newlines\r\n\r\nwindows   ",
      "\u00a0nbsp\u3000ideographic space",
      "3.14159265358979 1234567890 0x1F 1e-9 ١٢٣ ½ 2024年3月15日 v1.2.3-rc4",
      "<|begin_of_sentence|>Hello<|end_of_sentence|><think>step 1</think>answer<|pad|>",
  };
}

// Training text built from the documents' words, so training has repeated material to merge.
inline std::string training_corpus(size_t lines, uint32_t seed) {
  std::vector<std::string> words;
  for (const std::string& doc : mixed_documents()) {
    size_t start = 0;
    for (size_t i = 0; i <= doc.size(); ++i) {
      if (i == doc.size() || doc[i] == ' ') {
        if (i > start) words.push_back(doc.substr(start, i - start));
        start = i + 1;
      }
    }
  }
  std::mt19937 rng(seed);
  std::string text;
  for (size_t line = 0; line < lines; ++line) {
    const size_t n = 3 + rng() % 12;
    for (size_t w = 0; w < n; ++w) {
      if (w) text += rng() % 8 == 0 ? "  " : " ";
      text += words[rng() % words.size()];
    }
    text += rng() % 5 == 0 ? "\n\n" : "\n";
  }
  return text;
}

// Trained once per test run and shared: DeepSeek-V3 split rules, 800 tokens.
inline const Tokenizer& deepseek_style_tokenizer() {
  static const Tokenizer tokenizer = [] {
    ScratchDir dir("tok-train");
    const std::vector<std::string> files = {dir.write("corpus.txt", training_corpus(4000, 7))};
    BpeTrainerOptions options;
    options.vocab_size = 800;
    options.show_progress = false;
    options.threads = 2;
    return train_bpe(files, options);
  }();
  return tokenizer;
}

// The same with GPT-2's split regex.
inline const Tokenizer& gpt2_style_tokenizer() {
  static const Tokenizer tokenizer = [] {
    ScratchDir dir("tok-train-gpt2");
    const std::vector<std::string> files = {dir.write("corpus.txt", training_corpus(4000, 11))};
    BpeTrainerOptions options;
    options.vocab_size = 700;
    options.show_progress = false;
    options.pre_tokenizer = "gpt2";
    return train_bpe(files, options);
  }();
  return tokenizer;
}

}  // namespace dsx::data::test
