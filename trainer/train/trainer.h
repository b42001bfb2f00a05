// The training loop (the orchestrator, llm.c style: read it top to bottom).
//
//   for each step:
//     lr, global batch  <- schedules(step, tokens consumed)
//     micro-batches     <- data feed (this data-parallel rank's share of the global batch)
//     actions           <- gradient-accumulation schedule, or 1F1B for this pipeline stage
//     run actions: forward / backward per micro-batch (MoE layers exchange tokens over the EP
//                  group; pipeline stages pass activations and their gradients; during the last
//                  backward the optimizer starts reducing gradient buckets as they complete),
//                  then the optimizer step
//     router biases     <- aux-loss-free update from this step's expert loads (summed over DP)
//     metrics, checkpoint
//
// Multi-rank (`mpirun -np N dsx train RECIPE`): every rank runs this same loop; the loss is
// scaled by 1 / (micro-batches per rank · DP) so that gradients summed over the DP group are the
// single-process gradients of the same global batch. Rank 0 prints and writes metrics.jsonl;
// every rank writes its shards of each checkpoint.
//
// The run directory holds the resolved recipe (recipe.yaml), metrics.jsonl and checkpoints/.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "trainer/model/model.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/optim/optimizer.h"
#include "trainer/optim/weight_ema.h"
#include "trainer/recipe/recipe.h"
#include "trainer/train/data_feed.h"
#include "trainer/train/metrics.h"
#include "trainer/train/schedule.h"
#include "trainer/train/stage_runner.h"
#include "trainer/train/train_parallel.h"

namespace dsx {

struct TrainerOptions {
  bool console = true;           // print progress lines
  int64_t stop_after_steps = 0;  // > 0: stop (with a checkpoint) after this many steps of this process
  std::function<void(const StepMetrics&)> on_step;  // called after every step (tests, tools)
};

struct TrainResult {
  int64_t first_step = 0;  // step the run started from (0, or the resumed checkpoint's)
  int64_t last_step = 0;   // steps completed at the end
  double final_loss = 0;
  std::filesystem::path run_dir;
  std::optional<std::filesystem::path> last_checkpoint;
};

class Trainer {
 public:
  Trainer(Recipe recipe, TrainerOptions options = {});
  ~Trainer();
  TrainResult run();

  Model& model() { return *model_; }
  bool is_rank0() const { return !parallel_ || parallel_->world_rank() == 0; }

 private:
  void resume_if_requested();
  std::filesystem::path save_checkpoint(int64_t step);
  void restore_from(const std::filesystem::path& dir);
  StepMetrics train_step(int64_t step);
  std::optional<std::filesystem::path> find_resume_checkpoint();
  bool writes_parameter(const Parameter& p) const;
  int dp_size() const { return parallel_ ? parallel_->mesh.sizes.dp : 1; }
  void add_expert_load_metrics(StepMetrics& m) const;
  std::vector<ExpertLoad> all_expert_loads() const;
  // Pipeline parallelism: every stage's share of the step blocked on communication (the mean
  // over its ranks), from this rank's; empty without pipeline stages. A collective over the world.
  std::vector<double> exposed_comm_by_stage(double fraction) const;
  void print_pipeline() const;
  std::vector<Action> step_schedule(int64_t n_micro_batches) const;

  Recipe recipe_;
  TrainerOptions options_;
  std::unique_ptr<TrainParallel> parallel_;  // null: one process; destroyed after the model
  std::string device_description_;           // "cpu" or "cuda:0 <name> (...)", for the banner
  std::filesystem::path run_dir_;
  std::filesystem::path checkpoint_root_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<Optimizer> optimizer_;
  std::unique_ptr<WeightEma> ema_;             // optim.ema_decay > 0: the average of the weights this rank writes
  std::unique_ptr<StageRunner> stage_runner_;  // runs the schedule's actions on the model
  bool last_backward_ = false;                 // the step's last micro-batch backward is running
  std::unique_ptr<DataFeed> data_;
  std::unique_ptr<MetricsLog> metrics_log_;
  std::unique_ptr<std::ofstream> rank_log_;  // logging.rank_logs: this rank's own step lines
  LrSchedule lr_schedule_;
  BatchSchedule batch_schedule_;
  int64_t step_ = 0;    // completed steps
  int64_t tokens_ = 0;  // tokens consumed
  std::optional<std::filesystem::path> last_checkpoint_;
  int64_t last_saved_step_ = -1;  // step of last_checkpoint_
};

}  // namespace dsx
