// The BPE model: a pre-token's bytes start as single-byte tokens and the adjacent pair with the
// lowest merge rank (leftmost among equals) merges until no pair has a rule, as in HF's
// Word::merge_all. Results are cached per word.
#include <algorithm>
#include <limits>
#include <mutex>
#include <queue>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer_impl.h"
#include "kernels/error.h"

namespace dsx::data::detail {
namespace {

constexpr uint32_t kNoRank = std::numeric_limits<uint32_t>::max();
// Words up to this many symbols merge with a linear scan; longer ones (long CJK runs,
// whitespace runs, binary junk) use a heap so the cost stays O(n log n).
constexpr size_t kLinearMergeLimit = 48;

TokenId lookup_model_token(const std::unordered_map<std::string, TokenId>& vocab_ids, const std::string& text,
                           const std::string& where) {
  auto it = vocab_ids.find(text);
  if (it == vocab_ids.end()) throw UserError(where + ": token '" + text + "' is not in model.vocab");
  return it->second;
}

}  // namespace

BpeModel::BpeModel(const TokenizerSpec& spec, const std::unordered_map<std::string, TokenId>& vocab_ids)
    : ignore_merges_(spec.ignore_merges),
      fuse_unk_(spec.fuse_unk),
      cache_(std::make_unique<CacheShard[]>(kCacheShards)) {
  for (int b = 0; b < 256; ++b) {
    auto it = vocab_ids.find(bytes_to_token_text(std::string(1, static_cast<char>(b))));
    byte_id_[b] = it == vocab_ids.end() ? -1 : int64_t{it->second};
  }
  merges_.reserve(spec.merges.size());
  for (size_t rank = 0; rank < spec.merges.size(); ++rank) {
    const auto& [left, right] = spec.merges[rank];
    const std::string where = spec.source + ": model.merges[" + std::to_string(rank) + "]";
    TokenId a = lookup_model_token(vocab_ids, left, where);
    TokenId b = lookup_model_token(vocab_ids, right, where);
    TokenId result = lookup_model_token(vocab_ids, left + right, where);
    // Like HF (a map built from the list), a repeated pair keeps its last rank.
    merges_.insert_or_assign(pair_key(a, b), MergeRule{static_cast<uint32_t>(rank), result});
  }
  if (spec.unk_token) unk_ = lookup_model_token(vocab_ids, *spec.unk_token, spec.source + ": model.unk_token");
  if (ignore_merges_) {
    for (const auto& [text, id] : spec.vocab) {
      if (auto bytes = token_text_to_bytes(text)) whole_word_.emplace(std::move(*bytes), id);
    }
  }
}

const BpeModel::MergeRule* BpeModel::find_merge(TokenId a, TokenId b) const {
  auto it = merges_.find(pair_key(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

// Bytes without a token become the unknown token (fused if asked) or, without one, vanish:
// HF's behaviour. A byte-level vocabulary trained by dsx or with HF's full initial alphabet
// has all 256 bytes, so nothing is lost.
void BpeModel::initial_symbols(std::string_view bytes, std::vector<TokenId>& symbols) const {
  symbols.clear();
  bool previous_unknown = false;
  for (char c : bytes) {
    int64_t id = byte_id_[static_cast<unsigned char>(c)];
    if (id >= 0) {
      symbols.push_back(static_cast<TokenId>(id));
      previous_unknown = false;
    } else if (unk_) {
      if (!(fuse_unk_ && previous_unknown)) symbols.push_back(*unk_);
      previous_unknown = true;
    }
  }
}

void BpeModel::merge_small(std::vector<TokenId>& symbols) const {
  thread_local std::vector<const MergeRule*> rules;  // rules[i]: merge of symbols i and i+1
  if (symbols.size() < 2) return;
  rules.resize(symbols.size() - 1);
  for (size_t i = 0; i + 1 < symbols.size(); ++i) rules[i] = find_merge(symbols[i], symbols[i + 1]);
  while (true) {
    size_t best = rules.size();
    uint32_t best_rank = kNoRank;
    for (size_t i = 0; i < rules.size(); ++i) {
      if (rules[i] && rules[i]->rank < best_rank) {
        best_rank = rules[i]->rank;
        best = i;
      }
    }
    if (best == rules.size()) return;
    symbols[best] = rules[best]->result;
    symbols.erase(symbols.begin() + static_cast<std::ptrdiff_t>(best) + 1);
    rules.erase(rules.begin() + static_cast<std::ptrdiff_t>(best));
    if (best > 0) rules[best - 1] = find_merge(symbols[best - 1], symbols[best]);
    if (best < rules.size()) rules[best] = find_merge(symbols[best], symbols[best + 1]);
  }
}

void BpeModel::merge_large(std::vector<TokenId>& symbols) const {
  struct Symbol {
    TokenId id;
    int64_t prev;
    int64_t next;
    bool alive;
  };
  struct Candidate {
    uint32_t rank;
    size_t pos;  // index of the left symbol
    bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const auto n = static_cast<int64_t>(symbols.size());
  std::vector<Symbol> list(symbols.size());
  for (int64_t i = 0; i < n; ++i) list[i] = {symbols[i], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto consider = [&](int64_t left) {
    if (left < 0 || list[left].next < 0) return;
    if (const MergeRule* rule = find_merge(list[left].id, list[list[left].next].id))
      queue.push({rule->rank, static_cast<size_t>(left)});
  };
  for (int64_t i = 0; i + 1 < n; ++i) consider(i);
  while (!queue.empty()) {
    Candidate top = queue.top();
    queue.pop();
    Symbol& left = list[top.pos];
    if (!left.alive || left.next < 0) continue;
    const MergeRule* rule = find_merge(left.id, list[left.next].id);
    if (!rule || rule->rank != top.rank) continue;  // the pair changed since it was queued
    Symbol& right = list[left.next];
    left.id = rule->result;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) list[right.next].prev = static_cast<int64_t>(top.pos);
    consider(left.prev);
    consider(static_cast<int64_t>(top.pos));
  }
  symbols.clear();
  for (int64_t i = 0; i >= 0 && i < n; i = list[i].next) symbols.push_back(list[i].id);
}

bool BpeModel::cache_lookup(std::string_view bytes, std::vector<TokenId>& out) const {
  CacheShard& shard = cache_[std::hash<std::string_view>{}(bytes) % kCacheShards];
  std::shared_lock lock(shard.mutex);
  auto it = shard.words.find(bytes);
  if (it == shard.words.end()) return false;
  out.insert(out.end(), it->second.begin(), it->second.end());
  return true;
}

void BpeModel::cache_store(std::string_view bytes, const TokenId* ids, size_t count) const {
  if (bytes.size() > kCacheMaxWordBytes) return;
  CacheShard& shard = cache_[std::hash<std::string_view>{}(bytes) % kCacheShards];
  std::unique_lock lock(shard.mutex);
  if (shard.words.size() >= kCacheEntriesPerShard) return;  // full: keep what is there, like HF
  shard.words.emplace(std::string(bytes), std::vector<TokenId>(ids, ids + count));
}

void BpeModel::encode_word(std::string_view bytes, std::vector<TokenId>& out) const {
  if (bytes.empty()) return;
  if (bytes.size() == 1 && byte_id_[static_cast<unsigned char>(bytes[0])] >= 0) {
    out.push_back(static_cast<TokenId>(byte_id_[static_cast<unsigned char>(bytes[0])]));
    return;
  }
  if (ignore_merges_) {
    if (auto it = whole_word_.find(bytes); it != whole_word_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (bytes.size() <= kCacheMaxWordBytes && cache_lookup(bytes, out)) return;
  thread_local std::vector<TokenId> symbols;
  initial_symbols(bytes, symbols);
  if (symbols.size() <= kLinearMergeLimit)
    merge_small(symbols);
  else
    merge_large(symbols);
  cache_store(bytes, symbols.data(), symbols.size());
  out.insert(out.end(), symbols.begin(), symbols.end());
}

}  // namespace dsx::data::detail
