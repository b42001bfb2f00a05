// Tokenizer: assembling the runtime pieces from a spec, encoding, decoding, identity.
#include "data/tokenizer.h"

#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>

#include "data/tokenizer_impl.h"
#include "kernels/error.h"

namespace dsx::data {
namespace {

using detail::AddedToken;
using detail::PreTokenizerStage;

// tokenizer.json has no notion of roles (transformers keeps them in tokenizer_config.json), so
// roles come from the special tokens' well-known spellings, dsx's own first.
const std::vector<std::string_view> kBosNames = {
    "<|begin_of_sentence|>", "<｜begin▁of▁sentence｜>", "<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>"};
const std::vector<std::string_view> kEosNames = {
    "<|end_of_sentence|>", "<｜end▁of▁sentence｜>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>"};
const std::vector<std::string_view> kPadNames = {"<|pad|>", "<｜▁pad▁｜>", "<pad>", "[PAD]", "<|padding|>"};

int64_t find_role(const std::vector<AddedToken>& added, const std::vector<std::string_view>& names) {
  for (std::string_view name : names) {
    for (const AddedToken& t : added)
      if (t.special && t.content == name) return t.id;
  }
  return -1;
}

// 64-bit FNV-1a over a length-prefixed serialisation: stable across platforms and runs.
class Fnv1a {
 public:
  void bytes(std::string_view s) {
    number(s.size());
    for (char c : s) mix(static_cast<unsigned char>(c));
  }
  void number(uint64_t v) {
    for (int i = 0; i < 8; ++i) mix(static_cast<unsigned char>(v >> (8 * i)));
  }
  std::string hex() const { return fmt::format("{:016x}", state_); }

