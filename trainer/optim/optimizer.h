// The optimizer interface the training loop drives, and AdamW over a ParameterStore in one
// process: fp32 (or f64) master weights are the store's values, moments in the recipe's
// precision (fp32 or bf16), decoupled weight decay only where both the parameter's spec and the
// recipe's no_decay patterns allow it, global-norm clipping. The data-parallel version (gradient
// buckets, ZeRO-1) is trainer/optim/distributed_optimizer.h.
//
// Checkpointed state: the moments, named "optim.exp_avg.<param>" / "optim.exp_avg_sq.<param>",
// with their parameter's global shape, written as boxes (moment_boxes below): a ZeRO range of a
// flattened bucket, within a tensor-parallel shard or not, is at most three boxes, so the state of
// any layout loads into any other.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ops/adamw.h"
#include "kernels/tensor.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/parameters.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

// The boxes of the global tensor p.spec.shape that hold elements [first, first + flat.numel()) of
// p's own box (p.value flattened row-major), with flat's values: one box for a 1-D parameter or a
// range of whole rows, up to three (a partial row, whole rows, a partial row) otherwise.
std::vector<ckpt::TensorSlice> moment_boxes(const std::string& name, const Parameter& p, int64_t first,
                                            const Tensor& flat);

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // The gradient of p is final for this step (reported during the last micro-batch's backward).
  virtual void grad_ready(Parameter& p) { (void)p; }
  // Clip, update; returns the global gradient norm before clipping.
  virtual double step(double lr) = 0;
  virtual int64_t steps_taken() const = 0;
  virtual void set_steps_taken(int64_t step) = 0;
  virtual std::vector<ckpt::TensorSlice> state_slices() = 0;    // what this rank writes
  virtual std::vector<ckpt::LoadRequest> state_requests() = 0;  // what this rank reads back
  // Seconds blocked on gradient/parameter communication since the last call.
  virtual double take_exposed_comm_s() { return 0; }
};

class AdamW : public Optimizer {
 public:
  AdamW(ParameterStore& params, const OptimSection& config);

  // Clips the gradients to optim.grad_clip (global norm over every trainable parameter), then
  // updates every trainable parameter with learning rate lr. Returns the norm before clipping.
  double step(double lr) override;
  int64_t steps_taken() const override { return step_; }
  std::vector<ckpt::TensorSlice> state_slices() override;
  std::vector<ckpt::LoadRequest> state_requests() override;

  // Optimizer state for checkpoints: names "optim.exp_avg.<param>" / "optim.exp_avg_sq.<param>".
  struct StateTensor {
    std::string name;
    const Parameter* param;
    Tensor* tensor;
  };
  std::vector<StateTensor> state_tensors();
  void set_steps_taken(int64_t step) override { step_ = step; }
  bool decays(const Parameter& p) const;

 private:
  struct Slot {
    Parameter* param;
    Tensor exp_avg;
    Tensor exp_avg_sq;
    bool decay;
  };
  OptimSection config_;
  std::vector<Slot> slots_;
  int64_t step_ = 0;
};

}  // namespace dsx
