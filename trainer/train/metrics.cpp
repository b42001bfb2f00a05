#include "trainer/train/metrics.h"

#include <fmt/core.h>

#include <algorithm>

#include "kernels/error.h"

namespace dsx {

nlohmann::json to_json(const StepMetrics& m) {
  nlohmann::json j = {{"step", m.step},
                      {"loss", m.loss},
                      {"lm_loss", m.lm_loss},
                      {"mtp_loss", m.mtp_loss},
                      {"balance_loss", m.balance_loss},
                      {"grad_norm", m.grad_norm},
                      {"lr", m.lr},
                      {"tokens", m.tokens},
                      {"tokens_per_s", m.tokens_per_s},
                      {"mfu", m.mfu},
                      {"elapsed_s", m.elapsed_s},
                      {"step_s", m.step_s},
                      {"exposed_comm_s", m.exposed_comm_s},
                      {"exposed_comm_fraction", m.exposed_comm_fraction},
                      {"moe_a2a_bytes", m.moe_a2a_bytes}};
  if (!m.exposed_comm_by_stage.empty()) j["exposed_comm_fraction_by_stage"] = m.exposed_comm_by_stage;
  if (m.device_reserved_bytes > 0) {
    j["device_peak_bytes"] = m.device_peak_bytes;
    j["device_reserved_bytes"] = m.device_reserved_bytes;
  }
  nlohmann::json loads = nlohmann::json::array();
  for (const auto& l : m.expert_load) {
    loads.push_back({{"layer", l.layer},
                     {"min_tokens", l.min_tokens},
                     {"max_tokens", l.max_tokens},
                     {"cv", l.cv},
                     {"bias_spread", l.bias_spread},
                     {"ep_recv_max_over_mean", l.ep_recv_max_over_mean}});
  }
  j["expert_load"] = std::move(loads);
  return j;
}

std::string format_duration(double s) {
  if (s < 60) return fmt::format("{:.1f}s", s);
  const auto total = static_cast<int64_t>(s + 0.5);
  if (total < 3600) return fmt::format("{}m{:02}s", total / 60, total % 60);
  return fmt::format("{}h{:02}m", total / 3600, (total % 3600) / 60);
}

std::string console_line(const StepMetrics& m) {
  double worst_cv = 0, worst_ep = 0;
  for (const auto& l : m.expert_load) {
    worst_cv = std::max(worst_cv, l.cv);
    worst_ep = std::max(worst_ep, l.ep_recv_max_over_mean);
  }
  std::string line = fmt::format("step {:>6}/{} | loss {:.4f} (lm {:.4f}", m.step, m.total_steps, m.loss, m.lm_loss);
  if (m.mtp_loss != 0) line += fmt::format(" mtp {:.4f}", m.mtp_loss);
  if (m.balance_loss != 0) line += fmt::format(" bal {:.2e}", m.balance_loss);
  line += fmt::format(") | gnorm {:.3f} | lr {:.3e} | {:.0f} tok/s", m.grad_norm, m.lr, m.tokens_per_s);
  if (m.mfu > 0) line += fmt::format(" | mfu {:.1f}%", 100 * m.mfu);
  if (!m.expert_load.empty()) line += fmt::format(" | load cv {:.2f}", worst_cv);
  if (worst_ep > 0) line += fmt::format(" ep max/mean {:.2f}", worst_ep);
  if (m.exposed_comm_s > 0) line += fmt::format(" | comm {:.0f}%", 100 * m.exposed_comm_fraction);
  if (!m.exposed_comm_by_stage.empty()) {
    line += " (by stage";
    for (double f : m.exposed_comm_by_stage) line += fmt::format(" {:.0f}%", 100 * f);
    line += ")";
  }
  if (m.device_reserved_bytes > 0) {
    constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;
    line += fmt::format(" | mem {:.1f}/{:.1f} GiB", static_cast<double>(m.device_peak_bytes) / kGiB,
                        static_cast<double>(m.device_reserved_bytes) / kGiB);
  }
  line += fmt::format(" | {} elapsed, ETA {}", format_duration(m.elapsed_s), format_duration(m.eta_s));
  return line;
}

MetricsLog::MetricsLog(const std::string& path) : path_(path), out_(path, std::ios::app) {
  if (!out_) throw UserError("logging: cannot open metrics file " + path + " for appending");
}

void MetricsLog::write(const StepMetrics& m) {
  out_ << to_json(m).dump() << '\n';
  out_.flush();
}

}  // namespace dsx
