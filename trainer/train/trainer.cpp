#include "trainer/train/trainer.h"

#include <fmt/core.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <csignal>
#include <fstream>
#include <optional>
#include <tuple>
#include <utility>

#include "kernels/device.h"
#include "kernels/error.h"
#include "parallel/launch_env.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/param_count.h"
#include "trainer/optim/distributed_optimizer.h"
#include "trainer/train/model_weights.h"
#include "trainer/train/schedule.h"
#include "trainer/train/stage_runner.h"
#include "trainer/train/stop_signals.h"

namespace dsx {
namespace {

RecomputePolicy recompute_policy(const TrainSection& t) {
  return {.rmsnorm = t.recomputes(RecomputeKind::rmsnorm),
          .mla_up_proj = t.recomputes(RecomputeKind::mla_up_proj),
          .moe_act = t.recomputes(RecomputeKind::moe_act),
          .full = t.recomputes(RecomputeKind::full)};
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

Trainer::Trainer(Recipe recipe, TrainerOptions options)
    : recipe_(std::move(recipe)),
      options_(std::move(options)),
      run_dir_(recipe_.logging.run_dir),
      checkpoint_root_(recipe_.checkpoint.dir),
      lr_schedule_(recipe_),
      batch_schedule_(recipe_) {
  // One GPU per local rank (the launcher's local rank; 0 for a single process), chosen before
  // the NCCL communicators are made on it.
  device_description_ = use_device(recipe_.model.device, read_launch_env().local_rank);
  parallel_ = start_train_parallel(recipe_);  // checks the world size before any work
  options_.console = options_.console && is_rank0();
  std::filesystem::create_directories(run_dir_);
  if (is_rank0()) std::ofstream(run_dir_ / "recipe.yaml") << to_yaml(recipe_);
  const ModelParallel model_parallel = parallel_ ? parallel_->model_parallel(recipe_) : ModelParallel{};
  model_ = std::make_unique<Model>(recipe_.model, recipe_.model.dtype, static_cast<uint64_t>(recipe_.train.seed),
                                   recompute_policy(recipe_.train), precision_policy(recipe_.precision), model_parallel,
                                   recipe_.model.device);
  if (parallel_) {
    MeshComms& c = parallel_->tensor_comms();  // gradients and parameters: NCCL for a GPU model
    const DistributedOptimizerOptions options{.zero1 = recipe_.parallel.zero >= 1,
                                              .owns_replicated = parallel_->mesh.coords.tp == 0};
    optimizer_ =
        std::make_unique<DistributedAdamW>(model_->parameters(), recipe_.optim, *c.dp, *c.edp, *c.world, options);
  } else {
    optimizer_ = std::make_unique<AdamW>(model_->parameters(), recipe_.optim);
  }
  if (recipe_.optim.ema_decay > 0) {
    ema_ = std::make_unique<WeightEma>(model_->parameters(), recipe_.optim.ema_decay,
                                       [this](const Parameter& p) { return writes_parameter(p); });
  }
  stage_runner_ = std::make_unique<StageRunner>(
      *model_, parallel_ && parallel_->mesh.sizes.pp > 1 ? parallel_->tensor_comms().pp.get() : nullptr,
      parallel_ ? &parallel_->timer : nullptr);
  model_->set_grad_ready_hook([this](Parameter& p) {
    if (!last_backward_) return;
    if (p.grad_partial_over_tp) {  // sequence parallelism: each TP rank's tokens gave a part (parameters.h)
      CommHandle h = parallel_->tensor_comms().tp->all_reduce(p.grad);
      timed_wait(h, &parallel_->timer);
    }
    optimizer_->grad_ready(p);
  });
  data_ = make_data_feed(recipe_, parallel_ ? parallel_->mesh.coords.dp : 0, dp_size());
  if (recipe_.logging.jsonl && is_rank0()) {
    metrics_log_ = std::make_unique<MetricsLog>((run_dir_ / "metrics.jsonl").string());
  }
  if (recipe_.logging.rank_logs && parallel_) {
    std::filesystem::create_directories(run_dir_ / "logs");
    const auto path = run_dir_ / "logs" / fmt::format("rank-{:05}.log", parallel_->world_rank());
    rank_log_ = std::make_unique<std::ofstream>(path, std::ios::app);
    if (!*rank_log_) throw UserError("logging.rank_logs: cannot open " + path.string() + " for appending");
    *rank_log_ << describe_launch(parallel_->launch) << ", mesh " << describe_mesh(parallel_->mesh.sizes) << '\n';
  }
  resume_if_requested();
}

Trainer::~Trainer() = default;

// checkpoint.resume: auto; every rank resumes from the same step.
std::optional<std::filesystem::path> Trainer::find_resume_checkpoint() {
  return newest_checkpoint_on_every_rank(checkpoint_root_, parallel_.get());
}

void Trainer::resume_if_requested() {
  const std::string& resume = recipe_.checkpoint.resume;
  if (resume == "auto") {
    if (auto dir = find_resume_checkpoint()) {
      restore_from(*dir);
      return;
    }
  } else if (resume != "never") {
    if (!ckpt::is_checkpoint_dir(resume)) {
      throw UserError("checkpoint.resume: " + resume + " is not a checkpoint directory (no manifest.json)");
    }
    restore_from(resume);
    return;
  }
  if (!recipe_.checkpoint.init_from.empty()) {  // the model tensors only (each rank its own shards), step 0
    const auto dir = load_model_weights(model_->parameters(), recipe_.checkpoint.init_from, "checkpoint.init_from");
    if (ema_) ema_->reset_to_current();  // the average starts from the weights the run starts from
    if (options_.console) fmt::print("initialised the model from {}\n", dir.string());
  }
}

void Trainer::restore_from(const std::filesystem::path& dir) {
  std::vector<ckpt::LoadRequest> requests;
  for (Parameter& p : model_->parameters()) requests.push_back(parameter_request(p));
  for (ckpt::LoadRequest& r : optimizer_->state_requests()) requests.push_back(std::move(r));
  // The EMA resumes from the checkpoint's; a checkpoint without one (the EMA turned on since)
  // starts it from the restored weights.
  const bool ema_stored = ema_ && !ema_->empty() && ckpt::CheckpointReader(dir).find(ema_->first_name()) != nullptr;
  if (ema_stored) {
    for (ckpt::LoadRequest& r : ema_->requests()) requests.push_back(std::move(r));
  }
  const ckpt::CheckpointState state = ckpt::load(dir, requests);
  if (ema_ && !ema_stored) {
    ema_->reset_to_current();
    if (options_.console && !ema_->empty())
      fmt::print("{} holds no weight EMA: it starts from its weights\n", dir.string());
  }
  step_ = state.step;
  tokens_ = state.metadata.at("tokens").get<int64_t>();
  optimizer_->set_steps_taken(state.metadata.at("optimizer_steps").get<int64_t>());
  data_->restore(state.metadata.at("data"));
  last_checkpoint_ = dir;
  last_saved_step_ = step_;
  if (options_.console) fmt::print("resumed from {} at step {}\n", dir.string(), step_);
}

// Each tensor element is written once: dense parameters by DP rank 0 (a tensor-parallel one's box
// by each TP rank, a replicated one by TP rank 0), an EP rank's experts by its EDP rank 0; the
// optimizer decides which moment ranges each rank writes.
bool Trainer::writes_parameter(const Parameter& p) const {
  if (!parallel_) return true;
  const MeshCoords& c = parallel_->mesh.coords;
  switch (p.spec.shard.axis) {
    case ShardAxis::expert:
      return c.edp == 0;
    case ShardAxis::tensor:
      return c.dp == 0;
    case ShardAxis::none:
      return c.dp == 0 && c.tp == 0;
  }
  return false;
}

std::filesystem::path Trainer::save_checkpoint(int64_t step) {
  std::vector<ckpt::TensorSlice> slices;
  for (Parameter& p : model_->parameters()) {
    if (writes_parameter(p)) slices.push_back(parameter_slice(p));
  }
  for (ckpt::TensorSlice& s : optimizer_->state_slices()) slices.push_back(std::move(s));
  if (ema_) {
    for (ckpt::TensorSlice& s : ema_->slices()) slices.push_back(std::move(s));
  }
  ckpt::CheckpointState state;
  state.step = step;
  state.metadata = {{"tokens", tokens_},
                    {"optimizer_steps", optimizer_->steps_taken()},
                    {"data", data_->state()},
                    {"init_seed", recipe_.train.seed}};
  state.recipe_yaml = to_yaml(recipe_);
  ckpt::SaveOptions save_options;
  save_options.keep_last = static_cast<int>(recipe_.checkpoint.keep_last);
  if (parallel_) {
    save_options.writer_index = parallel_->world_rank();
    save_options.n_writers = parallel_->world_size();
    save_options.barrier = [this] { parallel_->barrier(); };
    save_options.attempt_id = std::to_string(parallel_->broadcast_from_rank0(static_cast<int64_t>(::getpid())));
  }
  const auto dir = ckpt::save(checkpoint_root_, state, slices, save_options);
  last_checkpoint_ = dir;
  last_saved_step_ = step;
  return dir;
}

StepMetrics Trainer::train_step(int64_t step) {
  const int64_t global_batch = batch_schedule_.global_batch(tokens_);
  const double lr = lr_schedule_.lr(step, tokens_);
  std::vector<Batch> micro_batches = data_->next_step(global_batch);
  const auto n_micro = static_cast<int64_t>(micro_batches.size());
  // Every micro-batch weighs 1 / (micro-batches in the global batch), on every DP rank.
  const double micro_weight = 1.0 / static_cast<double>(n_micro * dp_size());
  const auto step_start = std::chrono::steady_clock::now();

  model_->parameters().zero_grad();
  StepMetrics m;
  double grad_norm = 0;
  // bf16 copies of the bf16-GEMM weights for this step's micro-batches, dropped before the
  // optimizer changes the values.
  std::optional<GemmWeightCopies> weight_copies;
  weight_copies.emplace(model_->parameters());
  const std::vector<Action> actions = step_schedule(n_micro);
  for (size_t i = 0; i < actions.size();) {
    const Action& a = actions[i];
    if (a.is_transfer()) {  // a run of transfers is one group (schedule.h)
      size_t end = i;
      while (end < actions.size() && actions[end].is_transfer()) ++end;
      stage_runner_->transfer(std::span(actions).subspan(i, end - i), micro_batches);
      i = end;
      continue;
    }
    switch (a.kind) {
      case Action::Kind::forward: {
        const Losses l =
            stage_runner_->forward(a.micro_batch, micro_batches[static_cast<size_t>(a.micro_batch)], a.chunk);
        m.loss += l.total * micro_weight;
        m.lm_loss += l.lm * micro_weight;
        m.mtp_loss += l.mtp * micro_weight;
        m.balance_loss += l.balance * micro_weight;
        break;
      }
      case Action::Kind::backward:  // gradients become final in the last one (each chunk's own parameters)
        last_backward_ = a.micro_batch == n_micro - 1;
        stage_runner_->backward(a.micro_batch, micro_weight, a.chunk);
        last_backward_ = false;
        break;
      case Action::Kind::backward_input:
        stage_runner_->backward_input(a.micro_batch, micro_weight, a.chunk);
        break;
      case Action::Kind::backward_weight:  // weight passes run in micro-batch order
        last_backward_ = a.micro_batch == n_micro - 1;
        stage_runner_->backward_weight(a.micro_batch, a.chunk);
        last_backward_ = false;
        break;
      case Action::Kind::optimizer_step:
        stage_runner_->finish_step();
        weight_copies.reset();
        grad_norm = optimizer_->step(lr);
        break;
      default:
        throw std::logic_error("the training schedule produced " + to_string(a));
    }
    ++i;
  }
  if (parallel_) {  // the losses of the whole global batch: every replica's, every stage's part
    std::array<double, 4> losses{m.loss, m.lm_loss, m.mtp_loss, m.balance_loss};
    parallel_->sum_over_dp_and_pp(losses);
    std::tie(m.loss, m.lm_loss, m.mtp_loss, m.balance_loss) = std::tuple(losses[0], losses[1], losses[2], losses[3]);
  }
  model_->update_router_biases(recipe_.model.bias_update_rate);
  if (ema_) ema_->update();  // after everything that changes the weights this step
  add_expert_load_metrics(m);
  synchronize_device(recipe_.model.device);  // the step's time includes its queued device work
  m.step_s = seconds_since(step_start);
  const DeviceMemoryStats memory = device_memory_stats(recipe_.model.device);
  m.device_peak_bytes = memory.peak_used_bytes;
  m.device_reserved_bytes = memory.reserved_bytes;
  reset_device_peak_memory(recipe_.model.device);
  if (parallel_) {
    m.exposed_comm_s = parallel_->timer.take_exposed() + optimizer_->take_exposed_comm_s();
    m.exposed_comm_fraction = m.step_s > 0 ? m.exposed_comm_s / m.step_s : 0;
    m.exposed_comm_by_stage = exposed_comm_by_stage(m.exposed_comm_fraction);
    m.moe_a2a_bytes = std::exchange(parallel_->timer.bytes_sent, 0);
  }
  tokens_ += global_batch * recipe_.train.seq_len;
  step_ = step + 1;
  m.step = step_;
  m.grad_norm = grad_norm;
  m.lr = lr;
  m.tokens = tokens_;
  return m;
}

// Per MoE layer: tokens per expert over the global batch (the loads the bias update used) and,
// with expert parallelism, how unevenly the EP ranks receive tokens.
void Trainer::add_expert_load_metrics(StepMetrics& m) const {
  const int64_t ep = recipe_.parallel.ep * recipe_.parallel.tp;  // the ranks the experts are split over
  for (const ExpertLoad& l : all_expert_loads()) {
    LayerLoad load{l.layer, static_cast<double>(l.min_tokens), static_cast<double>(l.max_tokens), l.cv, l.bias_spread};
    if (ep > 1) {
      const auto per_rank = static_cast<int64_t>(l.tokens_per_expert.size()) / ep;
      double max_rank = 0, sum = 0;
      for (int64_t p = 0; p < ep; ++p) {
        double received = 0;
        for (int64_t e = p * per_rank; e < (p + 1) * per_rank; ++e)
          received += static_cast<double>(l.tokens_per_expert[e]);
        max_rank = std::max(max_rank, received);
        sum += received;
      }
      load.ep_recv_max_over_mean = sum > 0 ? max_rank / (sum / static_cast<double>(ep)) : 0;
    }
    m.expert_load.push_back(load);
  }
}

// Each rank puts its share, divided by the ranks of a stage, at its stage's index; the sum over
// the world is every stage's mean.
std::vector<double> Trainer::exposed_comm_by_stage(double fraction) const {
  if (!parallel_ || parallel_->mesh.sizes.pp == 1) return {};
  const int stages = parallel_->mesh.sizes.pp;
  std::vector<double> by_stage(static_cast<size_t>(stages), 0.0);
  by_stage[static_cast<size_t>(parallel_->mesh.coords.pp)] =
      fraction / static_cast<double>(parallel_->world_size() / stages);
  parallel_->sum_over(*parallel_->comms.world, by_stage);
  return by_stage;
}

// The loads of every MoE layer: a pipeline stage holds only its own layers, so with PP each stage
// puts its rows [1 (present), min, max, cv, bias spread, tokens per expert...] at its layers'
// indices and the rows are summed over the pipeline group.
std::vector<ExpertLoad> Trainer::all_expert_loads() const {
  std::vector<ExpertLoad> local = model_->expert_load().layers;
  if (!parallel_ || parallel_->mesh.sizes.pp == 1) return local;
  const ModelConfig& c = recipe_.model;
  const int64_t layers = c.num_hidden_layers + c.num_nextn_predict_layers, experts = c.n_routed_experts;
  const int64_t width = 5 + experts;
  std::vector<double> rows(static_cast<size_t>(layers * width), 0.0);
  for (const ExpertLoad& l : local) {
    double* row = rows.data() + l.layer * width;
    row[0] = 1;
    row[1] = static_cast<double>(l.min_tokens);
    row[2] = static_cast<double>(l.max_tokens);
    row[3] = l.cv;
    row[4] = l.bias_spread;
    for (int64_t e = 0; e < experts; ++e) row[5 + e] = static_cast<double>(l.tokens_per_expert[e]);
  }
  parallel_->sum_over(*parallel_->comms.pp, rows);
  std::vector<ExpertLoad> all;
  for (int64_t layer = 0; layer < layers; ++layer) {
    const double* row = rows.data() + layer * width;
    if (row[0] == 0) continue;  // a dense layer
    ExpertLoad l{layer, static_cast<int64_t>(row[1]), static_cast<int64_t>(row[2]), row[3], row[4], {}};
    for (int64_t e = 0; e < experts; ++e) l.tokens_per_expert.push_back(static_cast<int64_t>(row[5 + e]));
    all.push_back(std::move(l));
  }
  return all;
}

// This stage's actions for a step of n micro-batches (parallel.pp_schedule).
std::vector<Action> Trainer::step_schedule(int64_t n) const {
  return stage_schedule(recipe_, n, model_->stage().index);
}

// The stage split and what the schedule's bubble costs at this step's micro-batches (forward 1,
// backward 2, transfers free; `dsx recipe schedule` draws it).
void Trainer::print_pipeline() const {
  const int64_t n = batch_schedule_.global_batch(tokens_) / (recipe_.train.micro_batch * dp_size());
  const ActionCosts costs{.forward = 1, .backward_input = 1, .backward_weight = 1};
  const PipelineRun run = run_recipe_step(recipe_, n, costs).run;
  const PipelineRun weighted = run_recipe_step(recipe_, n, costs, /*by_flops=*/true).run;
  fmt::print(
      "  pipeline: {}, {} micro-batches per step, bubble {:.1f}% on the clock ({:.1f}% with the stages weighted by "
      "model FLOPs, {} split)\n    {}\n",
      enum_name(recipe_.parallel.pp_schedule), n, 100 * run.bubble, 100 * weighted.bubble,
      enum_name(recipe_.parallel.pp_split),
      describe_pipeline(pipeline_split(recipe_), recipe_.model.num_nextn_predict_layers, pipeline_layout(recipe_)));
  if (recipe_.parallel.pp_split == PipelineSplit::even) {
    Recipe balanced = recipe_;
    balanced.parallel.pp_split = PipelineSplit::balanced;
    const PipelineRun better = run_recipe_step(balanced, n, costs, /*by_flops=*/true).run;
    if (better.makespan < weighted.makespan * 0.98) {  // worth saying: 2% or more of the step
      fmt::print("    parallel.pp_split: balanced would take {:.2f} of this step's time on the clock\n",
                 better.makespan / weighted.makespan);
    }
  }
}

TrainResult Trainer::run() {
  StopSignals signals;
  const int64_t total = total_steps(recipe_);
  const int64_t first = step_;
  if (options_.console) {
    const ParameterCounts counts = count_parameters(recipe_.model);
    fmt::print("dsx train: {} parameters ({} active per token, {} MTP), {} steps from step {}\n", counts.total,
               counts.active, counts.mtp, total, first);
    fmt::print("  device: {}\n  data: {}\n  run dir: {}\n", device_description_, data_->describe(), run_dir_.string());
    if (parallel_) {
      fmt::print("  layout: {} (zero {}, overlap_a2a {}), launched by {}\n", describe_mesh(parallel_->mesh.sizes),
                 recipe_.parallel.zero, recipe_.parallel.overlap_a2a, parallel_->launch.launcher);
      if (parallel_->mesh.sizes.pp > 1) print_pipeline();
    }
  }
  auto run_start = std::chrono::steady_clock::now();
  auto interval_start = run_start;
  int64_t interval_tokens = 0;
  double last_loss = 0;
  int64_t ran = 0;
  // A signal may reach the ranks at different steps: they stop together, at the first step
  // boundary where any of them has seen it.
  const auto stop_requested = [this] {
    return parallel_ ? parallel_->any_rank(StopSignals::stop_requested()) : StopSignals::stop_requested();
  };
  while (step_ < total && !stop_requested()) {
    const int64_t tokens_before = tokens_;
    StepMetrics m = train_step(step_);
    ++ran;
    interval_tokens += tokens_ - tokens_before;
    last_loss = m.loss;
    m.total_steps = total;
    m.elapsed_s = seconds_since(run_start);
    const double interval_s = seconds_since(interval_start);
    m.tokens_per_s = interval_s > 0 ? static_cast<double>(interval_tokens) / interval_s : 0;
    m.eta_s = m.elapsed_s / static_cast<double>(ran) * static_cast<double>(total - step_);
    if (recipe_.logging.peak_flops > 0) {  // peak_flops is one device's; tokens/s the whole job's
      const int devices = parallel_ ? parallel_->world_size() : 1;
      m.mfu = model_->flops_per_token() * m.tokens_per_s / (recipe_.logging.peak_flops * devices);
    }
    const bool log_now = step_ % recipe_.logging.interval == 0 || step_ == total || step_ == first + 1;
    if (log_now) {
      if (options_.console) fmt::print("{}\n", console_line(m));
      if (rank_log_) *rank_log_ << console_line(m) << std::endl;
      if (metrics_log_) metrics_log_->write(m);
      interval_start = std::chrono::steady_clock::now();
      interval_tokens = 0;
    }
    if (options_.on_step) options_.on_step(m);
    const bool stop_here = options_.stop_after_steps > 0 && ran >= options_.stop_after_steps;
    if (recipe_.checkpoint.interval > 0 && (step_ % recipe_.checkpoint.interval == 0 || step_ == total || stop_here)) {
      save_checkpoint(step_);
    }
    if (stop_here) break;
  }
  if (stop_requested() && last_saved_step_ != step_) {
    save_checkpoint(step_);
    if (options_.console) fmt::print("stopped by signal at step {}; checkpoint saved\n", step_);
  }
  std::fflush(stdout);
  return {first, step_, last_loss, run_dir_, last_checkpoint_};
}

}  // namespace dsx
