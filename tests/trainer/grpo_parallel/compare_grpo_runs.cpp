// compare_grpo_runs: does a data-parallel `dsx grpo` run match the single-process run of the same
// recipe?
//
//   compare_grpo_runs REFERENCE_RUN_DIR CANDIDATE_RUN_DIR RTOL
//
// (1) metrics.jsonl: the candidate has the reference's lines in the same order (phase and step:
// SFT log lines, evaluations, GRPO steps), and every numeric field of a line — rewards per
// function, accuracy, KL, clip fractions, entropy, loss, gradient norm, lengths, counts — agrees:
// |a − b| ≤ RTOL·|b|. Timing fields (seconds, tokens per second, ETA) are skipped. The one
// exception is max_abs_log_ratio, itself a rounding residue (log π of the training forward minus
// that of the generator, ~1e-7 in f32), which only has to stay at that level: |a − b| ≤ 1e-4.
// (2) the newest checkpoint of each run (the same step): every tensor — policy, reference model,
// AdamW moments however many ranks wrote them — within ‖a − b‖₂ ≤ RTOL·‖b‖₂.
// Prints the worst figures; exit 0 when they hold, 1 when not, 2 on a usage or file error.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/trainer/parallel/checkpoint_compare.h"
#include "trainer/checkpoint/checkpoint.h"

namespace fs = std::filesystem;
using namespace dsx;

namespace {

constexpr double kLogRatioAbsTol = 1e-4;

std::vector<nlohmann::json> read_lines(const fs::path& run) {
  std::ifstream in(run / "metrics.jsonl");
  if (!in) throw std::runtime_error("no metrics.jsonl in " + run.string());
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(in, line);)
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

bool is_timing(const std::string& key) {
  const auto ends_with = [&](const std::string& suffix) {
    return key.size() >= suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  return ends_with("_s") || ends_with("tokens_per_s") || key == "seconds" || key == "eta" || key == "elapsed";
}

struct Worst {
  double error = 0;
  std::string where;
  int mismatches = 0;
};

// Compares the numbers of two JSON values with the same structure; `path` names the field.
void compare_values(const nlohmann::json& cand, const nlohmann::json& ref, const std::string& path, double rtol,
                    Worst& worst) {
  if (ref.is_object()) {
    for (const auto& [key, value] : ref.items()) {
      if (is_timing(key)) continue;
      if (!cand.contains(key)) {
        std::printf("%s.%s missing from the candidate\n", path.c_str(), key.c_str());
        ++worst.mismatches;
        continue;
      }
      compare_values(cand.at(key), value, path + "." + key, rtol, worst);
    }
    return;
  }
  if (!ref.is_number()) {
    if (cand != ref) {
      std::printf("%s differs: %s vs %s\n", path.c_str(), cand.dump().c_str(), ref.dump().c_str());
      ++worst.mismatches;
    }
    return;
  }
  const double a = cand.get<double>(), b = ref.get<double>();
  const bool log_ratio = path.ends_with("max_abs_log_ratio");
  const double error = log_ratio ? std::abs(a - b) : (b != 0 ? std::abs(a - b) / std::abs(b) : std::abs(a));
  const double limit = log_ratio ? kLogRatioAbsTol : rtol;
  if (!log_ratio && error > worst.error) {
    worst.error = error;
    worst.where = path;
  }
  if (error > limit) {
    std::printf("%s: %.17g vs reference %.17g (error %.3g > %.3g)\n", path.c_str(), a, b, error, limit);
    ++worst.mismatches;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: compare_grpo_runs REFERENCE_RUN_DIR CANDIDATE_RUN_DIR RTOL\n");
    return 2;
  }
  try {
    const fs::path ref_dir = argv[1], cand_dir = argv[2];
    const double rtol = std::stod(argv[3]);
    bool ok = true;

    const auto ref_lines = read_lines(ref_dir), cand_lines = read_lines(cand_dir);
    if (ref_lines.size() != cand_lines.size()) {
      std::printf("metrics.jsonl: %zu lines, the reference has %zu\n", cand_lines.size(), ref_lines.size());
      ok = false;
    }
    Worst worst;
    int grpo_steps = 0;
    for (size_t i = 0; i < std::min(ref_lines.size(), cand_lines.size()); ++i) {
      const nlohmann::json &ref = ref_lines[i], &cand = cand_lines[i];
      const std::string where = "line " + std::to_string(i + 1) + " (" + ref.value("phase", "?") + " step " +
                                std::to_string(ref.value("step", -1)) + ")";
      compare_values(cand, ref, where, rtol, worst);
      grpo_steps += ref.value("phase", "") == "grpo";
    }
    std::printf("metrics: %zu lines (%d GRPO steps), worst relative error %.3g (%s)\n", ref_lines.size(), grpo_steps,
                worst.error, worst.where.c_str());
    if (worst.mismatches > 0 || grpo_steps == 0) ok = false;

    if (!test::checkpoints_match(ref_dir, cand_dir, rtol)) ok = false;
    std::printf("%s (rtol %.3g)\n", ok ? "MATCH" : "MISMATCH", rtol);
    return ok ? 0 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "compare_grpo_runs: %s\n", e.what());
    return 2;
  }
}
