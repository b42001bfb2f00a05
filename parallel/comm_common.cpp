// Backend-independent parts of parallel/comm.h: handles, argument checks, the counts exchange,
// and the default all_to_all_blocks.
#include <algorithm>
#include <numeric>
#include <utility>

#include "parallel/comm.h"

namespace dsx {
namespace {

// True when the blocks, in order, are rows 0, 1, 2, ... without gaps: all_to_all_v's layout.
bool is_consecutive(const PeerRowBlocks& b) {
  int64_t next = 0;
  for (const RowBlock& block : b.blocks) {
    if (block.rows == 0) continue;
    if (block.offset != next) return false;
    next += block.rows;
  }
  return true;
}

int64_t sum(const std::vector<int64_t>& v) {
  return std::accumulate(v.begin(), v.end(), int64_t{0});
}

// An uninitialised tensor of `rows` rows shaped, typed and placed like t.
Tensor rows_like(const Tensor& t, int64_t rows) {
  Shape shape = t.shape();
  shape[0] = rows;
  return Tensor::empty(shape, t.dtype(), t.device());
}

// Copies the blocks' rows, in order, into consecutive rows of `packed`.
void gather_blocks(const Tensor& t, const PeerRowBlocks& b, const Tensor& packed) {
  int64_t at = 0;
  for (const RowBlock& block : b.blocks) {
    if (block.rows == 0) continue;
    packed.slice(at, at + block.rows).copy_from(t.slice(block.offset, block.offset + block.rows));
    at += block.rows;
  }
}

// The default all_to_all_blocks in flight: the all_to_all_v of the packed rows, then (once, on
// completion) the received rows scattered into their blocks.
class ScatterOnCompletion final : public PendingOp {
 public:
  ScatterOnCompletion(CommHandle transfer, Tensor packed_send, Tensor packed_recv, Tensor recv, PeerRowBlocks blocks)
      : transfer_(std::move(transfer)),
        packed_send_(std::move(packed_send)),
        packed_recv_(std::move(packed_recv)),
        recv_(std::move(recv)),
        blocks_(std::move(blocks)) {}

  bool test() override {
    if (!transfer_.test()) return false;
    scatter();
    return true;
  }
  void wait() override {
    transfer_.wait();
    scatter();
  }

 private:
  void scatter() {
    if (!packed_recv_.defined()) return;  // done already
    int64_t at = 0;
    for (const RowBlock& block : blocks_.blocks) {
      if (block.rows == 0) continue;
      recv_.slice(block.offset, block.offset + block.rows).copy_from(packed_recv_.slice(at, at + block.rows));
      at += block.rows;
    }
    packed_send_ = packed_recv_ = recv_ = Tensor();
  }

  CommHandle transfer_;
  Tensor packed_send_, packed_recv_, recv_;
  PeerRowBlocks blocks_;
};

}  // namespace

int64_t PeerRowBlocks::rows_of(int peer) const {
  int64_t rows = 0;
  for (const RowBlock& block : of(peer)) rows += block.rows;
  return rows;
}

PeerRowBlocks PeerRowBlocks::consecutive(std::span<const int64_t> counts) {
  PeerRowBlocks b;
  b.blocks.reserve(counts.size());
  int64_t at = 0;
  for (const int64_t n : counts) {
    b.add(at, n);
    b.end_peer();
    at += n;
  }
  return b;
}

CommHandle Communicator::all_to_all_blocks(const Tensor& send, const PeerRowBlocks& send_blocks, const Tensor& recv,
                                           const PeerRowBlocks& recv_blocks, BlockMatch /*match*/) {
  // The packed rows of a pair travel as one message, so how the sides cut them does not matter.
  check(send.defined() && recv.defined(), "comm all_to_all_blocks", "undefined tensor");
  check_same_layout(send, recv, "all_to_all_blocks");
  const std::vector<int64_t> send_counts = check_row_blocks(send_blocks, send, size(), "send");
  const std::vector<int64_t> recv_counts = check_row_blocks(recv_blocks, recv, size(), "recv");
  Tensor packed_send = send;
  if (!is_consecutive(send_blocks)) {
    packed_send = rows_like(send, sum(send_counts));
    gather_blocks(send, send_blocks, packed_send);
  }
  if (is_consecutive(recv_blocks)) return all_to_all_v(packed_send, send_counts, recv, recv_counts);
  Tensor packed_recv = rows_like(recv, sum(recv_counts));
  CommHandle transfer = all_to_all_v(packed_send, send_counts, packed_recv, recv_counts);
  return CommHandle(std::make_unique<ScatterOnCompletion>(std::move(transfer), std::move(packed_send),
                                                          std::move(packed_recv), recv, recv_blocks));
}

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

std::vector<int64_t> check_row_blocks(const PeerRowBlocks& b, const Tensor& t, int group_size, std::string_view side) {
  const std::string where = "comm all_to_all_blocks";
  const auto n_blocks = static_cast<int64_t>(b.blocks.size());
  check(b.peers() == group_size, where, [&] {
    return std::string(side) + " blocks have lists for " + std::to_string(b.peers()) + " peers in a group of " +
           std::to_string(group_size);
  });
  const std::vector<int64_t>& start = b.peer_start;
  check(start.front() == 0 && start.back() == n_blocks && std::is_sorted(start.begin(), start.end()), where, [&] {
    return std::string(side) + " blocks: peer_start must rise from 0 to the " + std::to_string(n_blocks) +
           " blocks (built with add() and end_peer())";
  });
  std::vector<int64_t> rows(static_cast<size_t>(group_size), 0);
  for (int p = 0; p < group_size; ++p) {
    for (const RowBlock& block : b.of(p)) {
      check(block.rows >= 0 && block.offset >= 0 && block.offset <= t.dim(0) - block.rows, where, [&] {
        return std::string(side) + " block of peer " + std::to_string(p) + " (rows " + std::to_string(block.offset) +
               " + " + std::to_string(block.rows) + ") is not a row range of " + t.describe();
      });
      rows[p] += block.rows;
    }
  }
  return rows;
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
