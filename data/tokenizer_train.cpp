// Byte-level BPE training: count pre-tokens ("words") over the corpus on several threads, then
// repeatedly merge the most frequent adjacent pair. Pair counts are updated incrementally: a
// merge touches only the words that contain the pair (an index from pair to words), and a
// max-heap with lazy deletion picks the next pair.
#include <unistd.h>

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <exception>
#include <fstream>
#include <mutex>
#include <queue>
#include <sstream>
#include <thread>
#include <unordered_map>
#include <unordered_set>

#include "data/tokenizer.h"
#include "data/tokenizer_impl.h"
#include "kernels/error.h"

namespace dsx::data {
namespace {

using detail::AddedToken;
using detail::PreTokenizerStage;
using Clock = std::chrono::steady_clock;

constexpr size_t kChunkBytes = 1 << 20;

// Progress lines on stderr: rewritten in place on a terminal, at most one per few seconds
// otherwise (logs of batch jobs stay short).
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled), tty_(enabled && ::isatty(STDERR_FILENO)) {}
  void update(const std::string& line, bool force = false) {
    if (!enabled_) return;
    const auto now = Clock::now();
    const auto gap = tty_ ? std::chrono::milliseconds(200) : std::chrono::milliseconds(5000);
    if (!force && now - last_ < gap) return;
    last_ = now;
    if (tty_)
      fmt::print(stderr, "\r\033[K{}", line);
    else
      fmt::print(stderr, "{}\n", line);
    dirty_ = tty_;
  }
  void finish(const std::string& line) {
    if (!enabled_) return;
    if (dirty_) fmt::print(stderr, "\r\033[K");
    fmt::print(stderr, "{}\n", line);
    dirty_ = false;
  }

 private:
  bool enabled_;
  bool tty_;
  bool dirty_ = false;
  Clock::time_point last_{};
};

using WordCounts = std::unordered_map<std::string, uint64_t, detail::StringHash, std::equal_to<>>;

std::string read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot open training file " + path + ": " + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw UserError("cannot read training file " + path + ": " + std::strerror(errno));
  return buffer.str();
}

// Chunk boundaries that do not depend on the thread count: after a line feed followed by an
// ASCII letter, the first such place past every kChunkBytes. No split pattern dsx trains with
// lets a pre-token run across "\n" + letter, so counts equal those of the unsplit text.
std::vector<std::string_view> chunks_of(std::string_view text) {
  std::vector<std::string_view> chunks;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.size();
    for (size_t pos = start + kChunkBytes; pos + 1 < text.size(); ++pos) {
      pos = text.find('\n', pos);
      if (pos == std::string_view::npos || pos + 1 >= text.size()) break;
      const char next = text[pos + 1];
      if ((next >= 'a' && next <= 'z') || (next >= 'A' && next <= 'Z')) {
        end = pos + 1;
        break;
      }
    }
    chunks.push_back(text.substr(start, end - start));
    start = end;
  }
  return chunks;
}

// Pre-tokens of one chunk: special tokens are cut out (they never merge with text), valid UTF-8
// runs go through the pre-tokenizer, invalid byte runs count as words of their own, exactly as
// encoding will see them.
void count_chunk(std::string_view chunk, const detail::AddedTokenMatcher& specials, const detail::PreTokenizer& pre,
                 WordCounts& counts) {
  std::vector<detail::AddedTokenMatcher::Segment> segments;
  specials.split(chunk, segments);
  auto add = [&](std::string_view word) {
    if (auto it = counts.find(word); it != counts.end())
      ++it->second;
    else
      counts.emplace(word, 1);
  };
  for (const auto& seg : segments) {
    if (seg.token >= 0) continue;
    detail::for_each_utf8_run(
        chunk.substr(seg.begin, seg.end - seg.begin), [&](std::string_view valid) { pre.run(valid, add); }, add);
  }
}

