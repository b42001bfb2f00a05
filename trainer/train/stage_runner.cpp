#include "trainer/train/stage_runner.h"

#include <algorithm>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dsx {
namespace {

int kind_tag(Action::Kind k) {
  using K = Action::Kind;
  switch (k) {
    case K::send_activation:
    case K::recv_activation:
      return 0;
    case K::send_grad:
    case K::recv_grad:
      return 1;
    case K::send_mtp_embedding:
    case K::recv_mtp_embedding:
      return 2;
    case K::send_mtp_grad:
    case K::recv_mtp_grad:
      return 3;
    default:
      throw std::logic_error("StageRunner: " + to_string(Action{k}) + " is not a transfer");
  }
}

// Both sides of a hop name it by the chunk of its lower stage (the sender's for activations, the
// receiver's for gradients): the chunk itself, or at an interleaved turn the smaller of the two.
int tag_of(const Action& a) {
  return kind_tag(a.kind) + 4 * std::min(a.chunk, a.other_chunk());
}

}  // namespace

StageRunner::StageRunner(Model& model, Communicator* pp, CommTimer* timer)
    : model_(model), pp_(pp), timer_(timer), layout_(model.pipeline_layout()), rank_(pp ? pp->rank() : 0) {
  for (int c = 0; c < static_cast<int>(model_.chunks().size()); ++c) {
    const PipelineStage& st = model_.chunks()[static_cast<size_t>(c)];
    if (layout_.ranks != (pp ? pp->size() : 1) || layout_.chunks() != static_cast<int>(model_.chunks().size()) ||
        st.count != layout_.stages() || st.index != layout_.stage_of(rank_, c)) {
      throw std::logic_error("StageRunner: the pipeline group (rank " + std::to_string(rank_) + " of " +
                             std::to_string(layout_.ranks) + ") does not match the model's " +
                             describe(st, model_.config().num_nextn_predict_layers));
    }
  }
}

// In a sequential layout, a stage between the first and the last passes the MTP embeddings (and
// their gradients) on; a V-shaped one keeps them on rank 0, inside the model.
bool StageRunner::passes_mtp_on(int chunk) const {
  const PipelineStage& s = model_.chunks().at(static_cast<size_t>(chunk));
  return !layout_.v_shape && !s.is_first() && !s.is_last();
}

std::optional<int> StageRunner::local_chunk(int stage) const {
  if (stage < 0 || stage >= layout_.stages() || layout_.rank_of(stage) != rank_) return std::nullopt;
  return layout_.chunk_of(stage);
}

Tensor StageRunner::take(Received& r) {
  if (!r.handle.done()) timed_wait(r.handle, timer_);
  return std::exchange(r.tensor, Tensor());
}

Losses StageRunner::forward(int64_t mb, const Batch& batch, int chunk) {
  InFlight& f = in_flight_[{chunk, mb}];
  const Tensor hidden_in = take(f.hidden_in), mtp_in = take(f.mtp_embedded_in);
  const bool pass_on = passes_mtp_on(chunk);
  StageForward out = model_.forward_stage(mb, batch, hidden_in, pass_on ? Tensor() : mtp_in, chunk);
  f.mtp_embedded_out = pass_on ? mtp_in : std::move(out.mtp_embedded);
  // the bottom of a V: the next stage is this rank's other chunk
  if (const auto next = local_chunk(layout_.stage_of(rank_, chunk) + 1)) {
    in_flight_[{*next, mb}].hidden_in.tensor = std::move(out.hidden);
  } else {
    f.hidden_out = std::move(out.hidden);
  }
  return out.losses;
}

void StageRunner::backward(int64_t mb, double loss_scale, int chunk) {
  backward_pass(mb, loss_scale, /*with_weights=*/true, chunk);
}

void StageRunner::backward_input(int64_t mb, double loss_scale, int chunk) {
  backward_pass(mb, loss_scale, /*with_weights=*/false, chunk);
}

void StageRunner::backward_pass(int64_t mb, double loss_scale, bool with_weights, int chunk) {
  InFlight& f = in_flight_[{chunk, mb}];
  const Tensor d_out = take(f.d_hidden_out), d_mtp = take(f.d_mtp_embedded_in);
  const bool pass_on = passes_mtp_on(chunk);
  const Tensor d_mtp_for_model = pass_on ? Tensor() : d_mtp;
  StageBackward out = with_weights ? model_.backward_stage(mb, loss_scale, d_out, d_mtp_for_model, chunk)
                                   : model_.backward_stage_input(mb, loss_scale, d_out, d_mtp_for_model, chunk);
  f.d_mtp_embedded_out = pass_on ? d_mtp : std::move(out.d_mtp_embedded);
  if (const auto previous = local_chunk(layout_.stage_of(rank_, chunk) - 1)) {
    in_flight_[{*previous, mb}].d_hidden_out.tensor = std::move(out.d_hidden);
  } else {
    f.d_hidden_in = std::move(out.d_hidden);
  }
}

