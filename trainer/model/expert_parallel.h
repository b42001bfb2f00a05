// How a model replica is spread over ranks, as the model's modules see it.
//
// Expert parallelism (ARCHITECTURE.md §4): the EP group splits every MoE layer's routed experts
// evenly and contiguously — EP rank p holds experts [p·E/ep, (p+1)·E/ep) — so the tokens a rank
// routes to expert e travel to rank e / (E/ep). Dense weights (attention, shared experts, the
// router) are replicated. The data-parallel group sums the expert loads that drive the
// aux-loss-free bias update, so every replica moves its biases identically.
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
  Communicator* ep = nullptr;  // null: every expert is local (ep = 1)
  Communicator* dp = nullptr;  // null: a single replica
  // Each MoE layer runs its micro-batch as two chunks: one chunk's dispatch or combine is in
  // flight while the other chunk's experts compute (forward and backward).
  bool overlap_a2a = false;
  WireFormat dispatch = WireFormat::f32;  // forward: token activations to the experts
  WireFormat combine = WireFormat::f32;   // forward: expert outputs back; backward: both ways
  CommTimer* timer = nullptr;
  // Pipeline parallelism: this rank runs stage pp_rank of pp_size (trainer/model/pipeline_stage.h);
  // V-shaped (DualPipeV): the two stages of PipelineLayout{pp_size, true} that rank pp_rank holds.
  int pp_size = 1;
  int pp_rank = 0;
  bool pp_v_shape = false;
  // decoder layers per stage (pipeline_stage.h's splits), stage 0 first; empty: the even split
  std::vector<int64_t> pp_layers = {};

  int ep_size() const { return ep ? ep->size() : 1; }
  int ep_rank() const { return ep ? ep->rank() : 0; }
};

// The routed experts EP rank `ep_rank` holds: [first, first + count).
struct LocalExperts {
  int64_t first = 0;
  int64_t count = 0;
  bool holds(int64_t expert) const { return expert >= first && expert < first + count; }
};
LocalExperts local_experts(int64_t n_routed_experts, int ep_size, int ep_rank);

}  // namespace dsx
