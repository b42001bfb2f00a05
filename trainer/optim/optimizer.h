// AdamW over a ParameterStore: fp32 (or f64) master weights are the store's values, moments
// in the recipe's precision (fp32 or bf16), decoupled weight decay only where both the
// parameter's spec and the recipe's no_decay patterns allow it, global-norm clipping.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/ops/adamw.h"
#include "kernels/tensor.h"
#include "trainer/model/parameters.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

class AdamW {
 public:
  AdamW(ParameterStore& params, const OptimSection& config);

  // Clips the gradients to optim.grad_clip (global norm over every trainable parameter), then
  // updates every trainable parameter with learning rate lr. Returns the norm before clipping.
  double step(double lr);
  int64_t steps_taken() const { return step_; }

  // Optimizer state for checkpoints: names "optim.exp_avg.<param>" / "optim.exp_avg_sq.<param>".
  struct StateTensor {
    std::string name;
    Tensor* tensor;
  };
  std::vector<StateTensor> state_tensors();
  void set_steps_taken(int64_t step) { step_ = step; }
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
