// Byte-level BPE tokenizer, compatible with Hugging Face `tokenizer.json` files of the kind
// DeepSeek-V3 ships: a BPE model with a byte-level pre-tokenizer (GPT-2 byte-to-unicode map)
// and a GPT-style split regex, merges, and added/special tokens (BOS/EOS/PAD, <think>...).
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsx::data {

using TokenId = uint32_t;

class Tokenizer {
 public:
  // Throws dsx::UserError naming the file (and the JSON path) when it cannot be used.
  static Tokenizer load(const std::string& path);
  static Tokenizer from_json(std::string_view json_text, const std::string& source_name);
  void save(const std::string& path) const;  // written atomically (temporary name + rename)

  // Ids exactly as HF tokenizers' encode(text, add_special_tokens=False) gives them for valid
  // UTF-8 (no BOS/EOS added: callers add them). Arbitrary bytes are accepted: a run of bytes
  // that are not valid UTF-8 is BPE-merged as a pre-token of its own, and the valid text
  // around it is pre-tokenized independently. Thread-safe.
  std::vector<TokenId> encode(std::string_view text) const;
  // Encodes many documents on `threads` threads (0 = OMP/hardware default); order kept.
  std::vector<std::vector<TokenId>> encode_batch(std::span<const std::string> texts, int threads = 0) const;
  // decode(encode(s)) == s for any bytes, provided every byte has a token and the pre-tokenizer
  // adds no prefix space (both always hold for tokenizers dsx trains). Added tokens decode to
  // their content. Throws dsx::UserError for an id outside the vocabulary.
  std::string decode(std::span<const TokenId> ids) const;

  size_t vocab_size() const;  // 1 + the largest id, added tokens included: the embedding rows
  // Special tokens by role; -1 when the tokenizer has none. tokenizer.json records no roles, so
  // they come from well-known spellings of special tokens: <|begin_of_sentence|> (dsx's own),
  // DeepSeek's <｜begin▁of▁sentence｜>, <s>, <|begin_of_text|>...; likewise for EOS and PAD.
  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;
  int64_t token_id(std::string_view token) const;  // -1 if absent
  // Stable content hash (hex) of vocabulary, merges and added tokens: datasets record it so
  // a dataset tokenized with another tokenizer is refused. The pre-tokenizer and BPE options,
  // which change ids as well, are part of it.
  std::string hash() const;
  // Added tokens (special or not) as (content, id), in tokenizer.json order.
  std::vector<std::pair<std::string, TokenId>> added_tokens() const;
  size_t merges_count() const;

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // The state lives in data/tokenizer_impl.h; only the data library's factories make one.
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);

 private:
  std::unique_ptr<Impl> impl_;
};

struct BpeTrainerOptions {
  size_t vocab_size = 4096;  // final size including the 256 byte tokens and special tokens
  std::vector<std::string> special_tokens = {"<|begin_of_sentence|>", "<|end_of_sentence|>", "<|pad|>", "<think>",
                                             "</think>"};
  size_t min_frequency = 2;   // pairs seen fewer times are never merged
  int threads = 0;            // word counting threads (0 = OMP_NUM_THREADS or hardware)
  bool show_progress = true;  // progress lines on stderr
  // Split rules of the trained tokenizer: "deepseek-v3" (DeepSeek-V3's Split sequence: digits
  // in runs of up to three, CJK runs, a GPT-4-like word pattern) or "gpt2" (GPT-2's regex).
  std::string pre_tokenizer = "deepseek-v3";
};
// Trains a byte-level BPE vocabulary on the given files (read as raw bytes). Ids: the special
// tokens first (0, 1, ...), then the 256 bytes in byte order, then one id per new merge; ties
// between equally frequent pairs go to the smaller (left id, right id), so the result is the
// same for any thread count. Throws dsx::UserError for unreadable files or impossible options.
Tokenizer train_bpe(std::span<const std::string> files, const BpeTrainerOptions& options);

}  // namespace dsx::data
