#include "trainer/model/pipeline_stage.h"

#include <algorithm>
#include <stdexcept>

namespace dsx {

PipelineStage pipeline_stage(int64_t num_layers, int count, int index) {
  if (count < 1 || index < 0 || index >= count) {
    throw std::invalid_argument("pipeline_stage: stage " + std::to_string(index) + " of " + std::to_string(count) +
                                " does not exist");
  }
  if (num_layers < count) {
    throw std::invalid_argument("pipeline_stage: " + std::to_string(num_layers) + " decoder layers cannot fill " +
                                std::to_string(count) + " pipeline stages (each needs at least one)");
  }
  const int64_t base = num_layers / count, extra = num_layers % count;
  PipelineStage s;
  s.index = index;
  s.count = count;
  s.first_layer = index * base + std::min<int64_t>(index, extra);
  s.end_layer = s.first_layer + base + (index < extra ? 1 : 0);
  return s;
}

std::string describe(const PipelineStage& stage, int64_t mtp_depth) {
  std::string out = "stage " + std::to_string(stage.index) + "/" + std::to_string(stage.count) + ": ";
  if (stage.is_first()) out += "embedding, ";
  out += "layers " + std::to_string(stage.first_layer) + "-" + std::to_string(stage.end_layer - 1);
  if (stage.is_last()) {
    out += ", head";
    if (mtp_depth > 0) out += " + " + std::to_string(mtp_depth) + " MTP";
  }
  return out;
}

std::string describe_pipeline(int64_t num_layers, int64_t mtp_depth, int count) {
  std::string out;
  for (int s = 0; s < count; ++s) {
    out += (s ? " | " : "") + describe(pipeline_stage(num_layers, count, s), mtp_depth);
  }
  return out;
}

std::string describe_pipeline(int64_t num_layers, int64_t mtp_depth, const PipelineLayout& layout) {
  if (!layout.v_shape) return describe_pipeline(num_layers, mtp_depth, layout.ranks);
  std::string out;
  for (int r = 0; r < layout.ranks; ++r) {
    out += (r ? " | rank " : "rank ") + std::to_string(r) + ": ";
    for (int c = 0; c < layout.chunks(); ++c) {
      out += (c ? " + " : "") + describe(pipeline_stage(num_layers, layout.stages(), layout.stage_of(r, c)), mtp_depth);
    }
  }
  return out;
}

}  // namespace dsx
