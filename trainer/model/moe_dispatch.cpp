#include "trainer/model/moe_dispatch.h"

#include <numeric>
#include <span>

#include "kernels/ops/fp8.h"

namespace dsx {
namespace {

// Where each (peer q, local expert j) block of received rows lies in the expert-major layout:
// expert j's rows start at local_offsets[j], from peer 0 first, then peer 1, ...
PeerRowBlocks expert_major_blocks(std::span<const int64_t> recv_expert_counts, std::span<const int64_t> local_offsets,
                                  int64_t P, int64_t J) {
  std::vector<int64_t> next(local_offsets.begin(), local_offsets.end() - 1);  // [J] next free row per expert
  PeerRowBlocks b;
  b.blocks.reserve(static_cast<size_t>(P * J));
  for (int64_t q = 0; q < P; ++q) {
    for (int64_t j = 0; j < J; ++j) {
      const int64_t n = recv_expert_counts[q * J + j];
      b.add(next[j], n);
      next[j] += n;
    }
    b.end_peer();
  }
  return b;
}

// The plan's rows for each peer p, cut at its experts: block (p, j) holds the rows for p's local
// expert j. They are consecutive, but cut like the peer's expert-major blocks (q = this rank, j)
// so the two sides' blocks match one for one (BlockMatch::blocks).
PeerRowBlocks plan_expert_blocks(std::span<const int64_t> expert_offsets, int64_t P, int64_t J) {
  PeerRowBlocks b;
  b.blocks.reserve(static_cast<size_t>(P * J));
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t j = 0; j < J; ++j) {
      const int64_t e = p * J + j;
      b.add(expert_offsets[e], expert_offsets[e + 1] - expert_offsets[e]);
    }
    b.end_peer();
  }
  return b;
}

}  // namespace

ExpertRouter::ExpertRouter(int64_t n_experts, const ModelParallel& parallel)
    : parallel_(parallel),
      n_experts_(n_experts),
      local_(local_experts(n_experts, parallel.ep_size(), parallel.ep_rank())) {}

std::vector<Dispatch> ExpertRouter::plan(const Tensor& expert_ids, std::span<const TokenRange> chunks) const {
  const auto C = static_cast<int64_t>(chunks.size());
  const int64_t P = parallel_.ep_size(), J = local_.count;
  std::vector<Dispatch> out(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    Dispatch& d = out[c];
    d.plan = ops::moe_plan(expert_ids.slice(chunks[c].begin, chunks[c].end), n_experts_);
    d.n_rows = d.plan.expert_offsets.back();
    const std::vector<int64_t>& off = d.plan.expert_offsets;
    d.send_counts.resize(static_cast<size_t>(P));
    for (int64_t p = 0; p < P; ++p) d.send_counts[p] = off[(p + 1) * J] - off[p * J];
    if (!parallel_.ep) {  // every expert is local: the routes are the plan itself
      d.recv_counts = d.send_counts;
      d.recv_expert_counts.assign(off.begin() + 1, off.end());
      for (int64_t j = J - 1; j > 0; --j) d.recv_expert_counts[j] -= d.recv_expert_counts[j - 1];
      d.local_offsets = off;
    }
  }
  if (!parallel_.ep) return out;

  // Tell every peer how many rows each chunk sends to each of its experts: to peer p go the
  // counts [chunk 0: its J experts][chunk 1: ...].
  Tensor per_expert = Tensor::empty({P * C * J}, DType::i64);
  int64_t* pe = per_expert.data<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t j = 0; j < J; ++j) {
        const std::vector<int64_t>& off = out[c].plan.expert_offsets;
        pe[(p * C + c) * J + j] = off[p * J + j + 1] - off[p * J + j];
      }
  Communicator& ep = *parallel_.ep;
  const Tensor sent = stage_for(ep, per_expert);
  Tensor received = Tensor::empty({P * C * J}, DType::i64, ep.tensor_device());
  const std::vector<int64_t> per_peer(static_cast<size_t>(P), C * J);
  CommHandle h = ep.all_to_all_v(sent, per_peer, received, per_peer);
  timed_wait(h, parallel_.timer);
  received = unstage(received);
  const int64_t* rc = received.data<int64_t>();
  for (int64_t c = 0; c < C; ++c) {
    Dispatch& d = out[c];
    d.recv_expert_counts.resize(static_cast<size_t>(P * J));
    d.recv_counts.assign(static_cast<size_t>(P), 0);
    d.local_offsets.assign(static_cast<size_t>(J) + 1, 0);
    for (int64_t q = 0; q < P; ++q)
      for (int64_t j = 0; j < J; ++j) {
        const int64_t n = rc[(q * C + c) * J + j];
        d.recv_expert_counts[q * J + j] = n;
        d.recv_counts[q] += n;
        d.local_offsets[j + 1] += n;
      }
    std::partial_sum(d.local_offsets.begin(), d.local_offsets.end(), d.local_offsets.begin());
    d.plan_blocks = plan_expert_blocks(d.plan.expert_offsets, P, J);
    d.expert_blocks = expert_major_blocks(d.recv_expert_counts, d.local_offsets, P, J);
  }
  return out;
}

