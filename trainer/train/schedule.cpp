#include "trainer/train/schedule.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
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

namespace {

// One stage's schedule being written: a micro-batch's forward with its transfers, its backward
// (fused, or the input pass of a split one) with its transfers.
struct StageActions {
  std::vector<Action>& actions;
  int stages, stage;
  bool mtp_pair;  // the MTP embeddings travel with the activations

  bool first() const { return stage == 0; }
  bool last() const { return stage == stages - 1; }
  void add(Action::Kind kind, int64_t mb, int peer = -1) { actions.push_back({kind, mb, stage, peer}); }

  // The MTP embeddings travel with the activations, stage to stage (the stages between pass them
  // on), so every transfer is between neighbours and 1F1B's ordering keeps it deadlock-free.
  void forward(int64_t mb) {
    using K = Action::Kind;
    if (!first()) {
      add(K::recv_activation, mb, stage - 1);
      if (mtp_pair) add(K::recv_mtp_embedding, mb, stage - 1);
    }
    add(K::forward, mb);
    if (!last()) {
      add(K::send_activation, mb, stage + 1);
      if (mtp_pair) add(K::send_mtp_embedding, mb, stage + 1);
    }
  }
  // kind: backward (fused) or backward_input
  void backward(int64_t mb, Action::Kind kind) {
    using K = Action::Kind;
    if (!last()) {
      add(K::recv_grad, mb, stage + 1);
      if (mtp_pair) add(K::recv_mtp_grad, mb, stage + 1);
    }
    add(kind, mb);
    if (!first()) {
      add(K::send_grad, mb, stage - 1);
      if (mtp_pair) add(K::send_mtp_grad, mb, stage - 1);
    }
  }
};

void check_schedule_args(const char* name, int64_t n, int stages, int stage) {
  if (n < 1) throw std::invalid_argument(std::string(name) + ": need at least one micro-batch");
  if (stages < 1 || stage < 0 || stage >= stages) {
    throw std::invalid_argument(fmt::format("{}: stage {} of {} does not exist", name, stage, stages));
  }
}

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

std::vector<Action> one_f_one_b_schedule(int64_t n, int stages, int stage, bool mtp) {
  check_schedule_args("one_f_one_b_schedule", n, stages, stage);
  std::vector<Action> actions;
  StageActions st{actions, stages, stage, mtp && stages > 1};
  const int64_t warmup = std::min<int64_t>(stages - stage - 1, n);
  for (int64_t mb = 0; mb < warmup; ++mb) st.forward(mb);
  for (int64_t j = 0; j < n - warmup; ++j) {
    st.forward(warmup + j);
    st.backward(j, Action::Kind::backward);
  }
  for (int64_t mb = n - warmup; mb < n; ++mb) st.backward(mb, Action::Kind::backward);
  st.add(Action::Kind::optimizer_step, -1);
  return actions;
}

PipelineRun run_pipeline(const std::vector<std::vector<Action>>& schedules, const ActionCosts& costs) {
  const auto stages = static_cast<int>(schedules.size());
  std::vector<size_t> at(schedules.size(), 0);  // next action of each stage
  std::vector<double> clock(schedules.size(), 0.0), busy(schedules.size(), 0.0);
  // A transfer's match time once it met its counterpart (both posted), else < 0.
  std::vector<std::vector<double>> matched(schedules.size());
  for (size_t s = 0; s < schedules.size(); ++s) matched[s].assign(schedules[s].size(), -1.0);
  const auto cost = [&](const Action& a) {
    switch (a.kind) {
      case Action::Kind::forward:
        return costs.forward;
      case Action::Kind::backward_input:
        return costs.backward_input;
      case Action::Kind::backward_weight:
        return costs.backward_weight;
      case Action::Kind::backward:
        return costs.backward_input + costs.backward_weight;
      default:
        return 0.0;
    }
  };
  // The group of transfers starting at stage s's next action: [at[s], end).
  const auto group_end = [&](int s) {
    size_t end = at[s];
    while (end < schedules[s].size() && schedules[s][end].is_transfer()) ++end;
    return end;
  };
  PipelineRun run;
  run.timeline.resize(schedules.size());
  for (bool moved = true; moved;) {
    moved = false;
    for (int s = 0; s < stages; ++s) {
      while (at[s] < schedules[s].size() && !schedules[s][at[s]].is_transfer()) {
        const Action& a = schedules[s][at[s]];
        const double c = cost(a);  // compute needs nobody
        if (c > 0) run.timeline[s].push_back({clock[s], clock[s] + c, a});
        clock[s] += c;
        busy[s] += c;
        ++at[s];
        moved = true;
      }
      if (at[s] == schedules[s].size()) continue;
      const size_t end = group_end(s);
      bool complete = true;
      double done = clock[s];
      for (size_t i = at[s]; i < end; ++i) {
        if (matched[s][i] >= 0) {
          done = std::max(done, matched[s][i]);
          continue;
        }
        const Action& a = schedules[s][i];
        if (a.peer < 0 || a.peer >= stages || a.peer == s) {
          run.stuck = fmt::format("stage {}: {} has no valid peer", s, to_string(a));
          return run;
        }
        // The counterpart must be in the peer's posted group (the peer waits there).
        const Action wanted{counterpart(a.kind), a.micro_batch, a.peer, s};
        const size_t peer_end = group_end(a.peer);
        bool found = false;
        for (size_t j = at[a.peer]; j < peer_end && !found; ++j) {
          if (schedules[a.peer][j] == wanted && matched[a.peer][j] < 0) {
            matched[a.peer][j] = matched[s][i] = std::max(clock[s], clock[a.peer]);
            done = std::max(done, matched[s][i]);
            found = true;
          }
        }
        complete = complete && found;
      }
      if (complete) {
        at[s] = end;
        clock[s] = done;
        moved = true;
      }
    }
  }
  for (int s = 0; s < stages; ++s) {
    if (at[s] < schedules[s].size()) {
      if (!run.stuck.empty()) run.stuck += "; ";
      run.stuck += fmt::format("stage {} waits at {}", s, to_string(schedules[s][at[s]]));
    }
  }
  double total_busy = 0;
  for (int s = 0; s < stages; ++s) {
    run.makespan = std::max(run.makespan, clock[s]);
    total_busy += busy[s];
  }
  if (run.makespan > 0) run.bubble = 1.0 - total_busy / (run.makespan * stages);
  return run;
}

int64_t max_in_flight(const std::vector<Action>& actions) {
  int64_t now = 0, most = 0;
  for (const Action& a : actions) {
    if (a.kind == Action::Kind::forward) most = std::max(most, ++now);
    if (a.kind == Action::Kind::backward || a.kind == Action::Kind::backward_weight) --now;
  }
  return most;
}

std::string draw_timeline(const PipelineRun& run, double unit) {
  const auto width = static_cast<size_t>(std::ceil(run.makespan / unit));
  std::string out;
  for (size_t s = 0; s < run.timeline.size(); ++s) {
    std::string row(width, '.');
    for (const ComputeSpan& span : run.timeline[s]) {
      const bool forward = span.action.kind == Action::Kind::forward;
      const auto mb = static_cast<char>(span.action.micro_batch % (forward ? 10 : 26));
      const char mark = forward ? static_cast<char>('0' + mb) : static_cast<char>('a' + mb);
      // the cells whose middle lies inside the span
      for (size_t cell = 0; cell < width; ++cell) {
        const double middle = (static_cast<double>(cell) + 0.5) * unit;
        if (middle >= span.start && middle < span.end) row[cell] = mark;
      }
    }
    out += fmt::format("stage {:>2} |{}|\n", s, row);
  }
  return out;
}

std::string pipeline_runs_to_completion(const std::vector<std::vector<Action>>& schedules) {
  return run_pipeline(schedules).stuck;
}

}  // namespace dsx
