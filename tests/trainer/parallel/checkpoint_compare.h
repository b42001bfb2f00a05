// Shared by the run-comparison tools (compare_runs, compare_grpo_runs): the candidate run's
// newest complete checkpoint against the reference run's checkpoint of the same step, every
// tensor by relative L2 error.
#pragma once
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "trainer/checkpoint/checkpoint.h"

namespace dsx::test {

// ||a - b|| / ||b|| (absolute ||a - b|| where b is all zeros).
inline double relative_l2(const std::vector<double>& a, const std::vector<double>& b) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += (a[i] - b[i]) * (a[i] - b[i]);
    norm += b[i] * b[i];
  }
  return norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
}

// Prints the worst tensor and returns whether every reference tensor is in the candidate's
// checkpoint (and no other) within rtol. Throws when the candidate has no complete checkpoint.
inline bool checkpoints_match(const std::filesystem::path& ref_dir, const std::filesystem::path& cand_dir,
                              double rtol) {
  const auto cand_ckpt = ckpt::latest(cand_dir / "checkpoints");
  if (!cand_ckpt) throw std::runtime_error("the candidate run has no complete checkpoint");
  ckpt::CheckpointReader cand(*cand_ckpt);
  ckpt::CheckpointReader ref(ref_dir / "checkpoints" / ckpt::step_dir_name(cand.step()));
  bool ok = true;
  double worst_tensor = 0;
  std::string worst_name;
  for (const ckpt::TensorInfo& info : ref.manifest().tensors) {
    if (!cand.find(info.name)) {
      std::printf("tensor %s missing from the candidate\n", info.name.c_str());
      ok = false;
      continue;
    }
    const double err = relative_l2(cand.read_whole(info.name).to_vector(), ref.read_whole(info.name).to_vector());
    if (err > worst_tensor) {
      worst_tensor = err;
      worst_name = info.name;
    }
  }
  if (cand.manifest().tensors.size() != ref.manifest().tensors.size()) ok = false;
  std::printf("checkpoint step %lld: %zu tensors, worst relative error %.3g (%s)\n", static_cast<long long>(ref.step()),
              ref.manifest().tensors.size(), worst_tensor, worst_name.c_str());
  return ok && worst_tensor <= rtol;
}

}  // namespace dsx::test
