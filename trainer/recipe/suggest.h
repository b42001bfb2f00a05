// "Did you mean ...?" for recipe keys, sections and enum values.
#pragma once
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsx {

// Levenshtein distance (insertions, deletions, substitutions each cost 1).
size_t edit_distance(std::string_view a, std::string_view b);

// The candidate closest to `word`, or nothing when none is close enough to be a plausible
// typo. Dotted paths also match on their last component, so a key put in the wrong section
// (`train.lr`) still finds `optim.lr`.
std::optional<std::string> closest_match(std::string_view word, const std::vector<std::string>& candidates);

}  // namespace dsx
