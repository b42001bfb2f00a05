// Oniguruma behind a small RAII class. HF tokenizers compiles its split patterns with the Rust
// `onig` crate (Oniguruma's default syntax, UTF-8, no options) and iterates matches with that
// crate's find_iter; doing the same here makes \p{L}, \s, lookaheads and empty matches behave
// identically.
#include <oniguruma.h>

#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer_impl.h"
#include "kernels/error.h"

namespace dsx::data::detail {
namespace {

void initialize_oniguruma_once() {
  static std::once_flag once;
  std::call_once(once, [] {
    OnigEncoding encodings[] = {ONIG_ENCODING_UTF8};
    onig_initialize(encodings, 1);
  });
}

std::string onig_message(int code, OnigErrorInfo* info) {
  OnigUChar buffer[ONIG_MAX_ERROR_MESSAGE_LEN];
  int length = info ? onig_error_code_to_str(buffer, code, info) : onig_error_code_to_str(buffer, code);
  return std::string(reinterpret_cast<const char*>(buffer), length > 0 ? static_cast<size_t>(length) : 0);
}

struct RegionDeleter {
  void operator()(OnigRegion* region) const { onig_region_free(region, 1); }
};

// One match region per thread: allocating one per search would cost more than most searches.
OnigRegion* thread_region() {
  thread_local std::unique_ptr<OnigRegion, RegionDeleter> region(onig_region_new());
  return region.get();
}

const OnigUChar* bytes(std::string_view text) {
  return reinterpret_cast<const OnigUChar*>(text.data());
}

}  // namespace

struct Regex::Compiled {
  OnigRegex regex = nullptr;
  ~Compiled() {
    if (regex) onig_free(regex);
  }
};

Regex::Regex(std::string_view pattern, const std::string& where) : compiled_(std::make_unique<Compiled>()) {
  initialize_oniguruma_once();
  if (!is_valid_utf8(pattern)) throw UserError(where + ": the regular expression is not valid UTF-8");
  OnigErrorInfo info{};
  int rc = onig_new(&compiled_->regex, bytes(pattern), bytes(pattern) + pattern.size(), ONIG_OPTION_NONE,
                    ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &info);
  if (rc != ONIG_NORMAL) {
    compiled_->regex = nullptr;
    throw UserError(where + ": invalid regular expression '" + std::string(pattern) + "': " + onig_message(rc, &info));
  }
}

Regex::Regex(Regex&&) noexcept = default;
Regex& Regex::operator=(Regex&&) noexcept = default;
Regex::~Regex() = default;

void Regex::find_all(std::string_view text, std::vector<Match>& out) const {
  out.clear();
  OnigRegion* region = thread_region();
  const OnigUChar* begin = bytes(text);
  const OnigUChar* end = begin + text.size();
  size_t search_from = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  while (search_from <= text.size()) {
    int rc = onig_search(compiled_->regex, begin, end, begin + search_from, end, region, ONIG_OPTION_NONE);
    if (rc == ONIG_MISMATCH) break;
    if (rc < 0) throw std::runtime_error("Oniguruma search failed: " + onig_message(rc, nullptr));
    const auto match_begin = static_cast<size_t>(region->beg[0]);
    const auto match_end = static_cast<size_t>(region->end[0]);
    // Like the onig crate: an empty match right where the previous match ended is skipped by
    // stepping one character forward, so iteration always advances.
    if (match_begin == match_end && have_last && last_match_end == match_end) {
      size_t step = search_from < text.size() ? utf8_char_length(text, search_from) : 1;
      search_from += step == 0 ? 1 : step;
      continue;
    }
    search_from = match_end;
    have_last = true;
    last_match_end = match_end;
    out.push_back({match_begin, match_end});
  }
}

bool Regex::matches_whole(std::string_view text) const {
  OnigRegion* region = thread_region();
  int rc = onig_match(compiled_->regex, bytes(text), bytes(text) + text.size(), bytes(text), region, ONIG_OPTION_NONE);
  return rc >= 0 && static_cast<size_t>(rc) == text.size();
}

}  // namespace dsx::data::detail
