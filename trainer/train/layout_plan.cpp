#include "trainer/train/layout_plan.h"

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <utility>

#include "kernels/error.h"
#include "trainer/model/param_count.h"
#include "trainer/model/parameters.h"
#include "trainer/model/pipeline_stage.h"
#include "trainer/model/precision.h"
#include "trainer/recipe/validate.h"
#include "trainer/train/schedule.h"
#include "trainer/train/train_parallel.h"

namespace dsx {
namespace {

double as_double(int64_t v) {
  return static_cast<double>(v);
}

// Bytes of the element types the model keeps: `stored` for activations and weights
// (model.dtype: stored activations are compute-dtype tensors even when their values are rounded
// to bf16), `core` for the attention core's inputs and output (bf16 with bf16 activations).
struct ElementBytes {
  double stored = 4, core = 4, lse = 4;
};

ElementBytes element_bytes(const Recipe& r) {
  ElementBytes b;
  b.stored = as_double(dtype_size(r.model.dtype));
  const bool bf16_core = r.precision.activations == ActivationPrecision::bf16;
  b.core = bf16_core ? 2 : b.stored;
  b.lse = bf16_core ? 4 : b.stored;
  return b;
}

// ---- which rank holds what --------------------------------------------------------------

// Parameters merged by what decides where and how they are held: layer (kEmbedding for the
// table, num_hidden_layers and up for the final norm, the head and the MTP modules), shard axis,
// trainable, and whether a bf16 GEMM copy is kept. A few hundred groups instead of a spec per
// expert matrix (DeepSeek-V3 has ~47K), so thousands of layouts plan in a moment.
constexpr int64_t kEmbedding = -1;
struct ParamGroup {
  int64_t layer = 0;
  ShardAxis axis = ShardAxis::none;
  bool trainable = true;
  bool gemm_copy = false;
  double elements = 0;
};

std::vector<ParamGroup> param_groups(const Recipe& r) {
  const PrecisionPolicy precision = precision_policy(r.precision);
  std::vector<ParamGroup> groups;
  for (const ParamSpec& spec : model_param_specs(r.model)) {
    ParamGroup g;
    g.layer = spec.name == "model.embed_tokens.weight" ? kEmbedding
              : spec.layer < 0                         ? r.model.num_hidden_layers
                                                       : spec.layer;
    g.axis = spec.shard.axis;
    g.trainable = spec.trainable;
    g.gemm_copy = spec.shape.size() == 2 && precision.for_parameter(spec.name).gemm == GemmKind::bf16;
    g.elements = as_double(spec.numel());
    const auto same = [&](const ParamGroup& o) {
      return o.layer == g.layer && o.axis == g.axis && o.trainable == g.trainable && o.gemm_copy == g.gemm_copy;
    };
    const auto it = std::find_if(groups.rbegin(), groups.rend(), same);  // specs come layer by layer
    if (it != groups.rend()) {
      it->elements += g.elements;
    } else {
      groups.push_back(g);
    }
  }
  return groups;
}

// The pipeline stage a group lives on: the embedding on the first, the decoder layers where the
// split puts them, the final norm, the head and the MTP modules on the last.
int stage_of(int64_t layer, const std::vector<int64_t>& split) {
  const int stages = static_cast<int>(split.size());
  if (layer == kEmbedding) return 0;
  int64_t end = 0;
  for (int s = 0; s < stages; ++s) {
    end += split[static_cast<size_t>(s)];
    if (layer < end) return s;
  }
  return stages - 1;
}

// Elements of the parameter one rank of its stage holds: a TP shard, a routed expert on one of
// the ep·tp ranks that split the experts (counted as that share of every expert), else whole.
double held_fraction(ShardAxis axis, const ParallelSection& p) {
  switch (axis) {
    case ShardAxis::tensor:
      return 1.0 / as_double(p.tp);
    case ShardAxis::expert:
      return 1.0 / as_double(p.ep * p.tp);
    case ShardAxis::none:
      return 1.0;
  }
  return 1.0;
}

// ---- activations ---------------------------------------------------------------------------

// Bytes one decoder layer keeps per token of a micro-batch from its forward to its backward
// (trainer/model/decoder_layer.h, mla.h, layers.h, moe.h contexts).
// recompute false: as if train.recompute were empty (what a recomputed layer rebuilds).
double layer_activation_bytes(const Recipe& r, bool moe, bool recompute = true) {
  const auto recomputes = [&](RecomputeKind kind) { return recompute && r.train.recomputes(kind); };
  const ModelSection& m = r.model;
  const ParallelSection& p = r.parallel;
  const ElementBytes b = element_bytes(r);
  const double tp = as_double(p.tp);
  const double local = p.sequence_parallel ? 1.0 / tp : 1.0;  // share of the tokens a rank keeps
  const double D = as_double(m.hidden_size);
  const double residual = (2 * D + 2) * local * b.stored;            // layer input, x + attention; norms' rstd
  if (recomputes(RecomputeKind::full)) return D * local * b.stored;  // the input only
  const bool norm_recompute = recomputes(RecomputeKind::rmsnorm);
  const double norms = norm_recompute ? 0 : 2 * D * local * b.stored;  // attn_in, ffn_in

  // MLA: latents on every token (replicated over TP), heads split over TP
  const double q_lora = as_double(m.q_lora_rank), kv_lora = as_double(m.kv_lora_rank);
  const double latents =
      (q_lora + kv_lora + as_double(m.qk_rope_head_dim) + 2 + (norm_recompute ? 0 : q_lora + kv_lora)) * b.stored;
  const double heads = as_double(m.num_attention_heads) / tp;
  const double qk = as_double(m.qk_head_dim()), dv = as_double(m.v_head_dim);
  const double states = recomputes(RecomputeKind::mla_up_proj) ? 0 : heads * (2 * qk + dv) * b.core;
  const double attention = latents + states + heads * dv * b.core + heads * b.lse;

  double ffn = 0;
  if (!moe) {
    ffn = 3 * as_double(m.intermediate_size) / tp * b.stored;  // gate, up, silu(gate)·up
  } else {
    const double K = as_double(m.num_experts_per_tok), E = as_double(m.n_routed_experts);
    const double F = as_double(m.moe_intermediate_size);
    const double swiglu = recomputes(RecomputeKind::moe_act) ? 2 : 3;
    const double router = (E + K) * b.stored + K * 4;  // scores, weights, expert ids
    const double shared = swiglu * as_double(m.n_shared_experts) * F / tp * b.stored;
    // Each TP rank routes 1/tp of the tokens; each of their K choices keeps the row an expert
    // received (the permuted row itself when nothing is exchanged; the sent copy is dropped), the
    // expert's SwiGLU projections and its output row.
    const double rows = K / tp * (2 * D + swiglu * F) * b.stored;
    ffn = router + shared + rows;
  }
  return residual + norms + attention + ffn;
}

// Bytes the output head keeps per token (its input, the logits, lse, targets).
double head_activation_bytes(const Recipe& r) {
  const ElementBytes b = element_bytes(r);
  const double D = as_double(r.model.hidden_size), tp = as_double(r.parallel.tp);
  const double local = r.parallel.sequence_parallel ? 1.0 / tp : 1.0;
  const double gathered = r.parallel.sequence_parallel ? D : 0;
  return ((2 * D + 2) * local + gathered + as_double(r.model.vocab_size) / tp + 2) * b.stored;
}

// One MTP module: its inputs (the shifted embedding, [norm(h), norm(e)], eh_proj's output, the
// block's output), a decoder block and a head.
double mtp_activation_bytes(const Recipe& r) {
  const ElementBytes b = element_bytes(r);
  const double D = as_double(r.model.hidden_size);
  const int64_t block_layer = r.model.num_hidden_layers;  // MTP blocks continue the layer numbering
  return 5 * D * b.stored + layer_activation_bytes(r, r.model.is_moe_layer(block_layer)) + head_activation_bytes(r);
}

// Per token of one micro-batch, what a pipeline stage keeps.
double stage_activation_bytes(const Recipe& r, const PipelineStage& stage) {
  const ElementBytes b = element_bytes(r);
  const double local = r.parallel.sequence_parallel ? 1.0 / as_double(r.parallel.tp) : 1.0;
  double bytes = as_double(r.model.hidden_size) * local * b.stored;  // the stage's output
  for (int64_t l = stage.first_layer; l < stage.end_layer; ++l)
    bytes += layer_activation_bytes(r, r.model.is_moe_layer(l));
  if (stage.is_last()) {
    bytes += head_activation_bytes(r) + as_double(r.model.num_nextn_predict_layers) * mtp_activation_bytes(r);
  }
  return bytes;
}

// The largest buffer a stage's backward adds per token: the head's logit gradient, or for a
// decoder layer what recomputation rebuilds of it (train.recompute) plus, in an MoE layer, the
// gradients of its routed rows (permuted output, expert input, SwiGLU projections).
double stage_transient_bytes(const Recipe& r, const PipelineStage& stage) {
  const ModelSection& m = r.model;
  const double stored = element_bytes(r).stored, tp = as_double(r.parallel.tp);
  double most = 0;
  for (int64_t l = stage.first_layer; l < stage.end_layer; ++l) {
    const bool moe = m.is_moe_layer(l);
    const double rebuilt = layer_activation_bytes(r, moe, /*recompute=*/false) - layer_activation_bytes(r, moe);
    const double K = as_double(m.num_experts_per_tok);
    const double routed_grads =
        moe ? K / tp * (2 * as_double(m.hidden_size) + 3 * as_double(m.moe_intermediate_size)) * stored : 0;
    most = std::max(most, rebuilt + routed_grads);
  }
  if (stage.is_last()) most = std::max(most, as_double(m.vocab_size) / tp * stored);
  return most;
}

int64_t micro_batches_per_step(const Recipe& r) {
  return r.train.accumulation_steps(r.train.global_batch, r.parallel.dp);
}

// ---- time --------------------------------------------------------------------------------

// Seconds to move `bytes` per device inside a group of `size` consecutive ranks spaced `stride`
// apart in rank order: at NVLink speed while the group fits in a node, else the share of the
// traffic to peers on other nodes goes over the network.
double transfer_s(double bytes, int64_t size, int64_t stride, const PlanHardware& hw) {
  if (size <= 1 || bytes <= 0) return 0;
  const int64_t span = size * stride;
  const int64_t on_node = span <= hw.devices_per_node ? size : std::max<int64_t>(1, hw.devices_per_node / stride);
  const double off_share = as_double(size - on_node) / as_double(size - 1);
  return bytes * ((1 - off_share) / hw.intra_node_bytes_per_s + off_share / hw.inter_node_bytes_per_s);
}

// The FLOPs recomputation adds per token (hardware FLOPs beyond the model's): full recompute runs
// every decoder layer's forward again (a third of its forward + backward); recomputing the MLA
// up-projections reruns q_b_proj (or q_proj) and kv_b_proj; norms and SwiGLU are elementwise.
double recompute_flops_per_token(const Recipe& r, const ModuleFlops& flops) {
  if (r.train.recomputes(RecomputeKind::full)) {
    double layers = 0;
    for (double layer : flops.layers) layers += layer;
    return layers / 3;
  }
  if (!r.train.recomputes(RecomputeKind::mla_up_proj)) return 0;
  const ModelSection& m = r.model;
  const double heads = as_double(m.num_attention_heads);
  const double q_in = as_double(m.q_lora_rank > 0 ? m.q_lora_rank : m.hidden_size);
  const double up = q_in * heads * as_double(m.qk_head_dim()) +
                    as_double(m.kv_lora_rank) * heads * as_double(m.qk_nope_head_dim + m.v_head_dim);
  return 2 * up * as_double(m.num_hidden_layers);
}

double ring_factor(int64_t n) {
  return n > 1 ? 2.0 * as_double(n - 1) / as_double(n) : 0.0;
}

// A pipeline schedule with its chunks per rank (parallel.pp_chunks, used by interleaved_1f1b).
struct ScheduleChoice {
  PipelineSchedule schedule = PipelineSchedule::one_f_one_b;
  int64_t chunks = ParallelSection{}.pp_chunks;
};

// The schedules tried on pp ranks: 1F1B, zero-bubble, DualPipeV, and interleaved 1F1B with 2 and
// 4 chunks per rank where the model has a layer for each stage.
std::vector<ScheduleChoice> schedule_choices(int64_t pp, int64_t layers) {
  if (pp == 1) return {{}};  // no pipeline: unused
  std::vector<ScheduleChoice> out = {
      {PipelineSchedule::one_f_one_b}, {PipelineSchedule::zero_bubble}, {PipelineSchedule::dualpipev}};
  for (const int64_t chunks : {2, 4})
    if (pp * chunks <= layers) out.push_back({PipelineSchedule::interleaved_1f1b, chunks});
  return out;
}

std::vector<std::pair<ScheduleChoice, PipelineSplit>> pairs(const std::vector<ScheduleChoice>& schedules,
                                                            const std::vector<PipelineSplit>& splits) {
  std::vector<std::pair<ScheduleChoice, PipelineSplit>> out;
  for (const ScheduleChoice& schedule : schedules)
    for (const PipelineSplit split : splits) out.emplace_back(schedule, split);
  return out;
}

// Model FLOPs per token of the GEMMs that run in FP8 (precision.gemm and its exceptions): 6 per
// weight element a token passes, routed experts by top_k / n_routed_experts.
double fp8_flops_per_token(const Recipe& r) {
  const PrecisionPolicy precision = precision_policy(r.precision);
  const ModelSection& m = r.model;
  const double routed = m.n_routed_experts > 0 ? as_double(m.num_experts_per_tok) / as_double(m.n_routed_experts) : 0;
  double flops = 0;
  for (const ParamSpec& spec : model_param_specs(m)) {
    if (spec.shape.size() != 2 || precision.for_parameter(spec.name).gemm != GemmKind::fp8_blockwise) continue;
    flops += 6 * as_double(spec.numel()) * (spec.routed_expert ? routed : 1.0);
  }
  return flops;
}

// What the planner computes once per recipe: the parameters by group and the modules' FLOPs.
struct ModelFacts {
  std::vector<ParamGroup> groups;
  ModuleFlops flops;
  double fp8_flops = 0;  // the part of flops.total() in FP8 GEMMs
};

ModelFacts model_facts(const Recipe& r) {
  return {param_groups(r), module_flops_per_token(r.model, r.train.seq_len), fp8_flops_per_token(r)};
}

RankMemory rank_memory(const Recipe& r, const std::vector<ParamGroup>& groups, const std::vector<int64_t>& split,
                       int pipeline_rank) {
  const ParallelSection& p = r.parallel;
  const PipelineLayout layout = pipeline_layout(r);
  const ElementBytes b = element_bytes(r);
  const double moment_bytes = r.optim.moments == MomentPrecision::bf16 ? 2 : 4;
  const bool zero1 = p.zero == 1 && p.dp > 1;

  RankMemory mem;
  double held = 0;
  for (const ParamGroup& g : groups) {
    if (layout.rank_of(stage_of(g.layer, split)) != pipeline_rank) continue;
    const double n = g.elements * held_fraction(g.axis, p);
    held += n;
    mem.weights += n * b.stored;
    if (!g.trainable) continue;
    // ZeRO-1 splits the optimizer state of dense weights over dp, of routed experts over dp / ep
    const double group = !zero1 ? 1 : as_double(g.axis == ShardAxis::expert ? p.dp / p.ep : p.dp);
    mem.gradients += n * b.stored * (group > 1 ? 1 + 1 / group : 1);  // + the reduced shard (none for a group of 1)
    mem.optimizer += n * 2 * moment_bytes / group;
    if (g.gemm_copy) mem.gemm_copies += n * 2;
  }
  mem.parameters = static_cast<int64_t>(std::llround(held));
  if (r.optim.ema_decay > 0) (r.model.device == Device::cpu ? mem.ema : mem.host_ema) = mem.weights;

  const double tokens = as_double(r.train.micro_batch * r.train.seq_len);
  std::vector<double> chunk_bytes;
  double transient = 0;
  for (int c = 0; c < layout.chunks(); ++c) {
    const PipelineStage stage = pipeline_stage(split, layout.stage_of(pipeline_rank, c));
    chunk_bytes.push_back(stage_activation_bytes(r, stage) * tokens);
    transient = std::max(transient, stage_transient_bytes(r, stage) * tokens);
  }
  // the rank's schedule replayed: each forward keeps its chunk's bytes until its (weight) backward
  const std::vector<Action> schedule = stage_schedule(r, micro_batches_per_step(r), pipeline_rank);
  mem.activations = max_held(schedule, chunk_bytes);
  mem.micro_batches_held = max_in_flight(schedule);
  mem.transient = transient;
  return mem;
}

LayoutPlan plan_with(const Recipe& r, const ModelFacts& facts, const PlanHardware& hw) {
  LayoutPlan plan;
  plan.parallel = r.parallel;
  try {
    validate(r, nullptr);
    check_layout_is_built(r);
  } catch (const UserError& e) {
    plan.refused = e.what();
    return plan;
  }
  const ParallelSection& p = r.parallel;
  const ModelSection& m = r.model;
  const double stored = element_bytes(r).stored;

  // memory: the busiest pipeline rank
  const std::vector<int64_t> split = pipeline_split(r, facts.flops);
  for (int rank = 0; rank < static_cast<int>(p.pp); ++rank) {
    const RankMemory mem = rank_memory(r, facts.groups, split, rank);
    if (rank == 0 || mem.total() > plan.memory.total()) {
      plan.memory = mem;
      plan.busiest_rank = rank;
    }
  }
  plan.fits = plan.memory.total() <= hw.memory_bytes * hw.usable_fraction;

  // compute, stretched by the pipeline's bubble
  const int64_t n = micro_batches_per_step(r);
  const double step_tokens = as_double(r.train.global_batch * r.train.seq_len);
  const double devices = as_double(p.pp * p.dp * p.tp);
  const double flops = facts.flops.total() * step_tokens;  // model FLOPs: what MFU counts
  // FP8 GEMMs at hw.fp8_speedup times the bf16 rate; recomputation counted at the bf16 rate
  const double fp8_saved = facts.fp8_flops * step_tokens * (1 - 1 / hw.fp8_speedup);
  const double recomputed = recompute_flops_per_token(r, facts.flops) * step_tokens;
  const double ideal_s = (flops - fp8_saved + recomputed) / (devices * hw.peak_flops * hw.mfu);
  if (p.pp > 1) {
    const RecipeStep step = run_recipe_step(r, n, {.forward = 1, .backward_input = 1, .backward_weight = 1},
                                            relative_stage_flops(facts.flops, split));
    plan.time.bubble = step.run.bubble;
  }
  plan.time.compute = ideal_s / (1 - plan.time.bubble);

  // communication a device sends per step; each micro-batch of tokens passes the rank's layers
  const double layers_per_rank = as_double(m.num_hidden_layers + m.num_nextn_predict_layers) / as_double(p.pp);
  const double moe_share =
      as_double(std::max<int64_t>(0, m.num_hidden_layers - m.first_k_dense_replace)) / as_double(m.num_hidden_layers);
  const double mb_tokens = as_double(r.train.micro_batch * r.train.seq_len);
  const double D = as_double(m.hidden_size);
  // TP: forward o_proj and FFN outputs summed, backward the latent gradients and the FFN input's
  const double tp_elements = 3 * D + as_double(m.kv_lora_rank + m.qk_rope_head_dim + m.q_lora_rank);
  plan.comm.tp = ring_factor(p.tp) * tp_elements * stored * mb_tokens * layers_per_rank * as_double(n);
  // EP: dispatch and combine, forward and backward, of this rank's share of the (token, choice) rows
  const int64_t ep_group = p.ep * p.tp;
  const double dispatch_bytes = r.precision.dispatch == DispatchPrecision::fp8    ? 1 + 4.0 / 128
                                : r.precision.dispatch == DispatchPrecision::bf16 ? 2
                                                                                  : stored;
  const double combine_bytes = r.precision.combine == CombinePrecision::bf16 ? 2 : stored;
  const double off_rank = ep_group > 1 ? as_double(ep_group - 1) / as_double(ep_group) : 0;
  plan.comm.ep = off_rank * as_double(m.num_experts_per_tok) * mb_tokens / as_double(p.tp) * D *
                 (dispatch_bytes + combine_bytes) * 2 * layers_per_rank * moe_share * as_double(n);
  // DP: the gradients reduced once per step (ZeRO-1: reduce-scatter + all-gather, the same volume)
  const double grad_bytes = as_double(plan.memory.parameters) * stored;
  plan.comm.dp = ring_factor(p.dp) * grad_bytes;
  // PP: each micro-batch's activations out and gradients back (with the MTP embeddings), once per
  // chunk of the rank; the first micro-batch's forward and the last one's backward cross every
  // message hop of the layout (a V's bottom is a hand-over on one rank)
  const PipelineLayout layout = pipeline_layout(r);
  const double hop_bytes = mb_tokens * D * stored * as_double(1 + m.num_nextn_predict_layers);
  plan.comm.pp = p.pp > 1 ? 2 * hop_bytes * as_double(n * layout.chunks()) : 0;
  const int64_t message_hops = layout.stages() - 1 - (layout.v_shape ? 1 : 0);

  plan.time.tp = transfer_s(plan.comm.tp, p.tp, 1, hw);
  const double ep_s = transfer_s(plan.comm.ep, ep_group, 1, hw);
  plan.time.ep = p.overlap_a2a ? ep_s / 2 : ep_s;
  const double dp_s = transfer_s(plan.comm.dp, p.dp, p.tp, hw);
  const double last_backward_s = ideal_s * (2.0 / 3.0) / as_double(n);
  plan.time.dp = std::max(0.0, dp_s - last_backward_s);
  const int64_t pp_stride = p.tp * p.dp;
  plan.time.pp = p.pp > 1 ? 2 * as_double(message_hops) * transfer_s(hop_bytes, 2, pp_stride, hw) : 0;

  plan.tokens_per_s = step_tokens / plan.time.total();
  plan.mfu = flops / (plan.time.total() * devices * hw.peak_flops);
  return plan;
}

}  // namespace

RankMemory rank_memory(const Recipe& recipe, int pipeline_rank) {
  const ModelFacts facts = model_facts(recipe);
  return rank_memory(recipe, facts.groups, pipeline_split(recipe, facts.flops), pipeline_rank);
}

LayoutPlan plan_layout(const Recipe& recipe, const PlanHardware& hw) {
  return plan_with(recipe, model_facts(recipe), hw);
}

std::vector<LayoutPlan> plan_layouts(const Recipe& recipe, const PlanHardware& hw) {
  const ModelFacts facts = model_facts(recipe);
  std::vector<LayoutPlan> plans;
  const int64_t N = hw.devices;
  for (int64_t tp = 1; tp <= std::min(N, hw.devices_per_node); ++tp) {
    if (N % tp != 0) continue;
    for (int64_t pp = 1; pp <= N / tp; ++pp) {
      if ((N / tp) % pp != 0 || pp > recipe.model.num_hidden_layers) continue;
      const int64_t dp = N / tp / pp;
      const std::vector<ScheduleChoice> schedules = schedule_choices(pp, recipe.model.num_hidden_layers);
      std::vector<PipelineSplit> splits = {PipelineSplit::even};
      if (pp > 1) splits = {PipelineSplit::even, PipelineSplit::balanced};
      for (int64_t ep = 1; ep <= dp; ++ep) {
        if (dp % ep != 0) continue;
        // ep·tp must divide the experts (recipe validation says so too; such layouts are not listed)
        const int64_t experts = recipe.model.n_routed_experts;
        if (experts == 0 ? ep > 1 : experts % (ep * tp) != 0) continue;
        for (const auto& [schedule, split] : pairs(schedules, splits)) {
          Recipe r = recipe;
          r.parallel.world_size = 0;
          r.parallel.tp = tp;
          r.parallel.pp = pp;
          r.parallel.dp = dp;
          r.parallel.ep = ep;
          r.parallel.pp_schedule = schedule.schedule;
          r.parallel.pp_chunks = schedule.chunks;
          r.parallel.pp_split = split;
          r.parallel.sequence_parallel = tp > 1;  // what Megatron users run with TP
          LayoutPlan plan = plan_with(r, facts, hw);
          if (!plan.refused.empty() && r.parallel.sequence_parallel) {  // e.g. tokens not dividing by tp
            r.parallel.sequence_parallel = false;
            plan = plan_with(r, facts, hw);
          }
          plans.push_back(std::move(plan));
        }
      }
    }
  }
  std::stable_sort(plans.begin(), plans.end(), [](const LayoutPlan& a, const LayoutPlan& b) {
    const auto rank = [](const LayoutPlan& p) { return !p.refused.empty() ? 2 : p.fits ? 0 : 1; };
    if (rank(a) != rank(b)) return rank(a) < rank(b);
    if (rank(a) == 0) return a.time.total() < b.time.total();
    return a.memory.total() < b.memory.total();
  });
  return plans;
}

}  // namespace dsx
