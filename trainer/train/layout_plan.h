// `dsx plan RECIPE --gpus N`: which parallel layouts of a recipe run on N devices, what the
// busiest rank of each holds, and roughly how fast its step is. Arithmetic only: the model's
// parameter specs (the list the model registers), the tensors its modules keep between forward
// and backward, the recipe's pipeline schedules run on a clock, and stated hardware assumptions.
// Nothing is allocated, nothing runs.
//
// Memory of a rank (bytes), by what dsx keeps (trainer/model, trainer/optim):
//   weights      every parameter it holds, in model.dtype (fp32 master weights)
//   gradients    one per trainable weight, in model.dtype; with ZeRO-1 also the reduced shard
//   gemm copies  bf16 copies of the weights whose GEMMs run in bf16 (GemmWeightCopies)
//   optimizer    AdamW's two moments (optim.moments), sharded over dp (experts over dp / ep)
//                with ZeRO-1; the weight EMA (optim.ema_decay) of a rank that writes its
//                weights (host memory: counted only when the model lives there too)
//   activations  what its stages keep per micro-batch (per token: the residual stream, norms,
//                MLA latents, the attention core's inputs and output, SwiGLU projections, the
//                MoE's permuted rows, logits) times the micro-batches its schedule holds at once
//   transient    the largest buffer a backward adds on top (the head's logit gradient, or an MoE
//                layer's expert-row gradients)
// The estimate is checked against the peak of live tensor memory a run measures
// (tests/trainer/test_layout_plan.cpp).
//
// Time of a step (seconds), a model with its parts visible:
//   compute  model FLOPs of the step (those of FP8 GEMMs at fp8_speedup times the rate) plus the
//            forward work recomputation repeats, / (devices · peak FLOP/s · assumed MFU),
//            stretched by the pipeline bubble of the recipe's schedule run on a clock (stages
//            weighted by FLOPs)
//   tp       the tensor-parallel all-reduces (not overlapped)
//   ep       the MoE all-to-alls; with parallel.overlap_a2a half of them run under compute
//   dp       the gradient reduction (and ZeRO-1's parameter all-gather) beyond what hides under
//            the last micro-batch's backward
//   pp       one micro-batch's activations and gradients through every hop (the rest overlap)
// Bandwidths: intra-node (NVLink) for groups inside a node, the network per GPU across nodes.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/recipe/recipe.h"

namespace dsx {

struct PlanHardware {
  int64_t devices = 1;
  int64_t devices_per_node = 8;
  double memory_bytes = 79.6 * (1LL << 30);  // per device (an H100 80GB shows 79.6 GiB)
  double usable_fraction = 0.9;              // the rest for allocator fragmentation, CUDA/NCCL workspaces
  double peak_flops = 989e12;                // per device, dense bf16 (H100 SXM)
  double mfu = 0.4;                          // share of the peak the step's compute reaches
  double fp8_speedup = 2.0;                  // FP8 GEMMs' dense peak over bf16's (H100: 1979 / 989)
  double intra_node_bytes_per_s = 450e9;     // per device, one direction (NVLink 4)
  double inter_node_bytes_per_s = 50e9;      // per device (400 Gb/s InfiniBand)
};

struct RankMemory {
  int64_t parameters = 0;  // elements held
  double weights = 0, gradients = 0, gemm_copies = 0, optimizer = 0, activations = 0, transient = 0;
  // optim.ema_decay: the weight EMA of what the rank writes, in host memory: part of the model's
  // memory on a CPU device (ema), beside it on a GPU (host_ema, not in total())
  double ema = 0, host_ema = 0;
  int64_t micro_batches_held = 0;  // most micro-batches whose activations are kept at once

  double model_state() const { return weights + gradients + gemm_copies + optimizer + ema; }
  double total() const { return model_state() + activations + transient; }
};

struct StepTime {
  double compute = 0, tp = 0, ep = 0, dp = 0, pp = 0;  // seconds, exposed
  double bubble = 0;                                   // idle share of the pipeline's clock
  double total() const { return compute + tp + ep + dp + pp; }
};

struct CommVolume {  // bytes one device sends per step
  double tp = 0, ep = 0, dp = 0, pp = 0;
};

struct LayoutPlan {
  ParallelSection parallel;
  std::string refused;   // why this layout cannot run ("" when it can)
  int busiest_rank = 0;  // the pipeline rank with the most memory
  RankMemory memory;     // that rank's
  CommVolume comm;
  StepTime time;
  double tokens_per_s = 0;
  double mfu = 0;
  bool fits = false;  // memory.total() <= usable memory
};

// Bytes the pipeline rank `pipeline_rank` of the recipe's own layout holds at its peak.
RankMemory rank_memory(const Recipe& recipe, int pipeline_rank);

// The recipe's own layout, planned.
LayoutPlan plan_layout(const Recipe& recipe, const PlanHardware& hw);

// Every layout of hw.devices devices: tp (within a node) x pp x dp with ep dividing dp,
// sequence parallelism with tp > 1, each built pipeline schedule for pp > 1; the recipe's other
// settings kept. Runnable layouts that fit first, fastest first; then those that do not fit,
// smallest first; then the refused ones, each with the reason.
std::vector<LayoutPlan> plan_layouts(const Recipe& recipe, const PlanHardware& hw);

}  // namespace dsx
