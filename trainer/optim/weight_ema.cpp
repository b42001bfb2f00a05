#include "trainer/optim/weight_ema.h"

#include <stdexcept>

namespace dsx {
namespace {

template <class T>
void blend(Tensor& average, const Tensor& value, double decay) {
  T* a = average.data<T>();
  const T* v = value.data<T>();
  const auto keep = static_cast<T>(decay), take = static_cast<T>(1.0 - decay);
  const int64_t n = average.numel();
  for (int64_t i = 0; i < n; ++i) a[i] = keep * a[i] + take * v[i];
}

}  // namespace

WeightEma::WeightEma(ParameterStore& params, double decay, const std::function<bool(const Parameter&)>& keep)
    : decay_(decay) {
  if (!(decay >= 0 && decay < 1)) throw std::invalid_argument("WeightEma: decay must be in [0, 1)");
  for (Parameter& p : params) {
    if (!keep(p)) continue;
    Entry e{&p, kPrefix + p.spec.name, Tensor::empty(p.value.shape(), p.value.dtype(), Device::cpu), Tensor()};
    if (p.value.device() != Device::cpu) e.staging = Tensor::empty(p.value.shape(), p.value.dtype(), Device::cpu);
    entries_.push_back(std::move(e));
  }
  reset_to_current();
}

const Tensor& WeightEma::host_value(Entry& e) {
  if (!e.staging.defined()) return e.param->value;
  e.staging.copy_from(e.param->value);
  return e.staging;
}

void WeightEma::update() {
  for (Entry& e : entries_) {
    const Tensor& value = host_value(e);
    if (e.average.dtype() == DType::f64) {
      blend<double>(e.average, value, decay_);
    } else {
      blend<float>(e.average, value, decay_);
    }
  }
}

void WeightEma::reset_to_current() {
  for (Entry& e : entries_) e.average.copy_from(host_value(e));
}

std::vector<ckpt::TensorSlice> WeightEma::slices() {
  std::vector<ckpt::TensorSlice> out;
  for (Entry& e : entries_) out.push_back({e.name, e.param->spec.shape, e.param->offset, e.average});
  return out;
}

std::vector<ckpt::LoadRequest> WeightEma::requests() {
  std::vector<ckpt::LoadRequest> out;
  for (Entry& e : entries_) out.push_back({e.name, e.param->spec.shape, e.param->offset, e.average});
  return out;
}

const std::string& WeightEma::first_name() const {
  if (entries_.empty()) throw std::logic_error("WeightEma::first_name: no parameter is averaged here");
  return entries_.front().name;
}

}  // namespace dsx
