// The GRPO stage (`dsx grpo`): an optional supervised warm-up on a built-in task, then
// reinforcement learning with Group Relative Policy Optimization (DeepSeekMath; DeepSeek-R1),
// generating with the policy's own weights, in one process or data-parallel
// (`mpirun -np N dsx grpo RECIPE` with parallel.dp = N: each rank generates, scores and trains
// on N-th of every step's prompt groups and the result is the single process's; see "data
// parallelism" in the .cpp). Read top to bottom:
//
//   [sft]    grpo.sft_steps steps of cross entropy on the task's reference completions
//   evaluate held-out accuracy
//   for each step:
//     prompts    <- grpo.prompts_per_step from the task generator or the JSONL prompt set
//     rollouts   <- G = grpo.group_size completions per prompt (Generator), with log π_old
//     rewards    <- weighted sum of grpo.rewards (built-in verifiers, external programs)
//     [DAPO]     drop groups whose rewards are all equal; refill with fresh prompts
//     advantages <- per-group normalisation (grpo.scale_rewards)
//     [β > 0]    log π_ref from the frozen reference model (refreshed every N steps)
//     μ times:   policy_update (clipped ratio objective, grpo | dapo | dr_grpo) + AdamW
//     metrics, evaluation, checkpoint
//
// The run directory holds recipe.yaml, metrics.jsonl (one object per SFT log line, GRPO step and
// evaluation, each with a "phase") and checkpoints/: the SFT result as step 0 (so a resumed run
// continues GRPO without repeating the warm-up, and other runs can start from it with
// grpo.init_checkpoint), every checkpoint.interval steps (0 = none) and the last step. A
// checkpoint holds the policy, the AdamW moments, the reference model (β > 0) and the prompt
// position; checkpoint.resume auto continues from the newest one.
#pragma once
#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "data/tokenizer.h"
#include "trainer/grpo/policy_update.h"
#include "trainer/grpo/rewards.h"
#include "trainer/model/model.h"
#include "trainer/recipe/recipe.h"

namespace dsx::grpo {

struct GrpoStepMetrics {
  int64_t step = 0;  // 1-based: GRPO steps completed
  int64_t total_steps = 0;
  double lr = 0;
  // rollouts (every group generated this step, dropped ones included)
  int64_t prompts = 0, completions = 0;
  double reward_mean = 0, reward_std = 0;
  std::map<std::string, MeanStd> per_reward;  // unweighted scores per reward function
  double accuracy = 0;                        // fraction of completions whose answer matches
  double zero_spread_fraction = 0;            // groups whose rewards are all equal
  int64_t groups_trained = 0;                 // groups in the update (after dynamic sampling)
  int64_t generation_rounds = 0;
  double length_mean = 0;
  int64_t length_min = 0, length_max = 0;
  double truncated_fraction = 0;  // completions that hit max_completion_length
  // update (averaged over the μ optimizer steps)
  double loss = 0, grad_norm = 0, kl = 0, entropy = 0;
  double clip_low = 0, clip_high = 0;
  double max_abs_log_ratio = 0;  // first update of the step: |log π − log π_old| (generator vs training)
  // throughput and time split
  double generation_tokens_per_s = 0, training_tokens_per_s = 0;
  double rollout_s = 0, reward_s = 0, train_s = 0;
  double elapsed_s = 0, eta_s = 0;
};

struct EvalMetrics {
  int64_t step = 0;  // GRPO steps completed when evaluated (0 = before GRPO)
  int64_t prompts = 0, samples = 0;
  double accuracy = 0;     // mean over prompts and samples
  double format_rate = 0;  // completions in the <think>…</think><answer>…</answer> format
  double reward_mean = 0;  // the weighted total of grpo.rewards
  double length_mean = 0;
  double seconds = 0;
};

struct SftMetrics {
  int64_t step = 0, total_steps = 0;
  double loss = 0, lr = 0, tokens_per_s = 0, elapsed_s = 0, eta_s = 0;
};

nlohmann::json to_json(const GrpoStepMetrics& m);
nlohmann::json to_json(const EvalMetrics& m);
nlohmann::json to_json(const SftMetrics& m);
std::string console_line(const GrpoStepMetrics& m);
std::string console_line(const EvalMetrics& m);
std::string console_line(const SftMetrics& m);

struct GrpoOptions {
  bool console = true;
  std::function<void(const GrpoStepMetrics&)> on_step;
  std::function<void(const EvalMetrics&)> on_eval;
};

struct GrpoResult {
  double sft_loss = 0;             // last SFT step's loss (0 without SFT)
  std::vector<EvalMetrics> evals;  // in order: before GRPO, every interval, after the last step
  int64_t steps = 0;               // GRPO steps completed
  std::filesystem::path run_dir;
  std::optional<std::filesystem::path> last_checkpoint;
};

class GrpoTrainer {
 public:
  // UserError for a recipe without a prompt source (grpo.task / grpo.prompts) or one this build
  // cannot run (CUDA; layouts other than data parallelism are refused by recipe validation).
  // With parallel.dp > 1 (under mpirun/srun) every rank constructs it: MPI starts here.
  explicit GrpoTrainer(Recipe recipe, GrpoOptions options = {});
  ~GrpoTrainer();
  GrpoTrainer(const GrpoTrainer&) = delete;
  GrpoTrainer& operator=(const GrpoTrainer&) = delete;

  GrpoResult run();

  // The pieces run() calls, public for tests.
  double sft(int64_t steps);  // returns the last step's loss
  EvalMetrics evaluate();
  GrpoStepMetrics step();
  Model& model() { return *model_; }
  const data::Tokenizer& tokenizer() const;
  // True in one process and on world rank 0 of a data-parallel run (the rank that prints).
  bool is_rank0() const;

 private:
  struct State;
  std::unique_ptr<State> s_;
  Model* model_ = nullptr;  // owned by s_
};

}  // namespace dsx::grpo
