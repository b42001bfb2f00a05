// Moving routed tokens to the ranks that hold their experts and back (MoE dispatch/combine).
//
// One Dispatch carries one chunk of tokens through the MoE layer:
//
//   plan         (token, choice) rows sorted by global expert: rows for EP rank p are contiguous
//   counts       every rank tells each peer how many rows it sends for each of the peer's experts
//   dispatch     all-to-all of the permuted rows straight into the expert-major layout: rank q's
//                rows for my local expert j land in block (q, j), so each expert's rows are
//                contiguous on arrival (Communicator::all_to_all_blocks)
//                  expert_x = [expert j=0: from q=0, q=1, ...][expert j=1: ...]...
//                  block (q, j) starts at local_offsets[j] + Σ_{q' < q} recv_expert_counts[q'·J + j]
//   experts      local expert j computes rows local_offsets[j] .. local_offsets[j+1]
//   combine      reverse all-to-all from the same blocks back to the permuted order
//   unpermute    the routing weights are applied where the token lives (they never travel)
//
// The backward moves gradients along the same routes in reverse. Both sides cut a pair's rows
// at the same (peer, expert) blocks (BlockMatch::blocks), so the MPI communicator moves each
// block as one contiguous message straight between the two layouts and no row is copied
// outside the all-to-all; other backends gather/scatter them around their all_to_all_v. With one EP rank
// (no communicator) the all-to-alls are the identity and no row is copied.
#pragma once
#include <cstdint>
#include <span>
#include <vector>

#include "kernels/ops/moe_permute.h"
#include "trainer/model/expert_parallel.h"

namespace dsx {

struct Dispatch {
  ops::MoePlan plan;
  int64_t n_rows = 0;                       // rows this rank routes (T_chunk · K)
  std::vector<int64_t> send_counts;         // [P] rows to each EP peer
  std::vector<int64_t> recv_counts;         // [P] rows from each EP peer
  std::vector<int64_t> recv_expert_counts;  // [P · J] rows from peer q for local expert j
  std::vector<int64_t> local_offsets;       // [J + 1] expert-major row offsets of the local experts
  PeerRowBlocks plan_blocks;                // per peer p: blocks (p, j = 0..J-1) of the plan's rows
  PeerRowBlocks expert_blocks;              // per peer q: blocks (q, j = 0..J-1) of the expert-major rows
  CommHandle pending;                       // the all-to-all in flight, if any
  CommHandle pending_scales;                // FP8 rows: their scales' all-to-all
  Tensor received_scales;                   // FP8 rows: scales of the rows being received
  DType row_dtype = DType::f32;             // dtype of the rows handed to start_to_experts
};

// Which transfer of the layer: the forward dispatch uses precision.dispatch, everything else
// (forward combine, both backward transfers) precision.combine.
enum class Transfer : uint8_t { dispatch, combine };

class ExpertRouter {
 public:
  // n_experts: routed experts of the layer (global); the EP group splits them evenly.
  ExpertRouter(int64_t n_experts, const ModelParallel& parallel);

  const LocalExperts& local() const { return local_; }

  // Plans the routes of each chunk (token rows [begin, end) of expert_ids [T, K]) and exchanges
  // every chunk's per-expert row counts in one small blocking all-to-all.
  struct TokenRange {
    int64_t begin = 0, end = 0;
  };
  std::vector<Dispatch> plan(const Tensor& expert_ids, std::span<const TokenRange> chunks) const;
  // Drives the transfers of d (OpenMPI moves non-blocking collectives only inside MPI calls):
  // call it between pieces of compute.
  void progress(Dispatch& d) const;

  // Rows in the plan's order [Tc·K, D] -> this rank's expert rows, expert-major [R, D]: the
  // forward dispatch, and the backward of the combine. start_ returns the receive buffer with
  // the transfer in flight (the rows land expert-major); finish_ waits and converts the wire
  // format back to the rows' dtype.
  Tensor start_to_experts(const Tensor& rows, Dispatch& d, Transfer transfer) const;
  Tensor finish_to_experts(Dispatch& d, const Tensor& received) const;
  // Expert-major rows [R, D] -> rows in the plan's order [Tc·K, D]: the forward combine, and
  // the backward of the dispatch. start_ returns the receive buffer; finish_ waits and returns
  // the rows as `dtype`.
  Tensor start_from_experts(const Tensor& expert_rows, Dispatch& d) const;  // precision.combine
  Tensor finish_from_experts(Dispatch& d, const Tensor& in_flight, DType dtype) const;

 private:
  // Sends the send_blocks of rows [n, D] in the transfer's wire format into recv_blocks of the
  // returned receive buffer [recv_rows, D] (wire dtype).
  Tensor start_transfer(const Tensor& rows, const PeerRowBlocks& send_blocks, int64_t recv_rows,
                        const PeerRowBlocks& recv_blocks, WireFormat format, Dispatch& d) const;
  // Waits and returns the received rows as `dtype`.
  Tensor finish_transfer(Dispatch& d, const Tensor& received, DType dtype) const;
  WireFormat format(Transfer t) const { return t == Transfer::dispatch ? parallel_.dispatch : parallel_.combine; }

  ModelParallel parallel_;
  int64_t n_experts_;
  LocalExperts local_;
};

}  // namespace dsx
