// GPT-2's byte-to-unicode map and the UTF-8 helpers the byte-level tokenizer needs.
#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>

#include "data/tokenizer_impl.h"

namespace dsx::data::detail {
namespace {

// Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, 0x7F-0xA0,
// 0xAD) take the code points from U+0100 upwards in byte order. Token text is therefore
// printable, and a space appears as 'Ġ' (U+0120).
std::array<char32_t, 256> make_byte_to_codepoint() {
  std::array<char32_t, 256> map{};
  auto printable = [](int b) { return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF); };
  char32_t next = 256;
  for (int b = 0; b < 256; ++b) map[b] = printable(b) ? static_cast<char32_t>(b) : next++;
  return map;
}

const std::unordered_map<char32_t, unsigned char>& codepoint_to_byte() {
  static const std::unordered_map<char32_t, unsigned char> inverse = [] {
    std::unordered_map<char32_t, unsigned char> m;
    const auto& forward = byte_to_codepoint();
    for (int b = 0; b < 256; ++b) m.emplace(forward[b], static_cast<unsigned char>(b));
    return m;
  }();
  return inverse;
}

// UTF-8 text of every byte's stand-in, so bytes_to_token_text is a table copy.
const std::array<std::string, 256>& byte_token_text() {
  static const std::array<std::string, 256> table = [] {
    std::array<std::string, 256> t;
    for (int b = 0; b < 256; ++b) append_utf8(t[b], byte_to_codepoint()[b]);
    return t;
  }();
  return table;
}

}  // namespace

const std::array<char32_t, 256>& byte_to_codepoint() {
  static const std::array<char32_t, 256> map = make_byte_to_codepoint();
  return map;
}

std::string bytes_to_token_text(std::string_view bytes) {
  const auto& table = byte_token_text();
  std::string out;
  out.reserve(bytes.size() * 2);
  for (char c : bytes) out += table[static_cast<unsigned char>(c)];
  return out;
}

std::optional<std::string> token_text_to_bytes(std::string_view text) {
  const auto& inverse = codepoint_to_byte();
  std::string out;
  out.reserve(text.size());
  for (size_t pos = 0; pos < text.size();) {
    size_t len = utf8_char_length(text, pos);
    if (len == 0) return std::nullopt;
    auto it = inverse.find(decode_utf8(text, pos, len));
    if (it == inverse.end()) return std::nullopt;
    out += static_cast<char>(it->second);
    pos += len;
  }
  return out;
}

size_t utf8_char_length(std::string_view text, size_t pos) {
  const auto* p = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  const size_t left = text.size() - pos;
  const unsigned char b0 = p[0];
  if (b0 < 0x80) return 1;
  auto cont = [&](size_t i) { return i < left && (p[i] & 0xC0) == 0x80; };
  if (b0 >= 0xC2 && b0 <= 0xDF) return cont(1) ? 2 : 0;
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (!cont(1) || !cont(2)) return 0;
    if (b0 == 0xE0 && p[1] < 0xA0) return 0;   // overlong
    if (b0 == 0xED && p[1] >= 0xA0) return 0;  // UTF-16 surrogate
    return 3;
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (!cont(1) || !cont(2) || !cont(3)) return 0;
    if (b0 == 0xF0 && p[1] < 0x90) return 0;   // overlong
    if (b0 == 0xF4 && p[1] >= 0x90) return 0;  // beyond U+10FFFF
    return 4;
  }
  return 0;  // continuation byte, C0/C1 or F5..FF
}

bool is_valid_utf8(std::string_view text) {
  for (size_t pos = 0; pos < text.size();) {
    size_t len = utf8_char_length(text, pos);
    if (len == 0) return false;
    pos += len;
  }
  return true;
}

char32_t decode_utf8(std::string_view text, size_t pos, size_t len) {
  auto byte = [&](size_t i) { return static_cast<unsigned char>(text[pos + i]); };
  switch (len) {
    case 1:
      return byte(0);
    case 2:
      return (char32_t{byte(0) & 0x1Fu} << 6) | (byte(1) & 0x3Fu);
    case 3:
      return (char32_t{byte(0) & 0x0Fu} << 12) | (char32_t{byte(1) & 0x3Fu} << 6) | (byte(2) & 0x3Fu);
    default:
      return (char32_t{byte(0) & 0x07u} << 18) | (char32_t{byte(1) & 0x3Fu} << 12) | (char32_t{byte(2) & 0x3Fu} << 6) |
             (byte(3) & 0x3Fu);
  }
}

void append_utf8(std::string& out, char32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

}  // namespace dsx::data::detail
