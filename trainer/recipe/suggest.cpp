#include "trainer/recipe/suggest.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <utility>

namespace dsx {

size_t edit_distance(std::string_view a, std::string_view b) {
  // One row of the dynamic-programming table at a time.
  std::vector<size_t> row(b.size() + 1);
  std::iota(row.begin(), row.end(), size_t{0});
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diagonal = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t above = row[j];
      const size_t substitute = diagonal + (a[i - 1] == b[j - 1] ? 0 : 1);
      row[j] = std::min({above + 1, row[j - 1] + 1, substitute});
      diagonal = above;
    }
  }
  return row[b.size()];
}

namespace {

std::string_view last_component(std::string_view path) {
  const size_t dot = path.rfind('.');
  return dot == std::string_view::npos ? path : path.substr(dot + 1);
}

// Typos change a few characters; beyond about a third of the word it is another word.
size_t plausible_distance(std::string_view word) {
  return std::max<size_t>(2, word.size() / 3);
}

// Distance between two key names, counting a truncation (`optimizer` for `optim`) as one edit.
size_t name_distance(std::string_view a, std::string_view b) {
  const auto& shorter = a.size() < b.size() ? a : b;
  const auto& longer = a.size() < b.size() ? b : a;
  if (shorter.size() >= 3 && longer.starts_with(shorter)) return 1;
  return edit_distance(a, b);
}

}  // namespace

std::optional<std::string> closest_match(std::string_view word, const std::vector<std::string>& candidates) {
  const std::string_view leaf = last_component(word);
  // Ranked by (score, whole-path distance): a right name in the wrong section costs one more
  // than the name's own distance; truncations count on names only (`model` is not a typo of
  // `model.kv_lora_rnk`).
  std::pair<size_t, size_t> best_rank{SIZE_MAX, SIZE_MAX};
  const std::string* best = nullptr;
  for (const auto& candidate : candidates) {
    const size_t whole = edit_distance(word, candidate);
    const size_t moved = name_distance(leaf, last_component(candidate)) + 1;
    const std::pair<size_t, size_t> rank{std::min(whole, moved), whole};
    if (rank < best_rank) {
      best_rank = rank;
      best = &candidate;
    }
  }
  if (best == nullptr || best_rank.first > plausible_distance(leaf)) return std::nullopt;
  return *best;
}

}  // namespace dsx
