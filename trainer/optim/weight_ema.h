// An exponential moving average of the model's weights, kept in host memory (DeepSeek-V3 §3.2.3:
// "EMA in CPU", an early estimate of how the model will do after the learning rate decays,
// without a second training run; updated after every optimizer step).
//
//   ema ← decay · ema + (1 − decay) · weights        (starting from the weights at step 0)
//
// Each rank averages only the parameters it writes to checkpoints (Trainer::writes_parameter), so
// the ranks of any layout together hold exactly one copy of the model, and checkpoints store it
// as tensors named "ema." + the parameter's name, in its boxes like the weights: a checkpoint
// written with one layout resumes its EMA with another, and `dsx generate --ema` / `dsx convert
// to-hf --ema` read the averaged model. The router's selection bias is averaged too (part of
// the state a model is loaded with).
#pragma once
#include <functional>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/parameters.h"

namespace dsx {

class WeightEma {
 public:
  static constexpr const char* kPrefix = "ema.";

  // Averages the parameters of `params` that `keep` selects, starting from their current values.
  WeightEma(ParameterStore& params, double decay, const std::function<bool(const Parameter&)>& keep);

  // One step of the average, from the parameters' current values (copied to the host first when
  // they live on a device).
  void update();
  // Restarts the average from the current values (a run that turns the EMA on mid-way).
  void reset_to_current();

  double decay() const { return decay_; }
  std::vector<ckpt::TensorSlice> slices();    // for a checkpoint
  std::vector<ckpt::LoadRequest> requests();  // to resume from one
  bool empty() const { return entries_.empty(); }
  const std::string& first_name() const;  // a tensor the checkpoint must hold to resume it

 private:
  struct Entry {
    Parameter* param;
    std::string name;  // kPrefix + the parameter's name
    Tensor average;    // host, the parameter's dtype and box
    Tensor staging;    // host copy of a device parameter's value (empty for host parameters)
  };
  const Tensor& host_value(Entry& e);

  double decay_;
  std::vector<Entry> entries_;
};

}  // namespace dsx
