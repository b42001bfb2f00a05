#include "trainer/train/stage_runner.h"

#include <stdexcept>
#include <string>
#include <vector>

namespace dsx {
namespace {

int tag_of(Action::Kind k) {
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

}  // namespace

StageRunner::StageRunner(Model& model, Communicator* pp, CommTimer* timer) : model_(model), pp_(pp), timer_(timer) {
  const int stages = pp_ ? pp_->size() : 1, stage = pp_ ? pp_->rank() : 0;
  if (stages != model_.stage().count || stage != model_.stage().index) {
    throw std::logic_error("StageRunner: the pipeline group (rank " + std::to_string(stage) + " of " +
                           std::to_string(stages) + ") does not match the model's " +
                           describe(model_.stage(), model_.config().num_nextn_predict_layers));
  }
}

// A stage between the first and the last passes the MTP embeddings (and their gradients) on.
bool StageRunner::passes_mtp_on() const {
  const PipelineStage& s = model_.stage();
  return !s.is_first() && !s.is_last();
}

Losses StageRunner::forward(int64_t mb, const Batch& batch) {
  InFlight& f = in_flight_[mb];
  const bool pass_on = passes_mtp_on();
  StageForward out = model_.forward_stage(mb, batch, f.hidden_in, pass_on ? Tensor() : f.mtp_embedded_in);
  f.hidden_in = Tensor();  // the model keeps what its backward needs
  f.hidden_out = std::move(out.hidden);
  f.mtp_embedded_out = pass_on ? std::move(f.mtp_embedded_in) : std::move(out.mtp_embedded);
  f.mtp_embedded_in = Tensor();
  return out.losses;
}

void StageRunner::backward(int64_t mb, double loss_scale) {
  InFlight& f = in_flight_[mb];
  const bool pass_on = passes_mtp_on();
  StageBackward out = model_.backward_stage(mb, loss_scale, f.d_hidden_out, pass_on ? Tensor() : f.d_mtp_embedded_in);
  f.d_hidden_out = Tensor();
  f.d_hidden_in = std::move(out.d_hidden);
  f.d_mtp_embedded_out = pass_on ? std::move(f.d_mtp_embedded_in) : std::move(out.d_mtp_embedded);
  f.d_mtp_embedded_in = Tensor();
}

Tensor& StageRunner::to_send(const Action& a) {
  InFlight& f = in_flight_[a.micro_batch];
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

Tensor& StageRunner::to_receive(const Action& a) {
  InFlight& f = in_flight_[a.micro_batch];
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

void StageRunner::transfer(std::span<const Action> group, std::span<const Batch> batches) {
  if (!pp_) throw std::logic_error("StageRunner: transfer actions without a pipeline group");
  std::vector<CommHandle> handles;
  std::vector<Tensor*> sent;
  for (const Action& a : group) {
    if (a.micro_batch < 0 || a.micro_batch >= static_cast<int64_t>(batches.size())) {
      throw std::logic_error("StageRunner: " + to_string(a) + " names no micro-batch of this step");
    }
    if (a.is_send()) {
      Tensor& t = to_send(a);
      if (!t.defined()) throw std::logic_error("StageRunner: " + to_string(a) + ": nothing computed to send");
      handles.push_back(pp_->send(t, a.peer, tag_of(a.kind)));
      sent.push_back(&t);
    } else {
      const int64_t tokens = batches[static_cast<size_t>(a.micro_batch)].inputs.numel();
      const bool mtp = a.kind == Action::Kind::recv_mtp_embedding || a.kind == Action::Kind::recv_mtp_grad;
      Tensor& t = to_receive(a);
      t = model_.empty_stage_tensor(mtp ? model_.config().num_nextn_predict_layers * tokens : tokens);
      handles.push_back(pp_->recv(t, a.peer, tag_of(a.kind)));
    }
  }
  for (CommHandle& h : handles) timed_wait(h, timer_);
  for (Tensor* t : sent) *t = Tensor();
}

void StageRunner::finish_step() {
  for (const auto& [mb, f] : in_flight_) {
    for (const Tensor* t : {&f.hidden_in, &f.mtp_embedded_in, &f.d_hidden_out, &f.d_mtp_embedded_in, &f.hidden_out,
                            &f.mtp_embedded_out, &f.d_hidden_in, &f.d_mtp_embedded_out}) {
      if (t->defined()) {
        throw std::logic_error("StageRunner: micro-batch " + std::to_string(mb) +
                               " still has a tensor in flight at the end of the step");
      }
    }
  }
  in_flight_.clear();
}

}  // namespace dsx
