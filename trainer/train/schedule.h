// A training step is a list of actions produced by a schedule (ARCHITECTURE.md principle 5):
// visible data, not control flow hidden in the loop. Single-rank gradient accumulation is the
// trivial schedule; 1F1B, zero-bubble and DualPipeV are the pipeline-parallel ones (ARCHITECTURE.md §4d).
//
// Transfers between stages are actions too. The loop posts each run of consecutive transfer
// actions as one group without waiting (NCCL: one ncclGroupStart/End on the communicator's
// stream, so a stage's send to its successor and its receive from it do not wait on each other;
// MPI: non-blocking sends and receives). A compute action waits for the receives it consumes
// (a forward for its activations, a backward for its gradients); sends are released once done,
// all of them before the optimizer step. On NCCL a stage's groups complete in posting order (one
// communication stream) and sends pair with receives by order; on MPI each transfer completes by
// itself, matched by tag; either way a transfer completes once its counterpart has been posted.
// run_pipeline checks a set of per-stage schedules for deadlock under either rule (TransferRule).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/model/pipeline_stage.h"
#include "trainer/recipe/recipe.h"

namespace dsx {

struct Action {
  enum class Kind {
    forward,
    backward_input,
    backward_weight,
    backward,         // backward_input then backward_weight
    send_activation,  // the stage's output to stage `peer` (= stage + 1)
    recv_activation,  // the previous stage's output, from `peer` (= stage - 1)
    send_grad,        // the gradient of the stage's input to `peer` (= stage - 1)
    recv_grad,        // the gradient of the stage's output, from `peer` (= stage + 1)
    // MTP under pipeline parallelism: Emb(shifted tokens) from the first stage travels with the
    // activations to the last one, their gradients back with the activations' gradients
    // (trainer/model/pipeline_stage.h); the stages between pass them on.
    send_mtp_embedding,
    recv_mtp_embedding,
    send_mtp_grad,
    recv_mtp_grad,
    optimizer_step
  };
  Kind kind;
  int64_t micro_batch = -1;  // -1 for step-level actions
  int stage = 0;             // the pipeline rank running the action (0 without PP)
  int peer = -1;             // transfers: the other rank
  // which of the rank's model chunks (PipelineLayout, trainer/model/pipeline_stage.h): 0, 1 for the
  // second chunk of a V-shaped layout, 0..v-1 of an interleaved one; a transfer's is the chunk of
  // this rank that computes what it sends or consumes what it receives
  int chunk = 0;
  // transfers: the peer's chunk where it differs (an interleaved layout's turn, from the last
  // rank's chunk c to the first rank's chunk c + 1), else -1: the same chunk on both sides
  int peer_chunk = -1;

