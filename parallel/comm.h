// Communicators: collective and point-to-point operations over one parallel group.
//
// A Communicator is one group of ranks (the world, or one of the mesh's TP/DP/EP/EDP/PP/model
// groups) with a name used in messages ("dp", "ep", ...). Every operation is non-blocking: it
// starts the transfer and returns a CommHandle; the tensors it was given must not be touched
// until wait() returns or test() has returned true (the handle keeps their storage alive).
//
// Tensors are contiguous CPU tensors of dtype f32, f64, bf16, i32 or i64, and FP8 (e4m3, e5m2)
// for the operations that only move data. Reductions are sums.
// bf16 sums are computed in f32: the tensor is widened into a f32 buffer, reduced, and rounded
// back once at completion — one rounding instead of one per reduction step, and the result
// does not depend on the reduction order MPI picks (it is the f32 sum, rounded).
//
// Timeouts: every wait() gives up after the communicator's timeout (recipe
// `parallel.comm_timeout_s`), prints one message naming the operation, the group, this rank
// and the ranks that never arrived, and aborts the whole job (MPI_Abort on the world).
#pragma once
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace dsx {

// The backend's state of one started operation.
class PendingOp {
 public:
  virtual ~PendingOp() = default;
  virtual bool test() = 0;  // true once complete (and its results are in place)
  virtual void wait() = 0;  // blocks until complete; aborts the job on timeout
};

// Handle to a started operation. Movable, not copyable. Destroying a handle that has not
// completed waits for it, so a transfer never outlives the buffers it writes.
class CommHandle {
 public:
  CommHandle() = default;
  explicit CommHandle(std::unique_ptr<PendingOp> op) : op_(std::move(op)) {}
  CommHandle(CommHandle&&) noexcept = default;
  CommHandle& operator=(CommHandle&& other) noexcept;
  CommHandle(const CommHandle&) = delete;
  CommHandle& operator=(const CommHandle&) = delete;
  ~CommHandle();

  void wait();
  bool test();  // also drives progress of the transfer; call it between pieces of compute
  bool done() const { return op_ == nullptr; }

 private:
  std::unique_ptr<PendingOp> op_;
};

// Consecutive rows [offset, offset + rows) of a tensor along dim 0.
struct RowBlock {
  int64_t offset = 0;
  int64_t rows = 0;
};

// Row blocks grouped by peer, for all_to_all_blocks: peer p's blocks are
// blocks[peer_start[p], peer_start[p + 1]), in the order its rows travel. Built peer by peer:
// add() the blocks of peer 0, end_peer(), the blocks of peer 1, end_peer(), ...
struct PeerRowBlocks {
  std::vector<RowBlock> blocks;
  std::vector<int64_t> peer_start{0};  // [peers + 1]

  void add(int64_t offset, int64_t rows) { blocks.push_back({offset, rows}); }
  void end_peer() { peer_start.push_back(static_cast<int64_t>(blocks.size())); }
  int peers() const { return static_cast<int>(peer_start.size()) - 1; }
  std::span<const RowBlock> of(int peer) const {
    return std::span<const RowBlock>(blocks).subspan(static_cast<size_t>(peer_start[peer]),
                                                     static_cast<size_t>(peer_start[peer + 1] - peer_start[peer]));
  }
  int64_t rows_of(int peer) const;  // the rows of peer's blocks together
  // all_to_all_v's layout: counts[p] rows for peer p, consecutive from row 0 in peer order.
  static PeerRowBlocks consecutive(std::span<const int64_t> counts);
};

// How the two sides of an all_to_all_blocks cut the rows of one (sender, receiver) pair.
enum class BlockMatch : uint8_t {
  // Only the rows agree: p sends q as many rows as q expects from p, each side cutting them
  // into blocks as it likes.
  rows,
  // Block for block: the k-th non-empty block p lists for q has as many rows as the k-th
  // non-empty block q lists for p (empty blocks are skipped on both sides). The MPI
  // communicator then sends each block as one contiguous message (OpenMPI moves a large
  // contiguous message between processes with one copy, a derived datatype with two); blocks
  // that disagree end the job with a message naming the pair and the block.
  blocks,
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual const std::string& name() const = 0;
  // World ranks of the members, in group-rank order (for messages and checks).
  virtual const std::vector<int>& world_ranks() const = 0;
  virtual double timeout_s() const = 0;
  // Where this communicator's tensors must live: host memory for MPI, the GPU for NCCL.
  // Host-side metadata (counts, flags) is staged there by callers (stage_for/unstage below).
  virtual Device tensor_device() const { return Device::cpu; }

  // Sum over the group, in place.
  virtual CommHandle all_reduce(const Tensor& t) = 0;
  // in: [size·n, ...] on every rank; out: [n, ...] = the sum of every rank's chunk `rank()`.
  virtual CommHandle reduce_scatter(const Tensor& in, const Tensor& out) = 0;
  // in: [n, ...]; out: [size·n, ...], rank r's rows at [r·n, (r+1)·n).
  virtual CommHandle all_gather(const Tensor& in, const Tensor& out) = 0;
  // The MoE dispatch/combine: send_counts[p] rows of `send` (consecutive, in peer order) go
  // to peer p; recv_counts[p] rows from peer p land consecutively in `recv`. Rows are slices
  // along dim 0; both tensors have the same row shape and dtype. Counts may be zero.
  virtual CommHandle all_to_all_v(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                                  std::span<const int64_t> recv_counts) = 0;
  // all_to_all_v between scattered rows, for layouts that are not one run per peer (the MoE
  // dispatch lands each (peer, expert) block where its expert's rows are, and the combine sends
  // from there). The rows of send_blocks.of(p), gathered in order, are one message to peer p;
  // the message from peer p is scattered, in order, into recv_blocks.of(p). Both lists have
  // one entry per group rank; blocks may be empty and a peer may have none; the rows received
  // from p must be as many as p sends here (as all_to_all_v's counts). Receive blocks must not
  // overlap; send blocks may. Rows are slices along dim 0 of any dtype this communicator
  // moves; both tensors have the same row shape and dtype.
  // The default (any backend, any device) gathers the send blocks into one buffer, runs
  // all_to_all_v, and scatters the received rows into recv when the handle completes (its
  // test() or wait()); it copies nothing where a side is already consecutive from row 0 in peer
  // order. A backend overrides it to move the blocks without those copies (MPI: BlockMatch::rows,
  // one indexed datatype per peer; BlockMatch::blocks, one message per block; both copy this
  // rank's own rows once, block to block). `match` promises how the two sides' blocks
  // correspond (BlockMatch; the default implementation works with either); every rank of one
  // call passes the same value.
  virtual CommHandle all_to_all_blocks(const Tensor& send, const PeerRowBlocks& send_blocks, const Tensor& recv,
                                       const PeerRowBlocks& recv_blocks, BlockMatch match = BlockMatch::rows);
  // Point to point; peer is a group rank. Messages between a pair match in order per tag.
  virtual CommHandle send(const Tensor& t, int peer, int tag = 0) = 0;
  virtual CommHandle recv(const Tensor& t, int peer, int tag = 0) = 0;
  // root's tensor is copied into every other rank's tensor (same shape and dtype).
  virtual CommHandle broadcast(const Tensor& t, int root) = 0;
  virtual CommHandle barrier() = 0;
};

// Before an all_to_all_v: every rank tells each peer how many rows it will send it.
// send_counts has size() entries; the result's entry p is the number of rows peer p sends us.
// Blocking (one all-to-all of one i64 per peer).
std::vector<int64_t> exchange_counts(Communicator& comm, std::span<const int64_t> send_counts);

// A copy of `t` where `comm` moves tensors (t itself when it already lives there), and the
// host copy of a result: how host metadata (counts, loads) crosses an NCCL communicator.
Tensor stage_for(const Communicator& comm, const Tensor& t);
Tensor unstage(const Tensor& t);  // on the host

// Every group one rank belongs to, built from a Mesh (parallel/mesh.h).
struct MeshComms {
  std::unique_ptr<Communicator> world, tp, dp, ep, edp, pp, model;
};

// Shape/dtype checks shared by the backends; throw std::invalid_argument("comm <op>: ...").
void check_comm_tensor(const Tensor& t, std::string_view op, std::string_view name);
void check_same_layout(const Tensor& a, const Tensor& b, std::string_view op);
void check_reducible(const Tensor& t, std::string_view op);  // not FP8
int64_t row_elements(const Tensor& t);                       // elements per row along dim 0 (1 for 1-D tensors)
// all_to_all_blocks: one list per group rank, every block inside t's rows; returns the rows per
// peer. `side` is "send" or "recv", named in the message.
std::vector<int64_t> check_row_blocks(const PeerRowBlocks& blocks, const Tensor& t, int group_size,
                                      std::string_view side);

}  // namespace dsx
