// How a model replica is spread over ranks, as the model's modules see it.
//
// Expert parallelism (ARCHITECTURE.md §4): the EP group splits every MoE layer's routed experts
// evenly and contiguously — EP rank p holds experts [p·E/ep, (p+1)·E/ep) — so the tokens a rank
// routes to expert e travel to rank e / (E/ep). Dense weights (attention, shared experts, the
// router) are replicated. The data-parallel group sums the expert loads that drive the
// aux-loss-free bias update, so every replica moves its biases identically.
//
// Tensor parallelism (Megatron-style, without sequence parallelism): every TP rank of a replica
// sees all of the micro-batch's tokens. Attention is split by heads, the dense and shared-expert
// MLPs by their intermediate width (column-parallel gate/up, row-parallel down), the embedding and
// the output head by vocabulary rows (vocab-parallel cross entropy). Each split block sums its
// partial outputs over the TP group in the forward and its partial input gradients in the
// backward, so replicated weights (norms, the MLA down-projections, the router) see identical,
// complete gradients on every TP rank and need no reduction of their own. The routed experts are
// not split: the EP group spans the EP × TP ranks (parallel/mesh.h), and TP rank t sends only its
// 1/TP of the tokens to them (their outputs, zero elsewhere, join the block's sum).
#pragma once
#include <cstdint>
#include <vector>

#include "parallel/comm.h"

namespace dsx {

// Time spent blocked on communication, accumulated by whoever waits; the trainer reads and
// resets it every step ("exposed communication": transfers not hidden behind compute).
struct CommTimer {
  double exposed_s = 0;
  int64_t bytes_sent = 0;  // payload bytes this rank sent in MoE all-to-alls
  double take_exposed() {
    const double s = exposed_s;
    exposed_s = 0;
    return s;
  }
};

// Waits for h, adding the blocked time to timer (when given).
void timed_wait(CommHandle& h, CommTimer* timer);

// How rows travel in the MoE all-to-alls (recipe precision.dispatch / precision.combine). The
// experts always compute on f32 rows: a narrower format is converted on the way out and back on
// arrival. fp8_e4m3 rows carry one f32 scale per 1×128 tile along the hidden dimension — the
// quantization the experts' FP8 Fprop GEMM applies to its input anyway (DeepSeek-V3 dispatches
// in FP8 and combines in bf16).
enum class WireFormat : uint8_t { f32, bf16, fp8_e4m3 };

struct ModelParallel {
  Communicator* ep = nullptr;  // null: every expert is local (ep = 1); with tp > 1 it spans EP × TP
  Communicator* tp = nullptr;  // null: tp = 1
  // Sequence parallelism (with tp > 1): between the tensor-parallel blocks each TP rank holds
  // only its tp_rows of the micro-batch's tokens (the residual stream, the norms); a block
  // all-gathers its input and reduce-scatters its output.
  bool sequence_parallel = false;
  Communicator* dp = nullptr;  // null: a single replica
  // Each MoE layer runs its micro-batch as two chunks: one chunk's dispatch or combine is in
  // flight while the other chunk's experts compute (forward and backward).
  bool overlap_a2a = false;
  WireFormat dispatch = WireFormat::f32;  // forward: token activations to the experts
  WireFormat combine = WireFormat::f32;   // forward: expert outputs back; backward: both ways
  CommTimer* timer = nullptr;
  // Pipeline parallelism: this rank runs stage pp_rank of pp_size (trainer/model/pipeline_stage.h);
  // V-shaped (DualPipeV) or interleaved: the stages of PipelineLayout{pp_size, pp_v_shape,
  // pp_interleave} that rank pp_rank holds.
  int pp_size = 1;
  int pp_rank = 0;
  bool pp_v_shape = false;
  int pp_interleave = 1;
  // decoder layers per stage (pipeline_stage.h's splits), stage 0 first; empty: the even split
  std::vector<int64_t> pp_layers = {};

  int ep_size() const { return ep ? ep->size() : 1; }
  int ep_rank() const { return ep ? ep->rank() : 0; }
  int tp_size() const { return tp ? tp->size() : 1; }
  int tp_rank() const { return tp ? tp->rank() : 0; }
};

// t summed over the TP group, in place (nothing without tensor parallelism); the wait counts as
// exposed communication.
void all_reduce_over_tp(const ModelParallel& parallel, Tensor& t);

// A tensor-parallel block's partial result over all the tokens (its output, or its input
// gradient) summed over TP: the whole sum, or under sequence parallelism this rank's token rows
// of it (a reduce-scatter).
Tensor sum_over_tp(const ModelParallel& parallel, Tensor partial);
// Under sequence parallelism, every TP rank's token rows in order (an all-gather); else t.
Tensor gather_tokens(const ModelParallel& parallel, const Tensor& t);
// Under sequence parallelism, this rank's token rows of t (a copy: what is kept does not hold the
// whole tensor alive); else t.
Tensor own_tokens(const ModelParallel& parallel, const Tensor& t);

// The rows [begin, end) of n that TP rank `rank` of `size` takes: equal contiguous parts, the
// first n % size ranks one row more.
struct RowRange {
  int64_t begin = 0, end = 0;
};
RowRange tp_rows(int64_t n, int size, int rank);

// The routed experts EP rank `ep_rank` holds: [first, first + count).
struct LocalExperts {
  int64_t first = 0;
  int64_t count = 0;
  bool holds(int64_t expert) const { return expert >= first && expert < first + count; }
};
LocalExperts local_experts(int64_t n_routed_experts, int ep_size, int ep_rank);

}  // namespace dsx
