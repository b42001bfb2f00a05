// Byte-level BPE tokenizer, compatible with Hugging Face `tokenizer.json` files of the kind
// DeepSeek-V3 ships: a BPE model with a byte-level pre-tokenizer (GPT-2 byte-to-unicode map)
// and a GPT-style split regex, merges, and added/special tokens (BOS/EOS/PAD, <think>...).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsx::data {

using TokenId = uint32_t;

class Tokenizer {
 public:
  // Throws dsx::UserError naming the file (and the JSON path) when it cannot be used.
  static Tokenizer load(const std::string& path);
  static Tokenizer from_json(std::string_view json_text, const std::string& source_name);
  void save(const std::string& path) const;  // written atomically (temporary name + rename)

  std::vector<TokenId> encode(std::string_view text) const;  // arbitrary bytes accepted
  // Encodes many documents on `threads` threads (0 = OMP/hardware default); order kept.
  std::vector<std::vector<TokenId>> encode_batch(std::span<const std::string> texts, int threads = 0) const;
  std::string decode(std::span<const TokenId> ids) const;  // decode(encode(s)) == s for any bytes

  size_t vocab_size() const;  // including added tokens
  // Special tokens by role; -1 when the tokenizer has none.
  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;
  int64_t token_id(std::string_view token) const;  // -1 if absent
  // Stable content hash (hex) of vocabulary, merges and added tokens: datasets record it so
  // a dataset tokenized with another tokenizer is refused.
  std::string hash() const;

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

struct BpeTrainerOptions {
  size_t vocab_size = 4096;  // final size including the 256 byte tokens and special tokens
  std::vector<std::string> special_tokens = {"<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>",
                                              "<think>", "</think>"};
  size_t min_frequency = 2;
  int threads = 0;
  bool show_progress = true;
};
// Trains a byte-level BPE vocabulary on the given files (read as raw bytes).
Tokenizer train_bpe(std::span<const std::string> files, const BpeTrainerOptions& options);

}  // namespace dsx::data