WordCounts count_words(std::span<const std::string> files, const detail::AddedTokenMatcher& specials,
                       const detail::PreTokenizer& pre, int threads, Progress& progress) {
  const int workers = detail::resolve_threads(threads);
  std::vector<WordCounts> partial(static_cast<size_t>(workers));
  uint64_t bytes_done = 0;
  for (size_t f = 0; f < files.size(); ++f) {
    const std::string text = read_whole_file(files[f]);
    const std::vector<std::string_view> chunks = chunks_of(text);
    std::atomic<size_t> next{0};
    std::atomic<uint64_t> bytes_in_file{0};
    std::exception_ptr failure;
    std::mutex failure_mutex;
    auto work = [&](size_t w, bool report) {
      try {
        for (size_t c = next++; c < chunks.size(); c = next++) {
          count_chunk(chunks[c], specials, pre, partial[w]);
          bytes_in_file += chunks[c].size();
          if (report)
            progress.update(fmt::format("tokenizer train: counting words, file {}/{}, {:.1f} MB", f + 1, files.size(),
                                        static_cast<double>(bytes_done + bytes_in_file) / 1e6));
        }
      } catch (...) {
        std::lock_guard lock(failure_mutex);
        if (!failure) failure = std::current_exception();
        next = chunks.size();
      }
    };
    {
      std::vector<std::jthread> pool;
      for (int w = 1; w < workers; ++w) pool.emplace_back(work, static_cast<size_t>(w), false);
      work(0, true);  // this thread works too and reports progress
    }
    if (failure) std::rethrow_exception(failure);
    bytes_done += text.size();
  }
  WordCounts total = std::move(partial[0]);
  for (size_t w = 1; w < partial.size(); ++w)
    for (const auto& [word, n] : partial[w]) total[word] += n;
  progress.finish(fmt::format("tokenizer train: {} files, {:.1f} MB, {} distinct words", files.size(),
                              static_cast<double>(bytes_done) / 1e6, total.size()));
  return total;
}

struct Word {
  std::vector<TokenId> symbols;
  uint64_t count;
};

uint64_t pair_key(TokenId a, TokenId b) {
  return (uint64_t{a} << 32) | b;
}
TokenId left_of(uint64_t key) {
  return static_cast<TokenId>(key >> 32);
}
TokenId right_of(uint64_t key) {
  return static_cast<TokenId>(key & 0xFFFFFFFFu);
}

struct Candidate {
  int64_t count;
  uint64_t key;
  // Max-heap order: more frequent first, then the smaller (left id, right id).
  bool operator<(const Candidate& o) const { return count != o.count ? count < o.count : key > o.key; }
};

