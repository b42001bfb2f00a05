#include "trainer/train/stop_signals.h"

namespace dsx {
namespace {

volatile std::sig_atomic_t g_stop_requested = 0;
extern "C" void request_stop(int) {
  g_stop_requested = 1;
}

}  // namespace

StopSignals::StopSignals() {
  g_stop_requested = 0;
  old_int_ = std::signal(SIGINT, request_stop);
  old_term_ = std::signal(SIGTERM, request_stop);
}

StopSignals::~StopSignals() {
  std::signal(SIGINT, old_int_);
  std::signal(SIGTERM, old_term_);
}

bool StopSignals::stop_requested() {
  return g_stop_requested != 0;
}

}  // namespace dsx
