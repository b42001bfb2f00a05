// Ctrl-C / SIGTERM (what Slurm sends before a time limit) end a run after the current step with
// a checkpoint, instead of losing the work since the last one. While a StopSignals lives, the
// two signals only set a flag that the loop polls with stop_requested().
#pragma once
#include <csignal>

namespace dsx {

class StopSignals {
 public:
  StopSignals();
  ~StopSignals();
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

  static bool stop_requested();

 private:
  void (*old_int_)(int);
  void (*old_term_)(int);
};

}  // namespace dsx
