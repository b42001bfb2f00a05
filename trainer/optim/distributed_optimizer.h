// Data-parallel AdamW: bucketed gradient reduction overlapped with the backward, optional ZeRO-1
// (optimizer state sharded over the data-parallel group), global-norm clipping over every rank.
//
// The math is the single-process AdamW's (trainer/optim/optimizer.h) applied to the SUM of every
// rank's gradient: same clipping (scale = clip / (norm + 1e-6) when norm > clip), same per-parameter
// weight-decay decision, same ops::adamw_step, moments in optim.moments precision.
//
// Buckets. Trainable parameters are packed, in reverse registration order (the order the backward
// finishes them), into flat buckets of about bucket_bytes of gradient; a parameter is never split
// (one larger than a bucket gets a bucket of its own). Dense parameters reduce over `dp`, routed-
// expert ones (ShardAxis::expert) over `edp`, so the two kinds never share a bucket. Each bucket is
// padded with zeros to a multiple of its group's size and split into equal shards, shard r owned
// by group rank r.
//
// Storage. The constructor moves every trainable parameter's value and gradient into its bucket's
// flat buffers: p.value and p.grad become views of them (contents kept). Modules reach parameters
// through Parameter& and read p.value / p.grad when they run, so nothing changes for them; but
// p.value and p.grad must not be reassigned afterwards (write into them, e.g. when loading).
//
// One step:
//   backward (last micro-batch): grad_ready(p) as each gradient becomes final; progress() between
//     modules. A bucket's reduction (all-reduce, or reduce-scatter into its shard with zero1)
//     starts once all its parameters are final AND every earlier bucket of its group has started,
//     so every rank starts the collectives of a group in the same order whatever order the model
//     reports gradients in.
//   step(lr): starts what has not started, waits, computes the global norm, clips, updates
//     (zero1: only this rank's shard, then an in-place all-gather of the updated values; without
//     zero1 every rank updates every element, identically), and resets for the next step.
//
// Communicators: the trainer must not issue its own collectives on the dp/edp communicators
// between the first grad_ready() and the end of step() (collectives on one communicator must be
// started in the same order on every rank). Passing the same communicator as dp and edp is fine:
// dense and expert buckets then form one group.
//
// After step(), p.grad holds the clipped, reduced gradient without zero1; with zero1 it still
// holds this rank's own unreduced gradient (the reduced shard lives in the optimizer). Either way
// the trainer zeroes it before the next step.
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "kernels/tensor.h"
#include "parallel/comm.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/parameters.h"
#include "trainer/optim/optimizer.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

struct DistributedOptimizerOptions {
  bool zero1 = true;               // recipe parallel.zero == 1
  int64_t bucket_bytes = 8 << 20;  // gradient bucket size (bytes of gradient)
  // This rank counts the parameters replicated over tensor parallelism (ShardAxis::none) in the
  // global gradient norm and writes their optimizer state: true on TP rank 0 (and without TP),
  // false on the other TP ranks, whose copies are the same.
  bool owns_replicated = true;
};

class DistributedAdamW : public Optimizer {
 public:
  // dp: group over which dense (non-expert) gradients are summed and ZeRO-sharded; edp: the same
  // for routed-expert parameters; world: for the global norm. The store holds only this rank's
  // parameters (with expert parallelism only its local experts). Collective over dp and edp: the
  // ranks of each group compare their bucket layouts and throw std::logic_error if they differ.
  DistributedAdamW(ParameterStore& params, const OptimSection& config, Communicator& dp, Communicator& edp,
                   Communicator& world, DistributedOptimizerOptions options = {});
  ~DistributedAdamW() override;
  DistributedAdamW(const DistributedAdamW&) = delete;
  DistributedAdamW& operator=(const DistributedAdamW&) = delete;

  // p's gradient is final for this step (call during the last micro-batch's backward). Non-
  // trainable parameters are ignored; a parameter of another store, or one reported twice in a
  // step, throws std::logic_error.
  void grad_ready(Parameter& p) override;
  // Drives pending reductions (OpenMPI progresses non-blocking collectives only inside MPI calls).
  void progress();
  // Reduce, clip, update; returns the global gradient norm before clipping. Gradients are SUMS
  // over the ranks of their group (the trainer pre-scales the loss).
  double step(double lr) override;

  int64_t steps_taken() const override { return step_; }
  void set_steps_taken(int64_t step) override { step_ = step; }
  bool decays(const Parameter& p) const;

  // Checkpoint state: "optim.exp_avg.<param>" and "optim.exp_avg_sq.<param>" as boxes of the
  // parameters' global shapes (moment_boxes, optimizer.h), covering this rank's own partition of
  // every bucket, so each element is written by exactly one rank of its group.
  std::vector<ckpt::TensorSlice> state_slices() override;
  // Requests filling every moment element this rank keeps (zero1: its shard; otherwise all).
  std::vector<ckpt::LoadRequest> state_requests() override;

  // Seconds spent blocked waiting on gradient/parameter communication since the last call.
  double take_exposed_comm_s() override;

  int64_t bucket_count() const;

 private:
  struct Slot {
    Parameter* param = nullptr;
    size_t bucket = 0;
    int64_t offset = 0;  // first element in the bucket
    bool decay = false;
    bool ready = false;  // reported final in this step
  };
  // The part of one parameter inside a range of a bucket.
  struct Piece {
    size_t slot = 0;
    int64_t param_begin = 0;   // first element within the parameter
    int64_t bucket_begin = 0;  // first element within the bucket
    int64_t length = 0;
  };
  struct Bucket;
  struct Group;

  void build_buckets(ParameterStore& params, Communicator& dp, Communicator& edp);
  void allocate(Bucket& b);
  void check_layouts_agree();
  void start_ready_buckets(Group& g);
  void start_reduction(Bucket& b);
  void wait(CommHandle& h);
  double own_sum_of_squares(const Bucket& b) const;
  void update(Bucket& b, double lr);
  std::vector<Piece> pieces_in(const Bucket& b, int64_t begin, int64_t end) const;
  // own_only: this rank's ownership partition (what it writes); else every element it keeps.
  std::vector<ckpt::TensorSlice> moment_boxes(bool own_only);

  OptimSection config_;
  DistributedOptimizerOptions options_;
  Communicator& world_;
  DType dtype_;
  DType moment_dtype_;
  std::vector<Slot> slots_;
  std::vector<Bucket> buckets_;
  std::vector<Group> groups_;
  std::unordered_map<const Parameter*, size_t> slot_of_;
  int64_t step_ = 0;
  double exposed_comm_s_ = 0;
};

}  // namespace dsx
