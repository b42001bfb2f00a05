// Runs one pipeline stage's actions (trainer/train/schedule.h) on the model: forwards, backwards
// (fused, or input and weight passes) of micro-batches with the tensors received from the
// neighbouring stages, and the transfer actions that move those tensors. Without pipeline
// parallelism it is the plain forward/backward of the whole model (there are no transfers).
//
// The transfer rule of schedule.h: a run of consecutive transfer actions is posted as one group
// and not waited for (NCCL queues it into one ncclGroupStart/End, started at once; MPI starts
// non-blocking sends and receives). A forward waits for its activations' receives, a backward
// for its gradients'; finished sends are released as later groups are posted, and all before
// the optimizer step.
//
// Per micro-batch and chunk in flight it holds what was received and not yet used, and what was
// computed and not yet sent. Messages between two stages keep their order per tag: tag 0
// activations, 1 their gradients, 2 MTP embeddings, 3 their gradients, plus 4c for a hop whose
// lower stage is the sender's (activations) or receiver's (gradients) chunk c (chunk 1 of a
// V-shaped layout; an interleaved layout's chunks, whose turn from the last rank's chunk c to the
// first rank's chunk c + 1 counts as c); both sides walk a chunk's micro-batches in increasing
// order. In a V-shaped layout, a hop between two chunks of this rank (the bottom of the V) is a
// hand-over, not a message.
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <span>
#include <vector>

#include "parallel/comm.h"
#include "trainer/model/model.h"
#include "trainer/train/schedule.h"

namespace dsx {

class StageRunner {
 public:
  // pp: the pipeline group (a rank's index in it is its stage), null without pipeline
  // parallelism; timer: where blocked time is counted (may be null).
  StageRunner(Model& model, Communicator* pp, CommTimer* timer);

  // The model's forward_stage / backward_stage / backward_stage_input / backward_stage_weight
  // of micro-batch `mb` on model chunk `chunk`, after waiting for what it receives.
  Losses forward(int64_t mb, const Batch& batch, int chunk = 0);
  void backward(int64_t mb, double loss_scale, int chunk = 0);
  void backward_input(int64_t mb, double loss_scale, int chunk = 0);
  void backward_weight(int64_t mb, int chunk = 0);
  // Posts a group of transfer actions; batches: the step's micro-batches (for the tensors' rows).
  void transfer(std::span<const Action> group, std::span<const Batch> batches);
  // Ends the step: waits for every send, then throws std::logic_error when a received tensor was
  // not used or a computed one not sent (a schedule that does not fit the model), then forgets
  // the step's micro-batches.
  void finish_step();

 private:
  struct Received {
    Tensor tensor;
    CommHandle handle;  // pending until waited for
  };
  struct InFlight {
    Received hidden_in, mtp_embedded_in;       // for the forward
    Received d_hidden_out, d_mtp_embedded_in;  // for the backward
    Tensor hidden_out, mtp_embedded_out;       // computed by the forward, to send
    Tensor d_hidden_in, d_mtp_embedded_out;    // computed by the backward, to send
  };
  struct Sending {
    Tensor tensor;  // kept alive until the send is done
    CommHandle handle;
  };
  bool passes_mtp_on(int chunk) const;
  // The chunk of this rank that runs stage `stage`, if it is one of ours.
  std::optional<int> local_chunk(int stage) const;
  Tensor& to_send(const Action& a);
  Received& to_receive(const Action& a);
  Tensor take(Received& r);  // waits for the receive (if posted) and hands its tensor over
  void release_finished_sends();
  void backward_pass(int64_t mb, double loss_scale, bool with_weights, int chunk);

  Model& model_;
  Communicator* pp_;
  CommTimer* timer_;
  PipelineLayout layout_;
  int rank_ = 0;
  std::map<std::pair<int, int64_t>, InFlight> in_flight_;  // by chunk and micro-batch
  std::vector<Sending> sending_;
};

}  // namespace dsx
