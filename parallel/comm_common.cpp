// Backend-independent parts of parallel/comm.h: handles, argument checks, the counts exchange.
#include <utility>

#include "parallel/comm.h"

namespace dsx {

CommHandle& CommHandle::operator=(CommHandle&& other) noexcept {
  if (this != &other) {
    if (op_) op_->wait();
    op_ = std::move(other.op_);
  }
  return *this;
}

CommHandle::~CommHandle() {
  if (op_) op_->wait();
}

void CommHandle::wait() {
  if (!op_) return;
  op_->wait();
  op_.reset();
}

bool CommHandle::test() {
  if (!op_) return true;
  if (!op_->test()) return false;
  op_.reset();
  return true;
}

void check_comm_tensor(const Tensor& t, std::string_view op, std::string_view name) {
  const std::string where = "comm " + std::string(op);
  check(t.defined(), where, [&] { return std::string(name) + " is undefined"; });
  check_cpu(t, where, name);
  const DType d = t.dtype();
  check(d == DType::f32 || d == DType::f64 || d == DType::bf16 || d == DType::i32 || d == DType::i64 ||
            d == DType::fp8_e4m3 || d == DType::fp8_e5m2,
        where, [&] {
          return std::string(name) + " has dtype " + std::string(dtype_name(d)) +
                 "; use f32, f64, bf16, fp8_e4m3, fp8_e5m2, i32 or i64";
        });
}

void check_reducible(const Tensor& t, std::string_view op) {
  const DType d = t.dtype();
  check(d != DType::fp8_e4m3 && d != DType::fp8_e5m2, "comm " + std::string(op), [&] {
    return "cannot sum " + std::string(dtype_name(d)) + " tensors (FP8 is moved, never reduced; widen it first)";
  });
}

void check_same_layout(const Tensor& a, const Tensor& b, std::string_view op) {
  check(a.dtype() == b.dtype(), "comm " + std::string(op),
        [&] { return "dtypes differ: " + a.describe() + " vs " + b.describe(); });
  check(a.ndim() >= 1 && b.ndim() == a.ndim() && row_elements(a) == row_elements(b), "comm " + std::string(op),
        [&] { return "row shapes differ: " + a.describe() + " vs " + b.describe(); });
}

int64_t row_elements(const Tensor& t) {
  int64_t n = 1;
  for (int i = 1; i < t.ndim(); ++i) n *= t.dim(i);
  return n;
}

std::vector<int64_t> exchange_counts(Communicator& comm, std::span<const int64_t> send_counts) {
  const int n = comm.size();
  check(static_cast<int>(send_counts.size()) == n, "comm exchange_counts",
        [&] { return "got " + std::to_string(send_counts.size()) + " counts for a group of " + std::to_string(n); });
  Tensor send = stage_for(comm, Tensor::from<int64_t>(send_counts, {n}));
  Tensor recv = Tensor::zeros({n}, DType::i64, comm.tensor_device());
  const std::vector<int64_t> one_each(n, 1);
  comm.all_to_all_v(send, one_each, recv, one_each).wait();
  const Tensor host = unstage(recv);
  const int64_t* r = host.data<int64_t>();
  return std::vector<int64_t>(r, r + n);
}

Tensor stage_for(const Communicator& comm, const Tensor& t) {
  return t.device() == comm.tensor_device() ? t : t.to(comm.tensor_device());
}

Tensor unstage(const Tensor& t) {
  // A device-to-host copy is ordered after the collective: NCCL's wait() made the current
  // stream wait for it, and the copy runs on that stream and waits for completion.
  return t.device() == Device::cpu ? t : t.to(Device::cpu);
}

}  // namespace dsx
