// What a training step reports: one console line per logging interval on rank 0 and one JSON
// object per logged step appended to <run_dir>/metrics.jsonl.
#pragma once
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace dsx {

struct LayerLoad {
  int64_t layer = 0;
  double min_tokens = 0, max_tokens = 0, cv = 0;  // tokens per expert over the interval
  double bias_spread = 0;                         // max - min of the router's selection bias
  // Expert parallelism: tokens received per EP rank (the sum over its experts), max / mean.
  // That ratio sets the all-to-all time: the busiest rank is the one everyone waits for.
  double ep_recv_max_over_mean = 0;  // 0 without expert parallelism
};

struct StepMetrics {
  int64_t step = 0;  // 1-based: steps completed
  int64_t total_steps = 0;
  double loss = 0, lm_loss = 0, mtp_loss = 0, balance_loss = 0;
  double grad_norm = 0;
  double lr = 0;
  int64_t tokens = 0;  // tokens consumed so far
  double tokens_per_s = 0;
  double mfu = 0;  // model FLOPs utilisation against the configured peak (0: no peak set)
  double elapsed_s = 0;
  double eta_s = 0;
  // Multi-rank: seconds this rank spent blocked on communication during the step (MoE
  // all-to-alls, gradient and parameter collectives, metric reductions) and the share of the
  // step's time that is.
  double exposed_comm_s = 0;
  double exposed_comm_fraction = 0;
  // Pipeline parallelism: each stage's exposed_comm_fraction (the mean over its ranks), stage 0
  // first, so an unbalanced split shows (rank 0's own figure above is one stage's view).
  std::vector<double> exposed_comm_by_stage;
  double step_s = 0;
  int64_t moe_a2a_bytes = 0;  // bytes this rank sent in MoE all-to-alls during the step
  // The step's peak of live tensor memory on the model's device and what its allocator holds
  // (cuda: CUDA's pool; cpu: malloc's heap, which keeps freed buffers as a caching allocator).
  int64_t device_peak_bytes = 0;
  int64_t device_reserved_bytes = 0;
  std::vector<LayerLoad> expert_load;
};

nlohmann::json to_json(const StepMetrics& m);
std::string console_line(const StepMetrics& m);
std::string format_duration(double seconds);  // "1h02m", "3m05s", "12.3s"

// Appends one JSON object per line and flushes, so a killed run keeps every logged step.
class MetricsLog {
 public:
  explicit MetricsLog(const std::string& path);
  void write(const StepMetrics& m);
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  std::ofstream out_;
};

}  // namespace dsx
