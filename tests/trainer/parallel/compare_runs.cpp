// compare_runs: does a training run match a reference run of the same recipe?
//
//   compare_runs REFERENCE_RUN_DIR CANDIDATE_RUN_DIR RTOL [losses-only]
//
// Compares (1) the loss and the gradient norm of every step both runs logged in metrics.jsonl,
// relative error |a - b| / |b| ≤ RTOL, and (2) every tensor of the newest checkpoint of each run (parameters and
// optimizer moments, assembled from however many ranks wrote them), relative error
// ‖a − b‖₂ / ‖b‖₂ ≤ RTOL per tensor. With losses-only, only the losses are compared (for runs
// whose numerics differ on purpose, e.g. FP8 dispatch, judged by the loss curve). Prints the worst figures; exit 0 when
// they hold, 1 when not, 2 on a usage or file error.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>

#include <nlohmann/json.hpp>

#include "tests/trainer/parallel/checkpoint_compare.h"
#include "trainer/checkpoint/checkpoint.h"

namespace fs = std::filesystem;
using namespace dsx;

namespace {

// step -> (loss, gradient norm)
std::map<int64_t, std::pair<double, double>> metrics_by_step(const fs::path& run) {
  std::ifstream in(run / "metrics.jsonl");
  if (!in) throw std::runtime_error("no metrics.jsonl in " + run.string());
  std::map<int64_t, std::pair<double, double>> out;
  for (std::string line; std::getline(in, line);) {
    if (line.empty()) continue;
    const auto j = nlohmann::json::parse(line);
    // a resumed run's later line wins
    out[j.at("step").get<int64_t>()] = {j.at("loss").get<double>(), j.at("grad_norm").get<double>()};
  }
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  const bool losses_only = argc == 5 && std::string(argv[4]) == "losses-only";
  if (argc != 4 && !losses_only) {
    std::fprintf(stderr, "usage: compare_runs REFERENCE_RUN_DIR CANDIDATE_RUN_DIR RTOL [losses-only]\n");
    return 2;
  }
  try {
    const fs::path ref_dir = argv[1], cand_dir = argv[2];
    const double rtol = std::stod(argv[3]);
    bool ok = true;

    const auto ref_steps = metrics_by_step(ref_dir), cand_steps = metrics_by_step(cand_dir);
    double worst_loss = 0, worst_norm = 0;
    int64_t compared = 0;
    for (const auto& [step, values] : cand_steps) {
      const auto it = ref_steps.find(step);
      if (it == ref_steps.end()) continue;
      // The gradient norm catches a wrongly scaled or unreduced gradient, which AdamW's
      // scale-invariant update would hide from the loss and the parameters.
      worst_loss = std::max(worst_loss, std::abs(values.first - it->second.first) / std::abs(it->second.first));
      worst_norm = std::max(worst_norm, std::abs(values.second - it->second.second) / std::abs(it->second.second));
      ++compared;
    }
    std::printf("metrics: %lld steps compared, worst relative error: loss %.3g, gradient norm %.3g\n",
                static_cast<long long>(compared), worst_loss, worst_norm);
    if (compared == 0 || compared != static_cast<int64_t>(cand_steps.size())) ok = false;
    if (worst_loss > rtol || (!losses_only && worst_norm > rtol)) ok = false;
    if (losses_only) {
      std::printf("%s (losses only, rtol %.3g)\n", ok ? "MATCH" : "MISMATCH", rtol);
      return ok ? 0 : 1;
    }

    if (!test::checkpoints_match(ref_dir, cand_dir, rtol)) ok = false;
    std::printf("%s (rtol %.3g)\n", ok ? "MATCH" : "MISMATCH", rtol);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_runs: %s\n", e.what());
    return 2;
  }
}