void ExpertRouter::progress(Dispatch& d) const {
  if (!d.pending.done()) d.pending.test();
  if (!d.pending_scales.done()) d.pending_scales.test();
}

Tensor ExpertRouter::start_transfer(const Tensor& rows, const PeerRowBlocks& send_blocks, int64_t recv_rows,
                                    const PeerRowBlocks& recv_blocks, WireFormat wire, Dispatch& d) const {
  const int64_t D = rows.dim(1);
  Communicator& ep = *parallel_.ep;
  int64_t bytes = 0;
  Tensor received;
  switch (wire) {
    case WireFormat::f32:
    case WireFormat::bf16: {
      const Tensor payload = wire == WireFormat::bf16 && rows.dtype() != DType::bf16 ? rows.to(DType::bf16) : rows;
      received = Tensor::empty({recv_rows, D}, payload.dtype(), rows.device());
      d.pending = ep.all_to_all_blocks(payload, send_blocks, received, recv_blocks, BlockMatch::blocks);
      bytes = static_cast<int64_t>(payload.nbytes());
      break;
    }
    case WireFormat::fp8_e4m3: {
      ops::Fp8Matrix q = ops::Fp8Matrix::empty(rows.dim(0), D, ops::Fp8Scaling::tile_1x128, rows.device());
      ops::fp8_quantize(rows, q);
      received = Tensor::empty({recv_rows, D}, DType::fp8_e4m3, rows.device());
      d.received_scales = Tensor::empty({recv_rows, q.scales.dim(1)}, DType::f32, rows.device());
      d.pending = ep.all_to_all_blocks(q.data, send_blocks, received, recv_blocks, BlockMatch::blocks);
      d.pending_scales =
          ep.all_to_all_blocks(q.scales, send_blocks, d.received_scales, recv_blocks, BlockMatch::blocks);
      bytes = static_cast<int64_t>(q.data.nbytes() + q.scales.nbytes());
      break;
    }
  }
  if (parallel_.timer) parallel_.timer->bytes_sent += bytes;
  return received;
}

Tensor ExpertRouter::finish_transfer(Dispatch& d, const Tensor& received, DType dtype) const {
  timed_wait(d.pending, parallel_.timer);
  if (received.dtype() == DType::fp8_e4m3) {
    timed_wait(d.pending_scales, parallel_.timer);
    ops::Fp8Matrix q{received, d.received_scales, ops::Fp8Scaling::tile_1x128};
    Tensor rows = Tensor::empty(received.shape(), DType::f32, received.device());
    ops::fp8_dequantize(q, rows);
    d.received_scales = Tensor();
    return dtype == DType::f32 ? rows : rows.to(dtype);
  }
  return received.dtype() == dtype ? received : received.to(dtype);
}

Tensor ExpertRouter::start_to_experts(const Tensor& rows, Dispatch& d, Transfer transfer) const {
  d.row_dtype = rows.dtype();
  if (!parallel_.ep) return rows;
  return start_transfer(rows, d.plan_blocks, d.local_offsets.back(), d.expert_blocks, format(transfer), d);
}

Tensor ExpertRouter::finish_to_experts(Dispatch& d, const Tensor& received) const {
  if (!parallel_.ep) return received;
  return finish_transfer(d, received, d.row_dtype);
}

Tensor ExpertRouter::start_from_experts(const Tensor& expert_rows, Dispatch& d) const {
  if (!parallel_.ep) return expert_rows;
  return start_transfer(expert_rows, d.expert_blocks, d.n_rows, d.plan_blocks, parallel_.combine, d);
}

Tensor ExpertRouter::finish_from_experts(Dispatch& d, const Tensor& in_flight, DType dtype) const {
  if (!parallel_.ep) return in_flight;
  return finish_transfer(d, in_flight, dtype);
}

}  // namespace dsx