// The merge loop's state: words as symbol ids, pair counts, the words each pair occurs in.
class MergeLearner {
 public:
  // `forbidden`: byte strings no learned token may have (those whose token text would equal a
  // special token's content).
  MergeLearner(const WordCounts& counts, TokenId first_byte_id, std::vector<std::string> token_bytes,
               std::unordered_set<std::string> forbidden)
      : token_bytes_(std::move(token_bytes)), forbidden_(std::move(forbidden)) {
    // Sorted words make the word indices, and so everything after, independent of hashing.
    std::vector<const std::pair<const std::string, uint64_t>*> sorted;
    sorted.reserve(counts.size());
    for (const auto& entry : counts) sorted.push_back(&entry);
    std::sort(sorted.begin(), sorted.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
    words_.reserve(sorted.size());
    for (const auto* entry : sorted) {
      Word w{{}, entry->second};
      for (char c : entry->first) w.symbols.push_back(first_byte_id + static_cast<unsigned char>(c));
      words_.push_back(std::move(w));
    }
    for (size_t i = 0; i < token_bytes_.size(); ++i) id_of_bytes_.emplace(token_bytes_[i], static_cast<TokenId>(i));
    for (uint32_t w = 0; w < words_.size(); ++w) {
      const auto& s = words_[w].symbols;
      for (size_t i = 0; i + 1 < s.size(); ++i) {
        const uint64_t key = pair_key(s[i], s[i + 1]);
        pair_counts_[key] += static_cast<int64_t>(words_[w].count);
        note_word(key, w);
      }
    }
    for (const auto& [key, count] : pair_counts_) heap_.push({count, key});
  }

  // Learns merges until the vocabulary has `target` tokens or no pair is frequent enough.
  void run(size_t target, uint64_t min_frequency, Progress& progress) {
    const size_t start = token_bytes_.size();
    while (token_bytes_.size() < target && !heap_.empty()) {
      const Candidate top = heap_.top();
      heap_.pop();
      auto it = pair_counts_.find(top.key);
      if (it == pair_counts_.end() || it->second != top.count) continue;  // stale entry
      if (static_cast<uint64_t>(top.count) < min_frequency) break;
      if (!apply_merge(top.key)) continue;
      progress.update(fmt::format("tokenizer train: {} / {} tokens learned (last pair seen {} times)",
                                  token_bytes_.size() - start, target - start, top.count));
    }
  }

  const std::vector<std::pair<TokenId, TokenId>>& merges() const { return merges_; }
  const std::vector<std::string>& token_bytes() const { return token_bytes_; }

 private:
  void note_word(uint64_t key, uint32_t w) {
    auto& list = where_[key];
    if (list.empty() || list.back() != w) list.push_back(w);
  }

  TokenId token_for(const std::string& bytes) {
    auto [it, fresh] = id_of_bytes_.emplace(bytes, static_cast<TokenId>(token_bytes_.size()));
    if (fresh) token_bytes_.push_back(bytes);
    return it->second;  // the same bytes reached by another pair reuse the id, as HF does
  }

  // Merges the pair everywhere; false (and the pair dropped) when its token is forbidden.
  bool apply_merge(uint64_t key) {
    const TokenId a = left_of(key), b = right_of(key);
    const std::string merged_bytes = token_bytes_[a] + token_bytes_[b];
    if (forbidden_.count(merged_bytes)) {
      pair_counts_.erase(key);
      where_.erase(key);
      return false;
    }
    const TokenId merged = token_for(merged_bytes);
    merges_.emplace_back(a, b);
    std::vector<uint32_t> affected = std::move(where_[key]);
    where_.erase(key);
    std::sort(affected.begin(), affected.end());
    affected.erase(std::unique(affected.begin(), affected.end()), affected.end());
    std::unordered_map<uint64_t, int64_t> delta;
    for (uint32_t w : affected) merge_in_word(w, a, b, merged, delta);
    for (const auto& [k, d] : delta) {
      if (d == 0) continue;
      int64_t& count = pair_counts_[k];
      count += d;
      if (count > 0)
        heap_.push({count, k});
      else
        pair_counts_.erase(k);
    }
    return true;
  }

  // Rewrites one word with the pair merged (left to right, non-overlapping) and records how
  // its pair counts change.
  void merge_in_word(uint32_t w, TokenId a, TokenId b, TokenId merged, std::unordered_map<uint64_t, int64_t>& delta) {
    Word& word = words_[w];
    auto& s = word.symbols;
    bool found = false;
    for (size_t i = 0; i + 1 < s.size() && !found; ++i) found = s[i] == a && s[i + 1] == b;
    if (!found) return;
    const auto count = static_cast<int64_t>(word.count);
    for (size_t i = 0; i + 1 < s.size(); ++i) delta[pair_key(s[i], s[i + 1])] -= count;
    std::vector<TokenId> out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size(); ++i) {
      if (i + 1 < s.size() && s[i] == a && s[i + 1] == b) {
        out.push_back(merged);
        ++i;
      } else {
        out.push_back(s[i]);
      }
    }
    s = std::move(out);
    for (size_t i = 0; i + 1 < s.size(); ++i) {
      const uint64_t k = pair_key(s[i], s[i + 1]);
      delta[k] += count;
      if (s[i] == merged || s[i + 1] == merged) note_word(k, w);
    }
  }

  std::vector<Word> words_;
  std::vector<std::string> token_bytes_;  // raw bytes of every token id; specials hold ""
  std::unordered_map<std::string, TokenId> id_of_bytes_;
  std::unordered_map<uint64_t, int64_t> pair_counts_;
  std::unordered_map<uint64_t, std::vector<uint32_t>> where_;
  std::priority_queue<Candidate> heap_;
  std::vector<std::pair<TokenId, TokenId>> merges_;
  std::unordered_set<std::string> forbidden_;
};