  bool is_transfer() const;
  bool is_send() const;
  int other_chunk() const { return peer_chunk < 0 ? chunk : peer_chunk; }  // the peer's chunk
  bool operator==(const Action&) const = default;
};

// "F3", "B3", "W3", "SA3>1" (send to stage 1), "OPT" ...; chunk 1's: "F3'", "SA3'>0"; a transfer
// to or from another chunk of the peer names it: "SA3>0'" (chunk 0 to the peer's chunk 1)
std::string to_string(const Action& a);
std::string to_string(const std::vector<Action>& actions);  // space-separated

// Forward then backward for each micro-batch in turn (input and weight gradients together,
// accumulating), then one optimizer step.
std::vector<Action> gradient_accumulation_schedule(int64_t n_micro_batches);

// 1F1B (PipeDream-Flush, as Megatron-LM's default schedule) for `stage` of `stages`: warm-up
// forwards (stages - stage - 1 of them, at most n), then one forward and one backward in turn,
// then the remaining backwards, then the optimizer step. At most stages - stage micro-batches are
// in flight on a stage, which bounds its stored activations. mtp: the model has MTP modules, so
// every activation transfer comes with one of the MTP embeddings (and every gradient transfer
// with theirs). With one stage this is gradient_accumulation_schedule.
std::vector<Action> one_f_one_b_schedule(int64_t n_micro_batches, int stages, int stage, bool mtp);

// Zero-bubble (the B/W split of Qi et al., "Zero Bubble Pipeline Parallelism"): 1F1B with each
// backward split into its input pass (B: the gradient the previous stage waits for, sent at once)
// and its weight pass (W, which nobody waits for). A stage runs its W's where it would otherwise
// wait: after posting the receives of its next forward or backward and before that compute. The
// weights see their micro-batches in order, so the gradients are bit-identical to 1F1B's.
// On the clock (F = B = W): 4 stages × 8 micro-batches take 30 units against 1F1B's 33.
std::vector<Action> zero_bubble_schedule(int64_t n_micro_batches, int stages, int stage, bool mtp);

// DualPipeV (DeepSeek's DualPipe folded into a V, trainer/model/pipeline_stage.h): P ranks run
// 2P stages, rank r chunk 0 (stage r) and chunk 1 (stage 2P-1-r). Every micro-batch goes down
// through the chunks 0 and back up through the chunks 1. A rank's compute order, in phases
// (F0/F1 forwards of chunk 0/1, B backwards, W weight passes):
//   2(P-r-1) F0 | r+1 × (F0 F1) | P-r-1 × (B1 W F1) | n-2P+r+1 × (F0 B1 F1 B0)
//   | P-r-1 × (B1 F1 B0) | r+1 × (B1 B0) | P-r-1 × (W B0) | r+1 × W
// where the backwards before a W (and those of the second half of the (B1 B0) phase) are input
// passes whose weight passes run at the W's, oldest first. In the steady phase a forward of one
// chunk sits next to a backward of the other: DualPipe overlaps the pair's compute with the
// other's all-to-all (on one CPU thread they run one after the other). Each chunk sees its
// micro-batches in order, so the gradients are bit-identical to one process's. Transfers: after
// each compute, its sends and the receives of the next compute that needs any go out as one
// group. Needs n >= 2P (throws std::invalid_argument otherwise).
std::vector<Action> dualpipev_schedule(int64_t n_micro_batches, int ranks, int rank);

// Interleaved 1F1B (Megatron-LM's virtual pipeline, Narayanan et al. 2021) for rank `rank` of
// `ranks`, each holding `chunks` model chunks (PipelineLayout{ranks, false, chunks}). The k-th
// forward of a rank runs chunk (k / P) mod v on micro-batch (k / (P·v))·P + k mod P: rounds of P
// micro-batches through chunk 0, then the same round through chunk 1, ...; the k-th backward
// the same with the chunks in reverse. Warm-up: min(n·v, 2(P - r - 1) + (v - 1)·P) forwards,
// then one forward and one backward in turn, then the remaining backwards. A micro-batch's
// forward crosses the pipeline v times, each time a v-th of a stage per rank, so the bubble is
// (P - 1)(F + B)/v against 1F1B's (P - 1)(F + B); the price is v times the transfers, and rank 0
// holding up to P·v + P - 1 chunk micro-batches, 1 + (P - 1)/(P·v) times 1F1B's activations.
// Transfers go by unit, as Megatron batches them: a warm-up forward, a steady forward with the
// backward after it, or a cool-down backward is a unit, and after each unit one group posts its
// sends and the next unit's receives (the first unit's receives come first). So a steady
// forward's output leaves after the backward beside it; posting it at once, as
// dualpipev_schedule does, would hold back a neighbour's group on one in-order stream (NCCL)
// and deadlock from two rounds on. This way it runs in order and independently (MPI), at the
// makespan above. mtp: the MTP embeddings travel with the activations. Needs n a multiple of P
// (throws std::invalid_argument otherwise); with one rank it is gradient accumulation over the
// v chunks.
std::vector<Action> interleaved_1f1b_schedule(int64_t n_micro_batches, int ranks, int rank, int chunks, bool mtp);

// The recipe's layout: parallel.pp ranks, V-shaped for dualpipev, parallel.pp_chunks per rank for
// interleaved_1f1b.
PipelineLayout pipeline_layout(const Recipe& recipe);
// Decoder layers per stage of that layout (parallel.pp_split at train.seq_len).
std::vector<int64_t> pipeline_split(const Recipe& recipe);
// The same from the model's module FLOPs computed once (module_flops_per_token at train.seq_len).
std::vector<int64_t> pipeline_split(const Recipe& recipe, const ModuleFlops& flops);
// Each stage's model FLOPs per token under that split, relative to the mean stage's.
std::vector<double> relative_stage_flops(const Recipe& recipe);
std::vector<double> relative_stage_flops(const ModuleFlops& flops, const std::vector<int64_t>& split);

// Stage `stage`'s actions for n micro-batches under the recipe's parallel.pp and
// parallel.pp_schedule (1f1b, interleaved_1f1b, zero_bubble, dualpipev); gradient accumulation
// for one stage;
// throws dsx::UserError for a pipeline schedule not built.
std::vector<Action> stage_schedule(const Recipe& recipe, int64_t n_micro_batches, int stage);

// How a stage's transfer groups complete. in_order: one after another (one communication stream,
// the NCCL communicator's), so a receive that waits holds back every group posted after it; and
// as NCCL pairs sends with receives by their order per pair of ranks (no tags), the sends from
// one stage to another must be posted in the order the other posts their receives (run_pipeline
// reports the first pair where they are not, as stuck).
// independent: each transfer completes once its counterpart is posted (non-blocking MPI, which
// matches by tag). A set of schedules that runs in_order runs independent too.
enum class TransferRule { in_order, independent };

// How long each compute action takes, for run_pipeline's timeline (transfers take no time).
struct ActionCosts {
  double forward = 1, backward_input = 1, backward_weight = 1;  // fused backward = the two
  // per rank and chunk, a factor on those (stages of unequal cost); empty: 1 everywhere
  std::vector<std::vector<double>> scale = {};
};

struct ComputeSpan {
  double start = 0, end = 0;
  Action action;
};

struct PipelineRun {
  std::string stuck;                               // "" when every stage ran to its end, else where they wait
  double makespan = 0;                             // when the last stage finished
  double bubble = 0;                               // idle share of stages × makespan
  std::vector<std::vector<ComputeSpan>> timeline;  // per stage, its compute actions in order
};

// The most micro-batches a schedule holds between their forward and the end of their backward
// (what bounds a stage's stored activations).
int64_t max_in_flight(const std::vector<Action>& actions);
// The same with each micro-batch weighted by its chunk's chunk_weights[chunk] (e.g. the bytes a
// chunk's forward keeps until its backward): the most held at once.
double max_held(const std::vector<Action>& actions, const std::vector<double>& chunk_weights);

// One line per stage, one character per `unit` of time: the micro-batch's last digit while a
// forward runs, a letter for a backward (a = 0, b = 1, ..., wrapping after z; upper case for a
// weight pass), '.' idle.
std::string draw_timeline(const PipelineRun& run, double unit = 1.0);

// Runs the stages' schedules against each other under the loop's transfer rule (above; a send
// completes only when its receive has started: rendezvous, the strictest case). Returns "" when
// every stage runs to its end with every transfer complete, else where each stage is stuck.
std::string pipeline_runs_to_completion(const std::vector<std::vector<Action>>& schedules,
                                        TransferRule rule = TransferRule::in_order);

// The same run on a clock: each compute action takes its cost, transfers none; a compute starts
// when the stage is free and the receives it consumes are complete.
PipelineRun run_pipeline(const std::vector<std::vector<Action>>& schedules, const ActionCosts& costs = {},
                         TransferRule rule = TransferRule::in_order);

// Every rank's stage_schedule for one step of n micro-batches under the recipe, and their run
// on the clock. stage_costs: a whole 1F1B stage's (a V-shaped rank's chunks are half a stage
// each, so their actions cost half); transfers follow the rule of the recipe's communicator
// (independent on MPI, device: cpu, for the layouts with several chunks per rank: dualpipev,
// whose transfers need it from 3 ranks on, and interleaved_1f1b; in order otherwise, as the NCCL
// stream runs them). by_flops: each stage's costs scaled by its
// share of the model FLOPs (relative_stage_flops), so an unbalanced split shows; else every
// stage costs the same.
struct RecipeStep {
  std::vector<std::vector<Action>> schedules;  // per rank
  PipelineRun run;
};
RecipeStep run_recipe_step(const Recipe& recipe, int64_t n_micro_batches, const ActionCosts& stage_costs,
                           bool by_flops = false);
// The same with each stage's cost factor given (relative_stage_flops; empty: every stage 1).
RecipeStep run_recipe_step(const Recipe& recipe, int64_t n_micro_batches, const ActionCosts& stage_costs,
                           const std::vector<double>& relative_stage_costs);

}  // namespace dsx
