// A training step is a list of actions produced by a schedule (ARCHITECTURE.md principle 5):
// visible data, not control flow hidden in the loop. Single-rank gradient accumulation is the
// trivial schedule; pipeline schedules (1F1B, zero-bubble, DualPipe) produce longer lists with
// send/recv and split backward_input/backward_weight actions.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsx {

struct Action {
  enum class Kind { forward, backward_input, backward_weight, backward, send_activation, recv_activation,
                    send_grad, recv_grad, optimizer_step };
  Kind kind;
  int64_t micro_batch = -1;  // -1 for step-level actions
  int stage = 0;             // pipeline stage (0 without PP)
};

std::string to_string(const Action& a);  // "F3", "B3", "W3", "OPT" ...

// Forward then backward for each micro-batch in turn (input and weight gradients together,
// accumulating), then one optimizer step.
std::vector<Action> gradient_accumulation_schedule(int64_t n_micro_batches);

}  // namespace dsx