 private:
  void mix(unsigned char c) {
    state_ ^= c;
    state_ *= 0x100000001b3ULL;
  }
  uint64_t state_ = 0xcbf29ce484222325ULL;
};

std::string compute_content_hash(const detail::TokenizerSpec& spec) {
  Fnv1a h;
  h.bytes("dsx byte-level BPE v1");
  auto vocab = spec.vocab;
  std::sort(vocab.begin(), vocab.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  h.number(vocab.size());
  for (const auto& [text, id] : vocab) {
    h.number(id);
    h.bytes(text);
  }
  h.number(spec.merges.size());
  for (const auto& [a, b] : spec.merges) {
    h.bytes(a);
    h.bytes(b);
  }
  auto added = spec.added_tokens;
  std::sort(added.begin(), added.end(), [](const auto& a, const auto& b) { return a.id < b.id; });
  h.number(added.size());
  for (const AddedToken& t : added) {
    h.number(t.id);
    h.bytes(t.content);
    h.number((t.special ? 1 : 0) | (t.normalized ? 2 : 0) | (t.single_word ? 4 : 0) | (t.lstrip ? 8 : 0) |
             (t.rstrip ? 16 : 0));
  }
  // The pre-tokenizer and model options change ids too, so they are part of the identity.
  h.number(spec.pre_tokenizer.size());
  for (const PreTokenizerStage& s : spec.pre_tokenizer) {
    h.number(s.kind == PreTokenizerStage::Kind::kSplit ? 1 : 2);
    h.bytes(s.pattern);
    h.bytes(s.behavior);
    h.number((s.pattern_is_regex ? 1 : 0) | (s.invert ? 2 : 0) | (s.add_prefix_space ? 4 : 0) | (s.use_regex ? 8 : 0));
  }
  h.bytes(spec.unk_token.value_or(""));
  h.number((spec.unk_token ? 1 : 0) | (spec.fuse_unk ? 2 : 0) | (spec.ignore_merges ? 4 : 0));
  return h.hex();
}

void check_pre_tokenizer(const detail::TokenizerSpec& spec) {
  const auto& stages = spec.pre_tokenizer;
  if (stages.empty() || stages.back().kind != PreTokenizerStage::Kind::kByteLevel)
    throw UserError(spec.source +
                    ": pre_tokenizer: dsx needs a byte-level tokenizer whose pre_tokenizer ends "
                    "with a ByteLevel step");
  for (size_t i = 0; i + 1 < stages.size(); ++i) {
    if (stages[i].kind == PreTokenizerStage::Kind::kByteLevel)
      throw UserError(spec.source + ": pre_tokenizer: ByteLevel must be the last step (found at step " +
                      std::to_string(i) + ")");
  }
}

}  // namespace

namespace detail {

int resolve_threads(int threads) {
  if (threads > 0) return threads;
  if (const char* env = std::getenv("OMP_NUM_THREADS")) {
    if (int n = std::atoi(env); n > 0) return n;
  }
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

}  // namespace detail

Tokenizer::Impl::Impl(detail::TokenizerSpec s) : spec(std::move(s)) {
  check_pre_tokenizer(spec);
  pre_tokenizer = detail::PreTokenizer(spec.pre_tokenizer, spec.source);

  std::unordered_map<std::string, TokenId> vocab_ids;
  std::unordered_map<TokenId, const std::string*> id_owner;
  size_t max_id = 0;
  for (const auto& [text, id] : spec.vocab) {
    if (!vocab_ids.emplace(text, id).second)
      throw UserError(spec.source + ": model.vocab: token '" + text + "' appears twice");
    if (auto [it, fresh] = id_owner.emplace(id, &text); !fresh)
      throw UserError(
          fmt::format("{}: model.vocab: id {} is used by both '{}' and '{}'", spec.source, id, *it->second, text));
    max_id = std::max<size_t>(max_id, id);
  }
  bpe = detail::BpeModel(spec, vocab_ids);

  std::vector<AddedToken> raw, normalized;
  for (const AddedToken& t : spec.added_tokens) {
    if (t.content.empty())
      throw UserError(fmt::format("{}: added_tokens: token id {} has empty content", spec.source, t.id));
    (t.normalized ? normalized : raw).push_back(t);
    max_id = std::max<size_t>(max_id, t.id);
  }
  raw_matcher = detail::AddedTokenMatcher(std::move(raw));
  normalized_matcher = detail::AddedTokenMatcher(std::move(normalized));

  const size_t tokens = spec.vocab.size() + spec.added_tokens.size();
  vocab_size = tokens == 0 ? 0 : max_id + 1;
  // Ids index tables (here and in the model's embedding), so they must be nearly dense.
  if (vocab_size > 2 * tokens + 1024)
    throw UserError(
        fmt::format("{}: token ids are far from dense: the largest is {} for {} tokens", spec.source, max_id, tokens));
  id_bytes.assign(vocab_size, {});
  id_known.assign(vocab_size, false);
  token_ids = vocab_ids;
  for (const auto& [text, id] : spec.vocab) {
    // Token text whose characters are not all byte stand-ins decodes to itself, as in HF.
    id_bytes[id] = detail::token_text_to_bytes(text).value_or(text);
    id_known[id] = true;
  }
  for (const AddedToken& t : spec.added_tokens) {
    id_bytes[t.id] = t.content;  // added tokens decode to their content, byte for byte
    id_known[t.id] = true;
    token_ids[t.content] = t.id;
  }
  bos = find_role(spec.added_tokens, kBosNames);
  eos = find_role(spec.added_tokens, kEosNames);
  pad = find_role(spec.added_tokens, kPadNames);
  content_hash = compute_content_hash(spec);
}

void Tokenizer::Impl::encode_plain(std::string_view text, std::vector<TokenId>& out) const {
  auto word = [&](std::string_view piece) { bpe.encode_word(piece, out); };
  detail::for_each_utf8_run(
      text, [&](std::string_view valid) { pre_tokenizer.run(valid, word); }, word);
}

void Tokenizer::Impl::encode_into(std::string_view text, std::vector<TokenId>& out) const {
  if (raw_matcher.empty() && normalized_matcher.empty()) {
    encode_plain(text, out);
    return;
  }
  std::vector<detail::AddedTokenMatcher::Segment> outer, inner;
  raw_matcher.split(text, outer);
  for (const auto& seg : outer) {
    if (seg.token >= 0) {
      out.push_back(raw_matcher.token(static_cast<size_t>(seg.token)).id);
      continue;
    }
    std::string_view plain = text.substr(seg.begin, seg.end - seg.begin);
    normalized_matcher.split(plain, inner);
    for (const auto& sub : inner) {
      if (sub.token >= 0)
        out.push_back(normalized_matcher.token(static_cast<size_t>(sub.token)).id);
      else
        encode_plain(plain.substr(sub.begin, sub.end - sub.begin), out);
    }
  }
}

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

std::vector<TokenId> Tokenizer::encode(std::string_view text) const {
  std::vector<TokenId> ids;
  ids.reserve(text.size() / 3 + 4);
  impl_->encode_into(text, ids);
  return ids;
}

std::vector<std::vector<TokenId>> Tokenizer::encode_batch(std::span<const std::string> texts, int threads) const {
  std::vector<std::vector<TokenId>> results(texts.size());
  const auto workers =
      static_cast<size_t>(std::min<int64_t>(detail::resolve_threads(threads), static_cast<int64_t>(texts.size())));
  if (workers <= 1) {
    for (size_t i = 0; i < texts.size(); ++i) results[i] = encode(texts[i]);
    return results;
  }
  // Documents differ in length, so workers take the next document as they finish one.
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::mutex failure_mutex;
  auto work = [&] {
    try {
      for (size_t i = next++; i < texts.size(); i = next++) results[i] = encode(texts[i]);
    } catch (...) {
      std::lock_guard lock(failure_mutex);
      if (!failure) failure = std::current_exception();
      next = texts.size();
    }
  };
  {
    std::vector<std::jthread> pool;
    for (size_t w = 0; w < workers; ++w) pool.emplace_back(work);
  }
  if (failure) std::rethrow_exception(failure);
  return results;
}

std::string Tokenizer::decode(std::span<const TokenId> ids) const {
  std::string out;
  for (TokenId id : ids) {
    if (id >= impl_->vocab_size || !impl_->id_known[id])
      throw UserError(fmt::format("token id {} is not in the tokenizer's vocabulary ({} ids, from {})", id,
                                  impl_->vocab_size, impl_->spec.source));
    out += impl_->id_bytes[id];
  }
  return out;
}

size_t Tokenizer::vocab_size() const {
  return impl_->vocab_size;
}
int64_t Tokenizer::bos_id() const {
  return impl_->bos;
}
int64_t Tokenizer::eos_id() const {
  return impl_->eos;
}
int64_t Tokenizer::pad_id() const {
  return impl_->pad;
}

int64_t Tokenizer::token_id(std::string_view token) const {
  auto it = impl_->token_ids.find(std::string(token));
  return it == impl_->token_ids.end() ? -1 : int64_t{it->second};
}

std::string Tokenizer::hash() const {
  return impl_->content_hash;
}

std::vector<std::pair<std::string, TokenId>> Tokenizer::added_tokens() const {
  std::vector<std::pair<std::string, TokenId>> list;
  for (const AddedToken& t : impl_->spec.added_tokens) list.emplace_back(t.content, t.id);
  return list;
}

size_t Tokenizer::merges_count() const {
  return impl_->spec.merges.size();
}

}  // namespace dsx::data