void check_options(std::span<const std::string> files, const BpeTrainerOptions& options) {
  if (files.empty()) throw UserError("tokenizer train: no training files given");
  for (const std::string& f : files) {
    std::ifstream probe(f, std::ios::binary);
    if (!probe) throw UserError("cannot open training file " + f + ": " + std::strerror(errno));
  }
  const size_t minimum = 256 + options.special_tokens.size();
  if (options.vocab_size < minimum)
    throw UserError(
        fmt::format("tokenizer train: vocab size {} is too small: it must hold the 256 byte tokens and "
                    "the {} special tokens (at least {})",
                    options.vocab_size, options.special_tokens.size(), minimum));
  if (options.vocab_size > (uint64_t{1} << 32))
    throw UserError(fmt::format("tokenizer train: vocab size {} does not fit 32-bit token ids", options.vocab_size));
  if (options.pre_tokenizer != "deepseek-v3" && options.pre_tokenizer != "gpt2")
    throw UserError("tokenizer train: unknown pre-tokenizer '" + options.pre_tokenizer +
                    "' (choose deepseek-v3 or gpt2)");
  std::unordered_set<std::string> seen;
  for (const std::string& t : options.special_tokens) {
    if (t.empty()) throw UserError("tokenizer train: a special token is empty");
    if (!detail::is_valid_utf8(t)) throw UserError("tokenizer train: special token '" + t + "' is not valid UTF-8");
    if (!seen.insert(t).second) throw UserError("tokenizer train: special token '" + t + "' is given twice");
    if (detail::token_text_to_bytes(t) && detail::token_text_to_bytes(t)->size() == 1)
      throw UserError("tokenizer train: special token '" + t + "' would collide with a byte token");
  }
}

}  // namespace

Tokenizer train_bpe(std::span<const std::string> files, const BpeTrainerOptions& options) {
  check_options(files, options);
  Progress progress(options.show_progress);
  detail::TokenizerSpec spec;
  spec.source = "trained tokenizer";
  spec.pre_tokenizer =
      options.pre_tokenizer == "gpt2" ? detail::gpt2_pre_tokenizer() : detail::deepseek_v3_pre_tokenizer();

  std::vector<AddedToken> specials;
  for (size_t i = 0; i < options.special_tokens.size(); ++i) {
    AddedToken t;
    t.id = static_cast<TokenId>(i);
    t.content = options.special_tokens[i];
    t.special = true;
    t.normalized = false;
    specials.push_back(t);
  }
  const detail::AddedTokenMatcher special_matcher(specials);
  const detail::PreTokenizer pre(spec.pre_tokenizer, spec.source);
  const WordCounts counts = count_words(files, special_matcher, pre, options.threads, progress);

  // Ids: specials, then the 256 bytes, then learned tokens.
  const auto first_byte_id = static_cast<TokenId>(specials.size());
  std::vector<std::string> token_bytes(specials.size());
  for (int b = 0; b < 256; ++b) token_bytes.emplace_back(1, static_cast<char>(b));
  std::unordered_set<std::string> forbidden;
  for (const AddedToken& t : specials)
    if (auto raw = detail::token_text_to_bytes(t.content)) forbidden.insert(std::move(*raw));
  MergeLearner learner(counts, first_byte_id, std::move(token_bytes), std::move(forbidden));
  learner.run(options.vocab_size, options.min_frequency, progress);

  const auto& bytes = learner.token_bytes();
  for (const AddedToken& t : specials) spec.vocab.emplace_back(t.content, t.id);
  for (size_t id = specials.size(); id < bytes.size(); ++id)
    spec.vocab.emplace_back(detail::bytes_to_token_text(bytes[id]), static_cast<TokenId>(id));
  for (const auto& [a, b] : learner.merges())
    spec.merges.emplace_back(detail::bytes_to_token_text(bytes[a]), detail::bytes_to_token_text(bytes[b]));
  spec.added_tokens = std::move(specials);
  progress.finish(fmt::format(
      "tokenizer train: vocabulary of {} tokens ({} merges){}", bytes.size(), learner.merges().size(),
      bytes.size() < options.vocab_size
          ? " - the corpus has no more pairs seen at least " + std::to_string(options.min_frequency) + " times"
          : ""));
  return Tokenizer(std::make_unique<Tokenizer::Impl>(std::move(spec)));
}

}  // namespace dsx::data
