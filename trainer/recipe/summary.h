// The summary `dsx recipe check` prints: model shape, parameter counts, batch and run length,
// layout, schedule, precision, data and where outputs go.
#pragma once
#include <cstdint>
#include <string>

#include "trainer/recipe/recipe.h"

namespace dsx {

// 671.0B, 2.05M, 37.5K, 512: three significant digits at least, with a B/M/K suffix.
std::string human_count(double value);
// One "label  text" line per topic.
std::string summarize(const Recipe& recipe);

}  // namespace dsx
