#include "trainer/optim/optimizer.h"

#include <algorithm>
#include <stdexcept>

#include "kernels/ops/grad_norm.h"

namespace dsx {

AdamW::AdamW(ParameterStore& params, const OptimSection& config) : config_(config) {
  const DType moment_dtype = config.moments == MomentPrecision::bf16 ? DType::bf16 : params.dtype();
  for (Parameter& p : params) {
    if (!p.spec.trainable) continue;
    const Device device = p.value.device();  // moments live beside their parameter
    slots_.push_back({&p, Tensor::zeros(p.value.shape(), moment_dtype, device),
                      Tensor::zeros(p.value.shape(), moment_dtype, device), decays(p)});
  }
}

bool AdamW::decays(const Parameter& p) const {
  return p.spec.weight_decay && config_.decays(p.spec.name);
}

double AdamW::step(double lr) {
  std::vector<Tensor> grads;
  grads.reserve(slots_.size());
  for (const Slot& s : slots_) grads.push_back(s.param->grad);  // views sharing storage
  const double norm = ops::clip_grad_norm(grads, config_.grad_clip);
  ++step_;
  for (Slot& s : slots_) {
    const ops::AdamWConfig c{.lr = lr,
                             .beta1 = config_.beta1,
                             .beta2 = config_.beta2,
                             .eps = config_.eps,
                             .weight_decay = s.decay ? config_.weight_decay : 0.0};
    ops::adamw_step(c, step_, s.param->value, s.param->grad, s.exp_avg, s.exp_avg_sq);
  }
  return norm;
}

std::vector<AdamW::StateTensor> AdamW::state_tensors() {
  std::vector<StateTensor> out;
  for (Slot& s : slots_) {
    out.push_back({"optim.exp_avg." + s.param->spec.name, s.param, &s.exp_avg});
    out.push_back({"optim.exp_avg_sq." + s.param->spec.name, s.param, &s.exp_avg_sq});
  }
  return out;
}

std::vector<ckpt::TensorSlice> moment_boxes(const std::string& name, const Parameter& p, int64_t first,
                                            const Tensor& flat) {
  const Shape& local = p.value.shape();
  const int64_t length = flat.numel();
  std::vector<ckpt::TensorSlice> out;
  if (length == 0) return out;
  if (local.size() == 1) {
    out.push_back({name, p.spec.shape, {p.offset[0] + first}, flat});
    return out;
  }
  if (local.size() != 2) {
    throw std::logic_error("moment_boxes: " + p.spec.name + " has " + std::to_string(local.size()) +
                           " dimensions; parameters have 1 or 2");
  }
  const int64_t cols = local[1];
  int64_t at = first;  // local flat index of the next element to place
  const int64_t end = first + length;
  auto add = [&](int64_t rows, int64_t width) {
    const int64_t row = at / cols, col = at % cols;
    out.push_back({name,
                   p.spec.shape,
                   {p.offset[0] + row, p.offset[1] + col},
                   flat.slice(at - first, at - first + rows * width).view({rows, width})});
    at += rows * width;
  };
  if (at % cols != 0) add(1, std::min(cols - at % cols, end - at));  // the end of a first, partial row
  if ((end - at) / cols > 0) add((end - at) / cols, cols);           // whole rows
  if (at < end) add(1, end - at);                                    // the start of a last, partial row
  return out;
}

std::vector<ckpt::TensorSlice> AdamW::state_slices() {
  std::vector<ckpt::TensorSlice> out;
  for (const StateTensor& s : state_tensors()) {
    for (ckpt::TensorSlice& box : moment_boxes(s.name, *s.param, 0, s.tensor->view({s.tensor->numel()})))
      out.push_back(std::move(box));
  }
  return out;
}

std::vector<ckpt::LoadRequest> AdamW::state_requests() {
  std::vector<ckpt::LoadRequest> out;
  for (ckpt::TensorSlice& s : state_slices()) {  // the whole flattened tensors, read back in place
    out.push_back({std::move(s.name), std::move(s.global_shape), std::move(s.offset), std::move(s.data)});
  }
  return out;
}

}  // namespace dsx
