// A training step is a list of actions produced by a schedule (ARCHITECTURE.md principle 5):
// visible data, not control flow hidden in the loop. Single-rank gradient accumulation is the
// trivial schedule; 1F1B and zero-bubble are the pipeline-parallel ones (ARCHITECTURE.md §4d).
//
// Transfers between stages are actions too. The loop posts each run of consecutive transfer
// actions as one group without waiting (NCCL: one ncclGroupStart/End on the communicator's
// stream, so a stage's send to its successor and its receive from it do not wait on each other;
// MPI: non-blocking sends and receives). A compute action waits for the receives it consumes
// (a forward for its activations, a backward for its gradients); sends are released once done,
// all of them before the optimizer step. A stage's groups complete in posting order (one
// communication stream), and a transfer completes once its counterpart's group has started.
// run_pipeline checks a set of per-stage schedules for deadlock under exactly that rule.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

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
  int stage = 0;             // the pipeline stage running the action (0 without PP)
  int peer = -1;             // transfers: the other stage

  bool is_transfer() const;
  bool is_send() const;
  bool operator==(const Action&) const = default;
};

std::string to_string(const Action& a);                     // "F3", "B3", "W3", "SA3>1" (send to stage 1), "OPT" ...
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

// Stage `stage`'s actions for n micro-batches under the recipe's parallel.pp and
// parallel.pp_schedule (1f1b, zero_bubble); gradient accumulation for one stage; throws
// dsx::UserError for a pipeline schedule not built.
std::vector<Action> stage_schedule(const Recipe& recipe, int64_t n_micro_batches, int stage);

// How long each compute action takes, for run_pipeline's timeline (transfers take no time).
struct ActionCosts {
  double forward = 1, backward_input = 1, backward_weight = 1;  // fused backward = the two
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

// One line per stage, one character per `unit` of time: the micro-batch's last digit while a
// forward runs, a letter for a backward (a = 0, b = 1, ..., wrapping after z; upper case for a
// weight pass), '.' idle.
std::string draw_timeline(const PipelineRun& run, double unit = 1.0);

// Runs the stages' schedules against each other under the loop's transfer rule (above; a send
// completes only when its receive has started: rendezvous, the strictest case). Returns "" when
// every stage runs to its end with every transfer complete, else where each stage is stuck.
std::string pipeline_runs_to_completion(const std::vector<std::vector<Action>>& schedules);
// The same run on a clock: each compute action takes its cost, transfers none; a compute starts
// when the stage is free and the receives it consumes are complete.
PipelineRun run_pipeline(const std::vector<std::vector<Action>>& schedules, const ActionCosts& costs = {});

}  // namespace dsx
