#include "trainer/train/schedule.h"

#include "kernels/error.h"

#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <optional>
#include <stdexcept>
#include <unordered_map>

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
  if (a.chunk > 0) out += std::string(static_cast<size_t>(a.chunk), '\'');
  if (a.is_transfer()) out += fmt::format("{}{}", a.is_send() ? '>' : '<', a.peer);
  if (a.is_transfer() && a.peer_chunk >= 0) out += std::string(static_cast<size_t>(a.peer_chunk), '\'');
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
  return one_f_one_b_schedule(n, 1, 0, false);
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
  // before_compute: adds actions after the receives are posted, before the compute waits on them
  void forward(int64_t mb, const std::function<void()>& before_compute = {}) {
    using K = Action::Kind;
    if (!first()) {
      add(K::recv_activation, mb, stage - 1);
      if (mtp_pair) add(K::recv_mtp_embedding, mb, stage - 1);
    }
    if (before_compute) before_compute();
    add(K::forward, mb);
    if (!last()) {
      add(K::send_activation, mb, stage + 1);
      if (mtp_pair) add(K::send_mtp_embedding, mb, stage + 1);
    }
  }
  // kind: backward (fused) or backward_input
  void backward(int64_t mb, Action::Kind kind, const std::function<void()>& before_compute = {}) {
    using K = Action::Kind;
    if (!last()) {
      add(K::recv_grad, mb, stage + 1);
      if (mtp_pair) add(K::recv_mtp_grad, mb, stage + 1);
    }
    if (before_compute) before_compute();
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

std::vector<Action> zero_bubble_schedule(int64_t n, int stages, int stage, bool mtp) {
  check_schedule_args("zero_bubble_schedule", n, stages, stage);
  std::vector<Action> actions;
  StageActions st{actions, stages, stage, mtp && stages > 1};
  int64_t next_weight = 0, inputs_done = 0;
  // The weight passes due so far, placed after a group of transfers is posted and before the
  // compute that waits for it: they fill that wait.
  const auto weights = [&] {
    while (next_weight < inputs_done) st.add(Action::Kind::backward_weight, next_weight++);
  };
  const auto input_pass = [&](int64_t mb) {
    st.backward(mb, Action::Kind::backward_input, weights);
    ++inputs_done;
  };
  const int64_t warmup = std::min<int64_t>(stages - stage - 1, n);
  for (int64_t mb = 0; mb < warmup; ++mb) st.forward(mb);
  for (int64_t j = 0; j < n - warmup; ++j) {
    st.forward(warmup + j, weights);
    input_pass(j);
  }
  for (int64_t mb = n - warmup; mb < n; ++mb) input_pass(mb);
  weights();
  st.add(Action::Kind::optimizer_step, -1);
  return actions;
}

namespace {

// A V-shaped rank's compute actions in order (dualpipev_schedule's phases), without transfers.
class DualPipeVComputes {
 public:
  DualPipeVComputes(int64_t n, int ranks, int rank) : rank_(rank) {
    const int64_t P = ranks, r = rank;
    repeat(2 * (P - r - 1), [&] { forward(0); });
    repeat(r + 1, [&] {
      forward(0);
      forward(1);
    });
    repeat(P - r - 1, [&] {
      backward(1, true);
      weight();
      forward(1);
    });
    repeat(n - 2 * P + r + 1, [&] {
      forward(0);
      backward(1, false);
      forward(1);
      backward(0, false);
    });
    repeat(P - r - 1, [&] {
      backward(1, false);
      forward(1);
      backward(0, false);
    });
    // the second half of these backwards leave their weight passes to the W's below (odd ranks
    // from a B1, even ranks from the B0 after it, so the W's match the (W B0) phase's needs)
    const int64_t split_from = (r + 1) / 2;
    for (int64_t i = 0; i < r + 1; ++i) {
      backward(1, i > split_from || (i == split_from && r % 2 == 1));
      backward(0, i >= split_from);
    }
    repeat(P - r - 1, [&] {
      weight();
      backward(0, true);
    });
    repeat(r + 1, [&] { weight(); });
  }
  std::vector<Action> take() {
    if (!deferred_.empty()) throw std::logic_error("dualpipev_schedule: weight passes left over");
    return std::move(actions_);
  }

 private:
  static void repeat(int64_t times, const std::function<void()>& f) {
    for (int64_t i = 0; i < times; ++i) f();
  }
  void forward(int chunk) { add(Action::Kind::forward, next_forward_[chunk]++, chunk); }
  // split: input pass now, its weight pass at a later weight()
  void backward(int chunk, bool split) {
    const int64_t mb = next_backward_[chunk]++;
    add(split ? Action::Kind::backward_input : Action::Kind::backward, mb, chunk);
    if (split) deferred_.push_back({mb, chunk});
  }
  void weight() {
    if (deferred_.empty()) throw std::logic_error("dualpipev_schedule: a weight pass with no input pass before it");
    const auto [mb, chunk] = deferred_.front();
    deferred_.erase(deferred_.begin());
    add(Action::Kind::backward_weight, mb, chunk);
  }
  void add(Action::Kind kind, int64_t mb, int chunk) { actions_.push_back({kind, mb, rank_, -1, chunk}); }

  int rank_;
  int64_t next_forward_[2] = {0, 0}, next_backward_[2] = {0, 0};
  std::vector<std::pair<int64_t, int>> deferred_;
  std::vector<Action> actions_;
};

// The transfers a compute action of `layout` needs before it (receives) and makes after it
// (sends): with the neighbouring stage when that stage sits on another rank. mtp: the MTP
// embeddings (or their gradients) travel with the activations (their gradients).
std::vector<Action> remote_transfers(const Action& c, const PipelineLayout& layout, bool receives, bool mtp) {
  using K = Action::Kind;
  const int stage = layout.stage_of(c.stage, c.chunk), last = layout.stages() - 1;
  const bool forward = c.kind == K::forward;
  if (!forward && c.kind != K::backward && c.kind != K::backward_input) return {};
  // forward: receives from stage - 1, sends to stage + 1; backward the other way round
  const int from = forward ? stage - 1 : stage + 1, to = forward ? stage + 1 : stage - 1;
  const int other = receives ? from : to;
  if (other < 0 || other > last || layout.rank_of(other) == c.stage) return {};
  const int peer = layout.rank_of(other), peer_chunk = layout.chunk_of(other);
  Action a{receives ? (forward ? K::recv_activation : K::recv_grad) : (forward ? K::send_activation : K::send_grad),
           c.micro_batch,
           c.stage,
           peer,
           c.chunk,
           peer_chunk == c.chunk ? -1 : peer_chunk};
  if (!mtp) return {a};
  Action embedding = a;
  embedding.kind = receives ? (forward ? K::recv_mtp_embedding : K::recv_mtp_grad)
                            : (forward ? K::send_mtp_embedding : K::send_mtp_grad);
  return {a, embedding};
}

// computes with their transfers: after each compute, one group of its sends and the receives of
// the next compute other than a weight pass (so weight passes between fill the wait); then the
// optimizer step. Receives are never posted further ahead: a stage's groups complete in order,
// so a receive posted early would hold back the sends behind it.
std::vector<Action> with_transfers(const std::vector<Action>& computes, const PipelineLayout& layout, bool mtp) {
  std::vector<Action> out;
  size_t posted_for = 0;  // computes before it have their receives posted
  const auto post_next_receives = [&](size_t from) {
    for (size_t j = std::max(from, posted_for); j < computes.size(); ++j) {
      if (computes[j].kind == Action::Kind::backward_weight) continue;
      const std::vector<Action> recv = remote_transfers(computes[j], layout, true, mtp);
      out.insert(out.end(), recv.begin(), recv.end());
      posted_for = j + 1;
      return;
    }
  };
  post_next_receives(0);
  for (size_t i = 0; i < computes.size(); ++i) {
    out.push_back(computes[i]);
    const std::vector<Action> sends = remote_transfers(computes[i], layout, false, mtp);
    out.insert(out.end(), sends.begin(), sends.end());
    post_next_receives(i + 1);
  }
  out.push_back({Action::Kind::optimizer_step, -1, computes.empty() ? 0 : computes[0].stage});
  return out;
}

// computes in units (unit_ends: the index after each unit's last compute) with their transfers:
// the receives of the first unit, then after each unit one group of its sends and the next
// unit's receives; then the optimizer step.
std::vector<Action> with_transfers_by_unit(const std::vector<Action>& computes, const std::vector<size_t>& unit_ends,
                                           const PipelineLayout& layout, bool mtp) {
  std::vector<Action> out;
  const auto post = [&](size_t begin, size_t end, bool receives) {
    for (size_t j = begin; j < end; ++j) {
      const std::vector<Action> t = remote_transfers(computes[j], layout, receives, mtp);
      out.insert(out.end(), t.begin(), t.end());
    }
  };
  size_t begin = 0;
  if (!unit_ends.empty()) post(0, unit_ends[0], true);
  for (size_t u = 0; u < unit_ends.size(); ++u) {
    out.insert(out.end(), computes.begin() + static_cast<std::ptrdiff_t>(begin),
               computes.begin() + static_cast<std::ptrdiff_t>(unit_ends[u]));
    post(begin, unit_ends[u], false);
    if (u + 1 < unit_ends.size()) post(unit_ends[u], unit_ends[u + 1], true);
    begin = unit_ends[u];
  }
  out.push_back({Action::Kind::optimizer_step, -1, computes.empty() ? 0 : computes[0].stage});
  return out;
}

// An interleaved rank's compute actions in order (interleaved_1f1b_schedule), without transfers,
// in units: each warm-up forward, each steady forward with the backward after it, each
// cool-down backward (unit_ends: the index after each unit's last compute).
struct InterleavedOrder {
  std::vector<Action> computes;
  std::vector<size_t> unit_ends;
};
InterleavedOrder interleaved_order(int64_t n, int ranks, int rank, int chunks) {
  const int64_t P = ranks, v = chunks, total = n * v;
  // the k-th forward's (or backward's, chunks reversed) micro-batch and chunk
  const auto virtual_step = [&](int64_t k, bool backward) {
    const int64_t in_round = k % (P * v), chunk = in_round / P;
    return std::pair{(k / (P * v)) * P + k % P, static_cast<int>(backward ? v - 1 - chunk : chunk)};
  };
  InterleavedOrder out;
  const auto add = [&](Action::Kind kind, int64_t k) {
    const auto [mb, chunk] = virtual_step(k, kind != Action::Kind::forward);
    out.computes.push_back({kind, mb, rank, -1, chunk});
  };
  const auto end_unit = [&] { out.unit_ends.push_back(out.computes.size()); };
  const int64_t warmup = std::min(total, 2 * (P - rank - 1) + (v - 1) * P);
  for (int64_t k = 0; k < warmup; ++k) {
    add(Action::Kind::forward, k);
    end_unit();
  }
  for (int64_t k = 0; k < total - warmup; ++k) {
    add(Action::Kind::forward, warmup + k);
    add(Action::Kind::backward, k);
    end_unit();
  }
  for (int64_t k = total - warmup; k < total; ++k) {
    add(Action::Kind::backward, k);
    end_unit();
  }
  return out;
}

}  // namespace

std::vector<Action> dualpipev_schedule(int64_t n, int ranks, int rank) {
  check_schedule_args("dualpipev_schedule", n, ranks, rank);
  if (n < 2 * static_cast<int64_t>(ranks)) {
    throw std::invalid_argument(fmt::format(
        "dualpipev_schedule: {} micro-batches are too few for {} ranks (DualPipeV needs at least 2 x ranks = {})", n,
        ranks, 2 * ranks));
  }
  return with_transfers(DualPipeVComputes(n, ranks, rank).take(), {.ranks = ranks, .v_shape = true}, false);
}

std::vector<Action> interleaved_1f1b_schedule(int64_t n, int ranks, int rank, int chunks, bool mtp) {
  check_schedule_args("interleaved_1f1b_schedule", n, ranks, rank);
  if (chunks < 1) throw std::invalid_argument("interleaved_1f1b_schedule: a rank needs at least one chunk");
  if (n % ranks != 0) {
    throw std::invalid_argument(fmt::format(
        "interleaved_1f1b_schedule: {} micro-batches are not a multiple of the {} ranks (it runs them in rounds of "
        "the ranks)",
        n, ranks));
  }
  const InterleavedOrder order = interleaved_order(n, ranks, rank, chunks);
  return with_transfers_by_unit(order.computes, order.unit_ends, {.ranks = ranks, .interleave = chunks},
                                mtp && ranks > 1);
}

PipelineLayout pipeline_layout(const Recipe& r) {
  const int ranks = static_cast<int>(r.parallel.pp);
  const PipelineSchedule schedule = r.parallel.pp_schedule;
  return {.ranks = ranks,
          .v_shape = ranks > 1 && schedule == PipelineSchedule::dualpipev,
          .interleave =
              ranks > 1 && schedule == PipelineSchedule::interleaved_1f1b ? static_cast<int>(r.parallel.pp_chunks) : 1};
}

std::vector<int64_t> pipeline_split(const Recipe& r) {
  if (r.parallel.pp_split == PipelineSplit::even)
    return even_split(r.model.num_hidden_layers, pipeline_layout(r).stages());
  return pipeline_split(r, module_flops_per_token(r.model, r.train.seq_len));
}

std::vector<int64_t> pipeline_split(const Recipe& r, const ModuleFlops& flops) {
  const PipelineLayout layout = pipeline_layout(r);
  return r.parallel.pp_split == PipelineSplit::balanced ? balanced_split(flops, layout)
                                                        : even_split(r.model.num_hidden_layers, layout.stages());
}

std::vector<double> relative_stage_flops(const Recipe& r) {
  const ModuleFlops module_flops = module_flops_per_token(r.model, r.train.seq_len);
  return relative_stage_flops(module_flops, pipeline_split(r, module_flops));
}

std::vector<double> relative_stage_flops(const ModuleFlops& module_flops, const std::vector<int64_t>& split) {
  std::vector<double> flops = stage_flops_per_token(module_flops, split);
  double mean = 0;
  for (double f : flops) mean += f / static_cast<double>(flops.size());
  for (double& f : flops) f /= mean;
  return flops;
}

std::vector<Action> stage_schedule(const Recipe& r, int64_t n, int stage) {
  const int stages = static_cast<int>(r.parallel.pp);
  if (stages == 1) return gradient_accumulation_schedule(n);
  const bool mtp = r.model.num_nextn_predict_layers > 0;
  switch (r.parallel.pp_schedule) {
    case PipelineSchedule::one_f_one_b:
      return one_f_one_b_schedule(n, stages, stage, mtp);
    case PipelineSchedule::zero_bubble:
      return zero_bubble_schedule(n, stages, stage, mtp);
    case PipelineSchedule::interleaved_1f1b:
      if (n % stages != 0) {
        throw UserError(fmt::format(
            "parallel.pp_schedule: interleaved_1f1b runs the micro-batches in rounds of parallel.pp = {}; this step "
            "has {} (train.global_batch / (train.micro_batch x parallel.dp), during a batch ramp too)",
            stages, n));
      }
      return interleaved_1f1b_schedule(n, stages, stage, static_cast<int>(r.parallel.pp_chunks), mtp);
    case PipelineSchedule::dualpipev:
      if (n < 2 * static_cast<int64_t>(stages)) {
        throw UserError(fmt::format(
            "parallel.pp_schedule: dualpipev needs at least 2 x parallel.pp = {} micro-batches per step, this step "
            "has {} (train.global_batch / (train.micro_batch x parallel.dp), during a batch ramp too)",
            2 * stages, n));
      }
      return dualpipev_schedule(n, stages, stage);
    default:
      throw UserError(
          fmt::format("parallel.pp_schedule: {} is not built yet; use 1f1b, interleaved_1f1b, zero_bubble or dualpipev",
                      enum_name(r.parallel.pp_schedule)));
  }
}

namespace {

// The receives a compute action consumes (of its own micro-batch and chunk, on its own stage).
bool consumes(const Action& compute, const Action& transfer) {
  if (transfer.micro_batch != compute.micro_batch || transfer.chunk != compute.chunk || transfer.is_send())
    return false;
  switch (compute.kind) {
    case Action::Kind::forward:
      return transfer.kind == Action::Kind::recv_activation || transfer.kind == Action::Kind::recv_mtp_embedding;
    case Action::Kind::backward:
    case Action::Kind::backward_input:
      return transfer.kind == Action::Kind::recv_grad || transfer.kind == Action::Kind::recv_mtp_grad;
    default:
      return false;
  }
}

// NCCL pairs a send with the peer's receive by their order per pair of ranks, without tags: the
// sends from s to p must be posted in the order p posts the matching receives. "" when they are,
// else the first pair of ranks where they differ.
std::string pairing_problem(const std::vector<std::vector<Action>>& schedules) {
  const auto stages = static_cast<int>(schedules.size());
  for (int s = 0; s < stages; ++s) {
    for (int p = 0; p < stages; ++p) {
      std::vector<Action> sent, received;  // as the sender's actions, in posting order
      for (const Action& a : schedules[static_cast<size_t>(s)]) {
        if (a.is_transfer() && a.is_send() && a.peer == p) sent.push_back(a);
      }
      for (const Action& a : schedules[static_cast<size_t>(p)]) {
        if (a.is_transfer() && !a.is_send() && a.peer == s)
          received.push_back(
              {counterpart(a.kind), a.micro_batch, s, p, a.other_chunk(), a.peer_chunk < 0 ? -1 : a.chunk});
      }
      // (a send without a receive, or the reverse, is left to the run: it waits forever)
      const auto [mine, theirs] = std::mismatch(sent.begin(), sent.end(), received.begin(), received.end());
      if (mine == sent.end() || theirs == received.end()) continue;
      return fmt::format(
          "stage {} posts its sends to stage {} in another order than stage {} posts the receives ({} "
          "against {}): NCCL, which pairs them by order, would mix them up",
          s, p, p, to_string(*mine), to_string(*theirs));
    }
  }
  return "";
}

// One clocked run (see run_pipeline): the transfer groups of every stage, in posting order.
class ClockedRun {
 public:
  ClockedRun(const std::vector<std::vector<Action>>& schedules, const ActionCosts& costs, TransferRule rule)
      : schedules_(schedules), costs_(costs), rule_(rule) {
    const size_t stages = schedules.size();
    group_of_.resize(stages);
    groups_.resize(stages);
    for (size_t s = 0; s < stages; ++s) {
      group_of_[s].assign(schedules[s].size(), -1);
      for (size_t i = 0; i < schedules[s].size();) {
        if (!schedules[s][i].is_transfer()) {
          ++i;
          continue;
        }
        Group g{i, i, -1, -1};
        while (g.end < schedules[s].size() && schedules[s][g.end].is_transfer()) {
          group_of_[s][g.end++] = static_cast<int>(groups_[s].size());
        }
        groups_[s].push_back(g);
        i = g.end;
      }
    }
    index_actions();
  }

  PipelineRun run() {
    const auto stages = static_cast<int>(schedules_.size());
    std::vector<size_t> at(schedules_.size(), 0);
    std::vector<double> clock(schedules_.size(), 0.0), busy(schedules_.size(), 0.0);
    PipelineRun run;
    run.timeline.resize(schedules_.size());
    for (int s = 0; s < stages; ++s) {
      for (const Action& a : schedules_[s]) {
        if (a.is_transfer() && (a.peer < 0 || a.peer >= stages || a.peer == s)) {
          run.stuck = fmt::format("stage {}: {} has no valid peer", s, to_string(a));
          return run;
        }
      }
    }
    if (rule_ == TransferRule::in_order) {
      run.stuck = pairing_problem(schedules_);
      if (!run.stuck.empty()) return run;
    }
    for (bool moved = true; moved;) {
      moved = false;
      for (int s = 0; s < stages; ++s) {
        const std::vector<Action>& actions = schedules_[s];
        while (at[s] < actions.size()) {
          const Action& a = actions[at[s]];
          if (a.is_transfer()) {  // posting never waits
            Group& g = groups_[s][static_cast<size_t>(group_of_[s][at[s]])];
            if (g.posted < 0) g.posted = clock[s];
            ++at[s];
            moved = true;
            continue;
          }
          // A compute waits for the receives it consumes; the optimizer step for everything.
          std::optional<double> ready = clock[s];
          if (a.kind == Action::Kind::optimizer_step) {
            for (size_t g = 0; g < groups_[s].size() && ready && groups_[s][g].begin < at[s]; ++g)
              ready = max_of(ready, completion(s, g));
          }
          for (const size_t i : receives_consumed(s, a)) {
            if (!ready) break;
            // in order, the group completes as a whole; independent, each transfer by itself
            ready = max_of(ready, rule_ == TransferRule::in_order ? completion(s, static_cast<size_t>(group_of_[s][i]))
                                                                  : transfer_done(s, i));
          }
          if (!ready) break;
          clock[s] = *ready;
          const double c = cost(a);
          if (c > 0) run.timeline[s].push_back({clock[s], clock[s] + c, a});
          clock[s] += c;
          busy[s] += c;
          ++at[s];
          moved = true;
        }
      }
    }
    for (int s = 0; s < stages; ++s) {
      std::string why;
      if (at[s] < schedules_[s].size()) {
        why = to_string(schedules_[s][at[s]]);
      } else {
        for (size_t g = 0; g < groups_[s].size() && why.empty(); ++g) {
          if (!completion(s, g)) why = "the end, " + to_string(schedules_[s][groups_[s][g].begin]) + " in flight";
        }
      }
      if (why.empty()) continue;
      if (!run.stuck.empty()) run.stuck += "; ";
      run.stuck += fmt::format("stage {} waits at {}", s, why);
    }
    double total_busy = 0;
    for (int s = 0; s < stages; ++s) {
      run.makespan = std::max(run.makespan, clock[s]);
      total_busy += busy[s];
    }
    if (run.makespan > 0) run.bubble = 1.0 - total_busy / (run.makespan * stages);
    return run;
  }

 private:
  struct Group {
    size_t begin, end;       // its actions
    double posted = -1;      // when the stage reached it (< 0: not yet)
    double completed = -1;   // once known
    bool resolving = false;  // completion() is working it out (a cycle means deadlock)
  };

  double cost(const Action& a) const {
    const double scale =
        costs_.scale.empty() ? 1.0 : costs_.scale.at(static_cast<size_t>(a.stage)).at(static_cast<size_t>(a.chunk));
    switch (a.kind) {
      case Action::Kind::forward:
        return scale * costs_.forward;
      case Action::Kind::backward_input:
        return scale * costs_.backward_input;
      case Action::Kind::backward_weight:
        return scale * costs_.backward_weight;
      case Action::Kind::backward:
        return scale * (costs_.backward_input + costs_.backward_weight);
      default:
        return 0.0;
    }
  }

  // in_order: a stage's groups run one after another (one communication stream), a group starts
  // once it is posted and the one before it completed; independent: once it is posted.
  std::optional<double> start(int s, size_t g) {
    const Group& group = groups_[s][g];
    if (group.posted < 0) return std::nullopt;
    if (g == 0 || rule_ == TransferRule::independent) return group.posted;
    const std::optional<double> before = completion(s, g - 1);
    if (!before) return std::nullopt;
    return std::max(group.posted, *before);
  }

  static std::optional<double> max_of(std::optional<double> a, std::optional<double> b) {
    return a && b ? std::optional(std::max(*a, *b)) : std::nullopt;
  }

  // Transfer i of stage s meets its counterpart once both their groups have started.
  std::optional<double> transfer_done(int s, size_t i) {
    const Action& a = schedules_[s][i];
    const auto it = transfer_index_[a.peer].find(transfer_key(counterpart(a.kind), a.micro_batch, s, a.other_chunk()));
    if (it == transfer_index_[a.peer].end()) return std::nullopt;  // never posted: stuck
    return max_of(start(s, static_cast<size_t>(group_of_[s][i])),
                  start(a.peer, static_cast<size_t>(group_of_[a.peer][it->second])));
  }

  // Lookups the run repeats, made once (a step of 240 micro-batches on 32 stages has ~10^5
  // actions; scanning for them made `dsx plan` quadratic): each stage's transfers by what they
  // are (the first of equal ones, as a scan finds it), and its receives by the micro-batch, chunk
  // and direction of the compute that consumes them, in posting order.
  static uint64_t transfer_key(Action::Kind kind, int64_t micro_batch, int peer, int chunk) {
    return (static_cast<uint64_t>(micro_batch + 1) << 32) | (static_cast<uint64_t>(peer) << 16) |
           (static_cast<uint64_t>(chunk) << 5) | static_cast<uint64_t>(kind);
  }
  static uint64_t consumer_key(int64_t micro_batch, int chunk, bool gradient) {
    return (static_cast<uint64_t>(micro_batch + 1) << 16) | (static_cast<uint64_t>(chunk) << 1) | (gradient ? 1 : 0);
  }
  void index_actions() {
    transfer_index_.resize(schedules_.size());
    receives_by_consumer_.resize(schedules_.size());
    for (size_t s = 0; s < schedules_.size(); ++s) {
      for (size_t i = 0; i < schedules_[s].size(); ++i) {
        const Action& a = schedules_[s][i];
        if (!a.is_transfer()) continue;
        transfer_index_[s].emplace(transfer_key(a.kind, a.micro_batch, a.peer, a.chunk), i);
        for (const bool gradient : {false, true}) {
          const Action consumer{gradient ? Action::Kind::backward : Action::Kind::forward, a.micro_batch, a.stage, -1,
                                a.chunk};
          if (consumes(consumer, a))
            receives_by_consumer_[s][consumer_key(a.micro_batch, a.chunk, gradient)].push_back(i);
        }
      }
    }
  }
  const std::vector<size_t>& receives_consumed(int s, const Action& compute) const {
    static const std::vector<size_t> none;
    const bool forward = compute.kind == Action::Kind::forward;
    if (!forward && compute.kind != Action::Kind::backward && compute.kind != Action::Kind::backward_input) return none;
    const auto& index = receives_by_consumer_[static_cast<size_t>(s)];
    const auto it = index.find(consumer_key(compute.micro_batch, compute.chunk, !forward));
    return it == index.end() ? none : it->second;
  }

  // A group completes when each of its transfers met its counterpart, which happens once both
  // their groups have started (rendezvous).
  std::optional<double> completion(int s, size_t g) {
    Group& group = groups_[s][g];
    if (group.completed >= 0) return group.completed;
    if (group.resolving) return std::nullopt;  // it waits on itself: a deadlock
    group.resolving = true;
    std::optional<double> done = start(s, g);
    for (size_t i = group.begin; i < group.end && done; ++i) done = max_of(done, transfer_done(s, i));
    group.resolving = false;
    if (done) group.completed = *done;
    return done;
  }

  const std::vector<std::vector<Action>>& schedules_;
  ActionCosts costs_;
  TransferRule rule_;
  std::vector<std::vector<int>> group_of_;  // per stage and action: its group, -1 for compute
  std::vector<std::vector<Group>> groups_;
  std::vector<std::unordered_map<uint64_t, size_t>> transfer_index_;  // per stage: transfer_key -> action
  std::vector<std::unordered_map<uint64_t, std::vector<size_t>>> receives_by_consumer_;  // consumer_key -> receives
};

}  // namespace

PipelineRun run_pipeline(const std::vector<std::vector<Action>>& schedules, const ActionCosts& costs,
                         TransferRule rule) {
  return ClockedRun(schedules, costs, rule).run();
}

double max_held(const std::vector<Action>& actions, const std::vector<double>& chunk_weights) {
  double now = 0, most = 0;
  for (const Action& a : actions) {
    const double w = chunk_weights.at(static_cast<size_t>(a.chunk));
    if (a.kind == Action::Kind::forward) most = std::max(most, now += w);
    if (a.kind == Action::Kind::backward || a.kind == Action::Kind::backward_weight) now -= w;
  }
  return most;
}

int64_t max_in_flight(const std::vector<Action>& actions) {
  int chunks = 1;
  for (const Action& a : actions) chunks = std::max(chunks, a.chunk + 1);
  return std::llround(max_held(actions, std::vector<double>(static_cast<size_t>(chunks), 1.0)));
}

std::string draw_timeline(const PipelineRun& run, double unit) {
  const auto width = static_cast<size_t>(std::ceil(run.makespan / unit));
  std::string out;
  for (size_t s = 0; s < run.timeline.size(); ++s) {
    std::string row(width, '.');
    for (const ComputeSpan& span : run.timeline[s]) {
      const bool forward = span.action.kind == Action::Kind::forward;
      const auto mb = static_cast<char>(span.action.micro_batch % (forward ? 10 : 26));
      const char mark = forward                                             ? static_cast<char>('0' + mb)
                        : span.action.kind == Action::Kind::backward_weight ? static_cast<char>('A' + mb)
                                                                            : static_cast<char>('a' + mb);
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

RecipeStep run_recipe_step(const Recipe& recipe, int64_t n, const ActionCosts& stage_costs, bool by_flops) {
  return run_recipe_step(recipe, n, stage_costs, by_flops ? relative_stage_flops(recipe) : std::vector<double>{});
}

RecipeStep run_recipe_step(const Recipe& recipe, int64_t n, const ActionCosts& stage_costs,
                           const std::vector<double>& relative) {
  const PipelineLayout layout = pipeline_layout(recipe);
  RecipeStep out;
  for (int r = 0; r < layout.ranks; ++r) out.schedules.push_back(stage_schedule(recipe, n, r));
  const double share = 1.0 / layout.chunks();
  ActionCosts costs{.forward = stage_costs.forward * share,
                    .backward_input = stage_costs.backward_input * share,
                    .backward_weight = stage_costs.backward_weight * share};
  if (!relative.empty()) {
    costs.scale.assign(static_cast<size_t>(layout.ranks), std::vector<double>(static_cast<size_t>(layout.chunks())));
    for (int r = 0; r < layout.ranks; ++r) {
      for (int c = 0; c < layout.chunks(); ++c) {
        costs.scale[static_cast<size_t>(r)][static_cast<size_t>(c)] =
            relative[static_cast<size_t>(layout.stage_of(r, c))];
      }
    }
  }
  const bool mpi = recipe.model.device == Device::cpu;
  out.run = run_pipeline(out.schedules, costs,
                         layout.chunks() > 1 && mpi ? TransferRule::independent : TransferRule::in_order);
  return out;
}

std::string pipeline_runs_to_completion(const std::vector<std::vector<Action>>& schedules, TransferRule rule) {
  return run_pipeline(schedules, {}, rule).stuck;
}

}  // namespace dsx
