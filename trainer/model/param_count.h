#pragma once
#include <cstdint>

#include "trainer/model/config.h"

namespace dsx {

// Parameter counts derived from the model's parameter specs (no memory is allocated).
// DeepSeek-V3 reports 671B total / 37B active for the main model and 11.5B more for MTP.
struct ParameterCounts {
  int64_t total = 0;   // main model: embedding, layers, final norm, head (head counted once if tied)
  int64_t active = 0;  // per token: total minus the routed experts a token does not use
  int64_t mtp = 0;     // the MTP modules' own parameters (embedding and head are shared)
};
ParameterCounts count_parameters(const ModelConfig& config);

}  // namespace dsx