void StageRunner::backward_weight(int64_t mb, int chunk) {
  model_.backward_stage_weight(mb, chunk);
}

Tensor& StageRunner::to_send(const Action& a) {
  InFlight& f = in_flight_[{a.chunk, a.micro_batch}];
  switch (a.kind) {
    case Action::Kind::send_activation:
      return f.hidden_out;
    case Action::Kind::send_grad:
      return f.d_hidden_in;
    case Action::Kind::send_mtp_embedding:
      return f.mtp_embedded_out;
    case Action::Kind::send_mtp_grad:
      return f.d_mtp_embedded_out;
    default:
      throw std::logic_error("StageRunner: " + to_string(a) + " is not a send");
  }
}

StageRunner::Received& StageRunner::to_receive(const Action& a) {
  InFlight& f = in_flight_[{a.chunk, a.micro_batch}];
  switch (a.kind) {
    case Action::Kind::recv_activation:
      return f.hidden_in;
    case Action::Kind::recv_grad:
      return f.d_hidden_out;
    case Action::Kind::recv_mtp_embedding:
      return f.mtp_embedded_in;
    case Action::Kind::recv_mtp_grad:
      return f.d_mtp_embedded_in;
    default:
      throw std::logic_error("StageRunner: " + to_string(a) + " is not a receive");
  }
}

void StageRunner::release_finished_sends() {
  std::erase_if(sending_, [](Sending& s) { return s.handle.test(); });
}

void StageRunner::transfer(std::span<const Action> group, std::span<const Batch> batches) {
  if (!pp_) throw std::logic_error("StageRunner: transfer actions without a pipeline group");
  release_finished_sends();
  size_t sends = 0;
  for (const Action& a : group) {
    if (a.micro_batch < 0 || a.micro_batch >= static_cast<int64_t>(batches.size())) {
      throw std::logic_error("StageRunner: " + to_string(a) + " names no micro-batch of this step");
    }
    if (a.is_send()) {
      Tensor& t = to_send(a);
      if (!t.defined()) throw std::logic_error("StageRunner: " + to_string(a) + ": nothing computed to send");
      CommHandle h = pp_->send(t, a.peer, tag_of(a));
      sending_.push_back({std::exchange(t, Tensor()), std::move(h)});
      ++sends;
    } else {
      const int64_t tokens = model_.stage_rows(batches[static_cast<size_t>(a.micro_batch)].inputs.numel());
      const bool mtp = a.kind == Action::Kind::recv_mtp_embedding || a.kind == Action::Kind::recv_mtp_grad;
      Received& r = to_receive(a);
      if (r.tensor.defined()) throw std::logic_error("StageRunner: " + to_string(a) + " is already received");
      r.tensor = model_.empty_stage_tensor(mtp ? model_.config().num_nextn_predict_layers * tokens : tokens);
      r.handle = pp_->recv(r.tensor, a.peer, tag_of(a));
    }
  }
  // Start the group now (NCCL launches its queued group when a handle is first tested; MPI
  // moves transfers on inside its calls), so the peer is not kept waiting for our next wait.
  for (size_t i = sending_.size() - sends; i < sending_.size(); ++i) sending_[i].handle.test();
  for (const Action& a : group) {
    if (!a.is_send()) to_receive(a).handle.test();
  }
}

void StageRunner::finish_step() {
  for (Sending& s : sending_) timed_wait(s.handle, timer_);
  sending_.clear();
  for (const auto& [key, f] : in_flight_) {
    for (const Tensor* t :
         {&f.hidden_in.tensor, &f.mtp_embedded_in.tensor, &f.d_hidden_out.tensor, &f.d_mtp_embedded_in.tensor,
          &f.hidden_out, &f.mtp_embedded_out, &f.d_hidden_in, &f.d_mtp_embedded_out}) {
      if (t->defined()) {
        throw std::logic_error("StageRunner: micro-batch " + std::to_string(key.second) +
                               " still has a tensor in flight at the end of the step");
      }
    }
  }
  in_flight_.clear();
}

}  // namespace dsx
