// Internals of the byte-level BPE tokenizer (data/tokenizer.h). Private to data/tokenizer*.cpp.
//
// Semantics follow Hugging Face `tokenizers` so that ids match it exactly:
//   1. added tokens are cut out of the raw text first (leftmost-longest match; tokens with
//      normalized=false first, then the others in the remaining pieces);
//   2. each remaining piece runs through the pre-tokenizer stages (Split regexes with
//      Oniguruma, as HF does, then ByteLevel), each stage applied to every piece of the last;
//   3. each pre-token is BPE-merged by merge rank, lowest rank and leftmost pair first.
// HF only accepts valid UTF-8. dsx accepts any bytes: maximal runs of bytes that are not part
// of a valid UTF-8 character skip step 2 and are BPE-merged as pre-tokens of their own, and
// the valid runs around them are pre-tokenized independently.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "data/tokenizer.h"

namespace dsx::data::detail {

// Hash for unordered containers keyed by std::string that are searched with string_views.
struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

// ---- byte-level mapping (GPT-2's bytes_to_unicode) and UTF-8 --------------------------------

// The printable code point that stands for each byte in byte-level token text.
const std::array<char32_t, 256>& byte_to_codepoint();
// Byte-level token text (UTF-8) of raw bytes: every byte becomes its stand-in character.
std::string bytes_to_token_text(std::string_view bytes);
// Raw bytes of byte-level token text; nullopt when a character has no byte (e.g. "<think>"'s
// characters all have one, "<｜begin▁of▁sentence｜>"'s do not).
std::optional<std::string> token_text_to_bytes(std::string_view text);
// Length of the valid UTF-8 character starting at text[pos] (1..4), or 0 when the bytes there
// are not one (stray continuation byte, overlong form, surrogate, beyond U+10FFFF, truncated).
size_t utf8_char_length(std::string_view text, size_t pos);
bool is_valid_utf8(std::string_view text);
void append_utf8(std::string& out, char32_t cp);
// The code point of the valid UTF-8 character of `len` bytes at text[pos].
char32_t decode_utf8(std::string_view text, size_t pos, size_t len);

// Calls on_valid(run) and on_invalid(run) for the alternating maximal runs of `text` that are
// valid UTF-8 and that are not (bytes belonging to no valid character), in text order.
template <typename OnValid, typename OnInvalid>
void for_each_utf8_run(std::string_view text, OnValid&& on_valid, OnInvalid&& on_invalid) {
  size_t pos = 0;
  while (pos < text.size()) {
    const size_t valid_start = pos;
    while (pos < text.size()) {
      if (static_cast<unsigned char>(text[pos]) < 0x80) {  // ASCII: the common case
        ++pos;
        continue;
      }
      const size_t len = utf8_char_length(text, pos);
      if (len == 0) break;
      pos += len;
    }
    if (pos > valid_start) on_valid(text.substr(valid_start, pos - valid_start));
    const size_t invalid_start = pos;
    while (pos < text.size() && utf8_char_length(text, pos) == 0) ++pos;
    if (pos > invalid_start) on_invalid(text.substr(invalid_start, pos - invalid_start));
  }
}

// Worker threads for a requested count: itself when positive, else OMP_NUM_THREADS when set,
// else the hardware's.
int resolve_threads(int threads);

// ---- regular expressions (Oniguruma, the engine HF tokenizers uses) -------------------------

struct Match {
  size_t begin;
  size_t end;
};

class Regex {
 public:
  // Throws dsx::UserError naming `where` when the pattern does not compile.
  Regex(std::string_view pattern, const std::string& where);
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;
  ~Regex();
  // All matches in `text` (valid UTF-8), in the order and with the empty-match rule of the
  // onig crate's find_iter that HF tokenizers uses. Clears `out` first.
  void find_all(std::string_view text, std::vector<Match>& out) const;
  // True when the whole of `text` matches.
  bool matches_whole(std::string_view text) const;

