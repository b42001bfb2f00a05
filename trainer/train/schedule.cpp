#include "trainer/train/schedule.h"

#include <stdexcept>

namespace dsx {

std::string to_string(const Action& a) {
  const std::string mb = a.micro_batch >= 0 ? std::to_string(a.micro_batch) : "";
  switch (a.kind) {
    case Action::Kind::forward: return "F" + mb;
    case Action::Kind::backward_input: return "B" + mb;
    case Action::Kind::backward_weight: return "W" + mb;
    case Action::Kind::backward: return "BW" + mb;
    case Action::Kind::send_activation: return "SA" + mb;
    case Action::Kind::recv_activation: return "RA" + mb;
    case Action::Kind::send_grad: return "SG" + mb;
    case Action::Kind::recv_grad: return "RG" + mb;
    case Action::Kind::optimizer_step: return "OPT";
  }
  return "?";
}

std::vector<Action> gradient_accumulation_schedule(int64_t n) {
  if (n < 1) throw std::invalid_argument("gradient_accumulation_schedule: need at least one micro-batch");
  std::vector<Action> actions;
  for (int64_t mb = 0; mb < n; ++mb) {
    actions.push_back({Action::Kind::forward, mb, 0});
    actions.push_back({Action::Kind::backward, mb, 0});
  }
  actions.push_back({Action::Kind::optimizer_step, -1, 0});
  return actions;
}

}  // namespace dsx
