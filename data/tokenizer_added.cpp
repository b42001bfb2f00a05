// Added tokens (special and not) found in raw text the way HF's AddedVocabulary does: an
// Aho-Corasick search in leftmost-longest mode, then the per-token single_word, lstrip and
// rstrip rules.
#include <algorithm>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer_impl.h"

namespace dsx::data::detail {
namespace {

// Rust's char::is_whitespace (the Unicode White_Space property).
bool is_unicode_whitespace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Start of the character that ends just before `pos` (text may hold invalid bytes: then the
// single byte before `pos` counts as a character of its own).
size_t previous_char_start(std::string_view text, size_t pos) {
  for (size_t back = 1; back <= 4 && back <= pos; ++back) {
    if (utf8_char_length(text, pos - back) == back) return pos - back;
  }
  return pos - 1;
}

// Alphabetic or numeric in Unicode's sense, like Rust's char::is_alphanumeric, which HF's
// single_word rule uses. Oniguruma knows the properties.
bool is_alphanumeric_char(std::string_view ch) {
  static const Regex alnum("[\\p{Alphabetic}\\p{N}]", "added-token word boundary");
  return alnum.matches_whole(ch);
}

bool ends_with_word(std::string_view text, size_t pos) {
  if (pos == 0) return false;
  size_t start = previous_char_start(text, pos);
  return utf8_char_length(text, start) == pos - start && is_alphanumeric_char(text.substr(start, pos - start));
}

bool starts_with_word(std::string_view text, size_t pos) {
  if (pos >= text.size()) return false;
  size_t len = utf8_char_length(text, pos);
  return len != 0 && is_alphanumeric_char(text.substr(pos, len));
}

bool whitespace_char_at(std::string_view text, size_t pos, size_t* len_out) {
  size_t len = utf8_char_length(text, pos);
  *len_out = len == 0 ? 1 : len;
  return len != 0 && is_unicode_whitespace(decode_utf8(text, pos, len));
}

}  // namespace

AddedTokenMatcher::AddedTokenMatcher(std::vector<AddedToken> tokens) : tokens_(std::move(tokens)) {
  nodes_.emplace_back();
  for (size_t t = 0; t < tokens_.size(); ++t) {
    const std::string& content = tokens_[t].content;
    if (content.empty()) continue;
    first_byte_[static_cast<unsigned char>(content[0])] = true;
    int32_t node = 0;
    for (char ch : content) {
      const auto byte = static_cast<unsigned char>(ch);
      auto& children = nodes_[node].children;
      auto it = std::lower_bound(children.begin(), children.end(), byte,
                                 [](const auto& child, unsigned char b) { return child.first < b; });
      if (it != children.end() && it->first == byte) {
        node = it->second;
      } else {
        const auto next = static_cast<int32_t>(nodes_.size());
        children.insert(it, {byte, next});
        nodes_.emplace_back();  // invalidates `children`; not used again in this iteration
        node = next;
      }
    }
    if (nodes_[node].token < 0) nodes_[node].token = static_cast<int32_t>(t);  // first of duplicates wins
  }
}

std::pair<int32_t, size_t> AddedTokenMatcher::longest_at(std::string_view text, size_t pos) const {
  std::pair<int32_t, size_t> best{-1, 0};
  int32_t node = 0;
  for (size_t i = pos; i < text.size(); ++i) {
    const auto byte = static_cast<unsigned char>(text[i]);
    const auto& children = nodes_[node].children;
    auto it = std::lower_bound(children.begin(), children.end(), byte,
                               [](const auto& child, unsigned char b) { return child.first < b; });
    if (it == children.end() || it->first != byte) break;
    node = it->second;
    if (nodes_[node].token >= 0) best = {nodes_[node].token, i + 1 - pos};
  }
  return best;
}

void AddedTokenMatcher::split(std::string_view text, std::vector<Segment>& out) const {
  out.clear();
  size_t plain_start = 0;  // where the current plain segment begins
  size_t pos = 0;
  while (pos < text.size()) {
    if (!first_byte_[static_cast<unsigned char>(text[pos])]) {
      ++pos;
      continue;
    }
    auto [token, length] = longest_at(text, pos);
    if (token < 0) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + length;
    pos = stop;  // the search resumes after this match even when the rules below reject it
    const AddedToken& t = tokens_[static_cast<size_t>(token)];
    if (t.single_word && (ends_with_word(text, start) || starts_with_word(text, stop))) continue;
    if (t.lstrip) {
      size_t s = start;
      while (s > plain_start) {
        size_t prev = previous_char_start(text, s);
        size_t len = 0;
        if (!whitespace_char_at(text, prev, &len) || prev + len != s) break;
        s = prev;
      }
      start = s;
    }
    if (t.rstrip) {
      size_t len = 0;
      while (stop < text.size() && whitespace_char_at(text, stop, &len)) stop += len;
      pos = stop;
    }
    if (plain_start < start) out.push_back({plain_start, start, -1});
    out.push_back({start, stop, token});
    plain_start = stop;
  }
  if (plain_start < text.size()) out.push_back({plain_start, text.size(), -1});
}

}  // namespace dsx::data::detail