 private:
  struct Compiled;
  std::unique_ptr<Compiled> compiled_;
};

// ---- the tokenizer.json content, as plain data ----------------------------------------------

struct AddedToken {
  TokenId id = 0;
  std::string content;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = false;
  bool special = true;
};

// One pre-tokenizer step. A tokenizer.json Sequence is flattened into a list of these.
struct PreTokenizerStage {
  enum class Kind { kSplit, kByteLevel };
  Kind kind = Kind::kByteLevel;
  // Split
  std::string pattern;
  bool pattern_is_regex = true;       // {"Regex": ...} rather than {"String": ...}
  std::string behavior = "Isolated";  // Isolated or Removed
  bool invert = false;
  // ByteLevel
  bool add_prefix_space = false;
  bool trim_offsets = true;  // only kept to be written back: dsx reports no offsets
  bool use_regex = true;
};

// What a tokenizer is made of; the JSON loader and the trainer both produce one.
struct TokenizerSpec {
  std::string source;                                       // file name for messages
  std::vector<std::pair<std::string, TokenId>> vocab;       // model vocabulary, token text
  std::vector<std::pair<std::string, std::string>> merges;  // in rank order, token text
  std::vector<AddedToken> added_tokens;
  std::vector<PreTokenizerStage> pre_tokenizer;  // ends with a ByteLevel stage
  std::optional<std::string> unk_token;
  bool fuse_unk = false;
  bool byte_fallback = false;
  bool ignore_merges = false;
  // Sections dsx does not interpret, kept as JSON text to be written back unchanged.
  std::string normalizer_json = "null";
  // Keys sorted, as after a load (see tokenizer_json.cpp), so save(load(save(t))) == save(t).
  std::string decoder_json = R"({"add_prefix_space":true,"trim_offsets":true,"type":"ByteLevel","use_regex":true})";
  std::string post_processor_json = "null";
  std::string truncation_json = "null";
  std::string padding_json = "null";
};

// The pre-tokenizer stages of DeepSeek-V3's tokenizer.json: Split on runs of up to three
// digits, on runs of CJK ideographs and kana, and on the GPT-4-like word pattern, then
// ByteLevel without a regex of its own.
std::vector<PreTokenizerStage> deepseek_v3_pre_tokenizer();
// GPT-2's: ByteLevel with its built-in regex.
std::vector<PreTokenizerStage> gpt2_pre_tokenizer();
// GPT-2's split regex, which the ByteLevel pre-tokenizer applies when use_regex is true.
extern const char* const kGpt2SplitPattern;

// ---- runtime pieces ---------------------------------------------------------------------------

// Finds added tokens in raw text with HF's rules (leftmost-longest; single_word, lstrip, rstrip).
class AddedTokenMatcher {
 public:
  struct Segment {
    size_t begin;
    size_t end;
    int64_t token;  // index into the token list given at construction, -1 for plain text
  };
  AddedTokenMatcher() = default;
  explicit AddedTokenMatcher(std::vector<AddedToken> tokens);
  bool empty() const { return tokens_.empty(); }
  const AddedToken& token(size_t index) const { return tokens_[index]; }
  // Splits `text` into plain and token segments covering it; empty plain segments omitted.
  void split(std::string_view text, std::vector<Segment>& out) const;

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int32_t>> children;  // sorted by byte
    int32_t token = -1;
  };
  // Longest token starting at `pos`, as (token index, length), or (-1, 0).
  std::pair<int32_t, size_t> longest_at(std::string_view text, size_t pos) const;
  std::vector<AddedToken> tokens_;
  std::vector<Node> nodes_;
  std::array<bool, 256> first_byte_{};
};

// Runs the pre-tokenizer stages over valid UTF-8 text and hands each pre-token to a callback.
class PreTokenizer {
 public:
  PreTokenizer() = default;
  PreTokenizer(const std::vector<PreTokenizerStage>& stages, const std::string& source);
  template <typename Emit>
  void run(std::string_view text, Emit&& emit) const;

 private:
  struct Step {
    enum class Matcher { kNone, kRegex, kLiteral };
    Matcher matcher = Matcher::kNone;  // kNone: ByteLevel without its regex splits nothing
    std::optional<Regex> regex;
    std::string literal;
    bool remove_matches = false;  // Split behavior Removed
    bool invert = false;
    bool prefix_space = false;  // ByteLevel add_prefix_space
  };
  template <typename Emit>
  void run_from(size_t step, std::string_view piece, Emit& emit) const;
  template <typename Emit>
  void split_then_continue(size_t step, std::string_view piece, Emit& emit) const;
  void split_piece(const Step& step, std::string_view piece, std::vector<std::string_view>& out) const;
  std::vector<Step> steps_;
};

