#include "trainer/train/schedule.h"

#include <fmt/core.h>

#include <algorithm>
#include <stdexcept>

namespace dsx {

bool Action::is_transfer() const {
  switch (kind) {
    case Kind::send_activation:
    case Kind::recv_activation:
    case Kind::send_grad:
    case Kind::recv_grad:
    case Kind::send_mtp_embedding:
    case Kind::recv_mtp_embedding:
    case Kind::send_mtp_grad:
    case Kind::recv_mtp_grad:
      return true;
    default:
      return false;
  }
}

bool Action::is_send() const {
  return kind == Kind::send_activation || kind == Kind::send_grad || kind == Kind::send_mtp_embedding ||
         kind == Kind::send_mtp_grad;
}

namespace {

const char* short_name(Action::Kind k) {
  switch (k) {
    case Action::Kind::forward:
      return "F";
    case Action::Kind::backward_input:
      return "B";
    case Action::Kind::backward_weight:
      return "W";
    case Action::Kind::backward:
      return "BW";
    case Action::Kind::send_activation:
      return "SA";
    case Action::Kind::recv_activation:
      return "RA";
    case Action::Kind::send_grad:
      return "SG";
    case Action::Kind::recv_grad:
      return "RG";
    case Action::Kind::send_mtp_embedding:
      return "SE";
    case Action::Kind::recv_mtp_embedding:
      return "RE";
    case Action::Kind::send_mtp_grad:
      return "SEG";
    case Action::Kind::recv_mtp_grad:
      return "REG";
    case Action::Kind::optimizer_step:
      return "OPT";
  }
  return "?";
}

}  // namespace

std::string to_string(const Action& a) {
  std::string out = short_name(a.kind);
  if (a.micro_batch >= 0) out += std::to_string(a.micro_batch);
  if (a.is_transfer()) out += fmt::format("{}{}", a.is_send() ? '>' : '<', a.peer);
  return out;
}

std::string to_string(const std::vector<Action>& actions) {
  std::string out;
  for (const Action& a : actions) {
    if (!out.empty()) out += ' ';
    out += to_string(a);
  }
  return out;
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

std::vector<Action> one_f_one_b_schedule(int64_t n, int stages, int stage, bool mtp) {
  if (n < 1) throw std::invalid_argument("one_f_one_b_schedule: need at least one micro-batch");
  if (stages < 1 || stage < 0 || stage >= stages) {
    throw std::invalid_argument("one_f_one_b_schedule: stage " + std::to_string(stage) + " of " +
                                std::to_string(stages) + " does not exist");
  }
  using K = Action::Kind;
  const bool first_stage = stage == 0, last_stage = stage == stages - 1, mtp_pair = mtp && stages > 1;
  std::vector<Action> actions;
  const auto add = [&](K kind, int64_t mb, int peer = -1) { actions.push_back({kind, mb, stage, peer}); };
  // The MTP embeddings travel with the activations, stage to stage (the stages between pass them
  // on), so every transfer is between neighbours and 1F1B's ordering keeps it deadlock-free.
  const auto forward = [&](int64_t mb) {
    if (!first_stage) {
      add(K::recv_activation, mb, stage - 1);
      if (mtp_pair) add(K::recv_mtp_embedding, mb, stage - 1);
    }
    add(K::forward, mb);
    if (!last_stage) {
      add(K::send_activation, mb, stage + 1);
      if (mtp_pair) add(K::send_mtp_embedding, mb, stage + 1);
    }
  };
  const auto backward = [&](int64_t mb) {
    if (!last_stage) {
      add(K::recv_grad, mb, stage + 1);
      if (mtp_pair) add(K::recv_mtp_grad, mb, stage + 1);
    }
    add(K::backward, mb);
    if (!first_stage) {
      add(K::send_grad, mb, stage - 1);
      if (mtp_pair) add(K::send_mtp_grad, mb, stage - 1);
    }
  };
  const int64_t warmup = std::min<int64_t>(stages - stage - 1, n);
  for (int64_t mb = 0; mb < warmup; ++mb) forward(mb);
  for (int64_t j = 0; j < n - warmup; ++j) {
    forward(warmup + j);
    backward(j);
  }
  for (int64_t mb = n - warmup; mb < n; ++mb) backward(mb);
  add(K::optimizer_step, -1);
  return actions;
}

namespace {

// The receive that matches a send (and back).
Action::Kind counterpart(Action::Kind k) {
  using K = Action::Kind;
  switch (k) {
    case K::send_activation:
      return K::recv_activation;
    case K::recv_activation:
      return K::send_activation;
    case K::send_grad:
      return K::recv_grad;
    case K::recv_grad:
      return K::send_grad;
    case K::send_mtp_embedding:
      return K::recv_mtp_embedding;
    case K::recv_mtp_embedding:
      return K::send_mtp_embedding;
    case K::send_mtp_grad:
      return K::recv_mtp_grad;
    case K::recv_mtp_grad:
      return K::send_mtp_grad;
    default:
      throw std::logic_error("counterpart: " + to_string(Action{k}) + " is not a transfer");
  }
}

}  // namespace

std::string pipeline_runs_to_completion(const std::vector<std::vector<Action>>& schedules) {
  const auto stages = static_cast<int>(schedules.size());
  std::vector<size_t> at(schedules.size(), 0);               // next action of each stage
  std::vector<std::vector<bool>> matched(schedules.size());  // a transfer met its counterpart
  for (size_t s = 0; s < schedules.size(); ++s) matched[s].assign(schedules[s].size(), false);
  // The group of transfers starting at stage s's next action: [at[s], end).
  const auto group_end = [&](int s) {
    size_t end = at[s];
    while (end < schedules[s].size() && schedules[s][end].is_transfer()) ++end;
    return end;
  };
  for (bool moved = true; moved;) {
    moved = false;
    for (int s = 0; s < stages; ++s) {
      while (at[s] < schedules[s].size() && !schedules[s][at[s]].is_transfer()) {
        ++at[s];  // compute needs nobody
        moved = true;
      }
      if (at[s] == schedules[s].size()) continue;
      const size_t end = group_end(s);
      bool complete = true;
      for (size_t i = at[s]; i < end; ++i) {
        if (matched[s][i]) continue;
        const Action& a = schedules[s][i];
        if (a.peer < 0 || a.peer >= stages || a.peer == s) {
          return "stage " + std::to_string(s) + ": " + to_string(a) + " has no valid peer";
        }
        // The counterpart must be in the peer's posted group (the peer waits there).
        const Action wanted{counterpart(a.kind), a.micro_batch, a.peer, s};
        const size_t peer_end = group_end(a.peer);
        bool found = false;
        for (size_t j = at[a.peer]; j < peer_end && !found; ++j) {
          if (schedules[a.peer][j] == wanted && !matched[a.peer][j]) {
            matched[a.peer][j] = matched[s][i] = found = true;
          }
        }
        complete = complete && found;
      }
      if (complete) {
        at[s] = end;
        moved = true;
      }
    }
  }
  std::string stuck;
  for (int s = 0; s < stages; ++s) {
    if (at[s] < schedules[s].size()) {
      if (!stuck.empty()) stuck += "; ";
      stuck += fmt::format("stage {} waits at {}", s, to_string(schedules[s][at[s]]));
    }
  }
  return stuck;
}

}  // namespace dsx
