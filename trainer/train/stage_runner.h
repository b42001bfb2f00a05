// Runs one pipeline stage's actions (trainer/train/schedule.h) on the model: forwards and
// backwards of micro-batches with the tensors received from the neighbouring stages, and the
// transfer actions that move those tensors. Without pipeline parallelism it is the plain
// forward/backward of the whole model (there are no transfers).
//
// Per micro-batch in flight it holds what was received and not yet used, and what was computed
// and not yet sent. A run of consecutive transfer actions is one group: all are started, then
// all waited for (NCCL queues them into one ncclGroupStart/End; MPI runs them as non-blocking
// sends and receives), the rule pipeline_runs_to_completion checks schedules against.
//
// Messages between two stages keep their order per tag: tag 0 activations, 1 their gradients,
// 2 MTP embeddings, 3 their gradients; both sides walk micro-batches in increasing order.
#pragma once
#include <cstdint>
#include <map>
#include <span>

#include "parallel/comm.h"
#include "trainer/model/model.h"
#include "trainer/train/schedule.h"

namespace dsx {

class StageRunner {
 public:
  // pp: the pipeline group (a rank's index in it is its stage), null without pipeline
  // parallelism; timer: where blocked time is counted (may be null).
  StageRunner(Model& model, Communicator* pp, CommTimer* timer);

  // forward_stage / backward_stage of micro-batch `mb` with what was received for it.
  Losses forward(int64_t mb, const Batch& batch);
  void backward(int64_t mb, double loss_scale);
  // Runs a group of transfer actions; batches: the step's micro-batches (for the tensors' rows).
  void transfer(std::span<const Action> group, std::span<const Batch> batches);
  // Ends the step: throws std::logic_error when a received tensor was not used or a computed one
  // not sent (a schedule that does not fit the model), then forgets the step's micro-batches.
  void finish_step();

 private:
  struct InFlight {
    Tensor hidden_in, mtp_embedded_in;       // received for the forward
    Tensor d_hidden_out, d_mtp_embedded_in;  // received for the backward
    Tensor hidden_out, mtp_embedded_out;     // computed by the forward, to send
    Tensor d_hidden_in, d_mtp_embedded_out;  // computed by the backward, to send
  };
  bool passes_mtp_on() const;
  Tensor& to_send(const Action& a);
  Tensor& to_receive(const Action& a);

  Model& model_;
  Communicator* pp_;
  CommTimer* timer_;
  std::map<int64_t, InFlight> in_flight_;
};

}  // namespace dsx