// BPE over raw bytes: token ids start as the ids of single bytes and merge by rank.
class BpeModel {
 public:
  BpeModel() = default;
  BpeModel(const TokenizerSpec& spec, const std::unordered_map<std::string, TokenId>& vocab_ids);
  // Appends the ids of one pre-token (raw bytes). Thread-safe.
  void encode_word(std::string_view bytes, std::vector<TokenId>& out) const;

 private:
  struct MergeRule {
    uint32_t rank;
    TokenId result;
  };
  static uint64_t pair_key(TokenId a, TokenId b) { return (uint64_t{a} << 32) | b; }
  const MergeRule* find_merge(TokenId a, TokenId b) const;
  void initial_symbols(std::string_view bytes, std::vector<TokenId>& symbols) const;
  void merge_small(std::vector<TokenId>& symbols) const;
  void merge_large(std::vector<TokenId>& symbols) const;
  void cache_store(std::string_view bytes, const TokenId* ids, size_t count) const;
  bool cache_lookup(std::string_view bytes, std::vector<TokenId>& out) const;

  std::array<int64_t, 256> byte_id_{};
  std::unordered_map<uint64_t, MergeRule> merges_;
  std::unordered_map<std::string, TokenId, StringHash, std::equal_to<>> whole_word_;  // ignore_merges
  bool ignore_merges_ = false;
  std::optional<TokenId> unk_;
  bool fuse_unk_ = false;

  struct CacheShard {
    std::shared_mutex mutex;
    std::unordered_map<std::string, std::vector<TokenId>, StringHash, std::equal_to<>> words;
  };
  static constexpr size_t kCacheShards = 32;
  static constexpr size_t kCacheEntriesPerShard = 4096;
  static constexpr size_t kCacheMaxWordBytes = 256;  // longer words are rare; HF skips them too
  std::unique_ptr<CacheShard[]> cache_;              // shared by all threads; see encode_word
};

template <typename Emit>
void PreTokenizer::run(std::string_view text, Emit&& emit) const {
  run_from(0, text, emit);
}

template <typename Emit>
void PreTokenizer::run_from(size_t step, std::string_view piece, Emit& emit) const {
  if (piece.empty()) return;
  if (step == steps_.size()) {
    emit(piece);
    return;
  }
  const Step& s = steps_[step];
  if (s.prefix_space && piece.front() != ' ') {
    // HF's ByteLevel prepends a space to every piece that lacks one, before its own regex.
    std::string spaced = " ";
    spaced += piece;
    split_then_continue(step, spaced, emit);
    return;
  }
  split_then_continue(step, piece, emit);
}

template <typename Emit>
void PreTokenizer::split_then_continue(size_t step, std::string_view piece, Emit& emit) const {
  const Step& s = steps_[step];
  if (s.matcher == Step::Matcher::kNone) {
    run_from(step + 1, piece, emit);
    return;
  }
  // One scratch list per stage and thread: a stage's list is only reused by its own siblings,
  // which run after the deeper stages they called have returned.
  thread_local std::vector<std::vector<std::string_view>> scratch;
  if (scratch.size() < steps_.size()) scratch.resize(steps_.size());
  std::vector<std::string_view>& parts = scratch[step];
  split_piece(s, piece, parts);
  for (size_t i = 0; i < parts.size(); ++i) run_from(step + 1, parts[i], emit);
}

}  // namespace dsx::data::detail

// The tokenizer's state. Defined here so that the JSON, training and encoding files share it.
namespace dsx::data {

struct Tokenizer::Impl {
  explicit Impl(detail::TokenizerSpec spec);

  detail::TokenizerSpec spec;
  detail::PreTokenizer pre_tokenizer;
  detail::BpeModel bpe;
  detail::AddedTokenMatcher raw_matcher;               // added tokens with normalized=false
  detail::AddedTokenMatcher normalized_matcher;        // the others
  std::unordered_map<std::string, TokenId> token_ids;  // token text and added contents -> id
  std::vector<std::string> id_bytes;                   // what decode writes for each id
  std::vector<bool> id_known;
  size_t vocab_size = 0;
  int64_t bos = -1, eos = -1, pad = -1;
  std::string content_hash;

  void encode_into(std::string_view text, std::vector<TokenId>& out) const;
  void encode_plain(std::string_view text, std::vector<TokenId>& out) const;
};

}  // namespace dsx::data
