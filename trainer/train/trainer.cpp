#include "trainer/train/trainer.h"

#include <fmt/core.h>

#include <chrono>
#include <csignal>
#include <fstream>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/model/param_count.h"
#include "trainer/train/schedule.h"

namespace dsx {
namespace {

volatile std::sig_atomic_t g_stop_requested = 0;
extern "C" void request_stop(int) { g_stop_requested = 1; }

// Ctrl-C / SIGTERM (what Slurm sends before a time limit) ends the run after the current step
// with a checkpoint, instead of losing the work since the last one.
class StopSignals {
 public:
  StopSignals() {
    g_stop_requested = 0;
    old_int_ = std::signal(SIGINT, request_stop);
    old_term_ = std::signal(SIGTERM, request_stop);
  }
  ~StopSignals() {
    std::signal(SIGINT, old_int_);
    std::signal(SIGTERM, old_term_);
  }
  StopSignals(const StopSignals&) = delete;
  StopSignals& operator=(const StopSignals&) = delete;

 private:
  void (*old_int_)(int);
  void (*old_term_)(int);
};

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
  if (recipe_.model.device != Device::cpu) {
    throw UserError("model.device: cuda needs the CUDA backend, which this build does not have");
  }
  if (recipe_.parallel.pp * recipe_.parallel.dp * recipe_.parallel.tp != 1) {
    throw UserError("parallel: this build trains in a single process; set parallel.pp, dp and tp to 1");
  }
  std::filesystem::create_directories(run_dir_);
  std::ofstream(run_dir_ / "recipe.yaml") << to_yaml(recipe_);
  model_ = std::make_unique<Model>(recipe_.model, recipe_.model.dtype, static_cast<uint64_t>(recipe_.train.seed),
                                   recompute_policy(recipe_.train), precision_policy(recipe_.precision));
  optimizer_ = std::make_unique<AdamW>(model_->parameters(), recipe_.optim);
  data_ = make_data_feed(recipe_, 0, 1);
  if (recipe_.logging.jsonl) metrics_log_ = std::make_unique<MetricsLog>((run_dir_ / "metrics.jsonl").string());
  resume_if_requested();
}

Trainer::~Trainer() = default;

void Trainer::resume_if_requested() {
  const std::string& resume = recipe_.checkpoint.resume;
  if (resume == "never") return;
  if (resume == "auto") {
    if (auto dir = ckpt::latest(checkpoint_root_, {.remove_stale = true})) restore_from(*dir);
    return;
  }
  if (!ckpt::is_checkpoint_dir(resume)) {
    throw UserError("checkpoint.resume: " + resume + " is not a checkpoint directory (no manifest.json)");
  }
  restore_from(resume);
}

void Trainer::restore_from(const std::filesystem::path& dir) {
  std::vector<ckpt::LoadRequest> requests;
  for (Parameter& p : model_->parameters()) requests.push_back({p.spec.name, p.value.shape(), {}, p.value});
  for (const auto& s : optimizer_->state_tensors()) {
    requests.push_back({s.name, s.tensor->shape(), {}, *s.tensor});
  }
  const ckpt::CheckpointState state = ckpt::load(dir, requests);
  step_ = state.step;
  tokens_ = state.metadata.at("tokens").get<int64_t>();
  optimizer_->set_steps_taken(state.metadata.at("optimizer_steps").get<int64_t>());
  data_->restore(state.metadata.at("data"));
  last_checkpoint_ = dir;
  last_saved_step_ = step_;
  if (options_.console) fmt::print("resumed from {} at step {}\n", dir.string(), step_);
}

std::filesystem::path Trainer::save_checkpoint(int64_t step) {
  std::vector<ckpt::TensorSlice> slices;
  for (Parameter& p : model_->parameters()) slices.push_back({p.spec.name, p.value.shape(), {}, p.value});
  for (const auto& s : optimizer_->state_tensors()) slices.push_back({s.name, s.tensor->shape(), {}, *s.tensor});
  ckpt::CheckpointState state;
  state.step = step;
  state.metadata = {{"tokens", tokens_},
                    {"optimizer_steps", optimizer_->steps_taken()},
                    {"data", data_->state()},
                    {"init_seed", recipe_.train.seed}};
  state.recipe_yaml = to_yaml(recipe_);
  ckpt::SaveOptions save_options;
  save_options.keep_last = static_cast<int>(recipe_.checkpoint.keep_last);
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

  model_->parameters().zero_grad();
  StepMetrics m;
  double grad_norm = 0;
  for (const Action& a : gradient_accumulation_schedule(n_micro)) {
    switch (a.kind) {
      case Action::Kind::forward: {
        const Losses l = model_->forward(micro_batches[static_cast<size_t>(a.micro_batch)]);
        m.loss += l.total / static_cast<double>(n_micro);
        m.lm_loss += l.lm / static_cast<double>(n_micro);
        m.mtp_loss += l.mtp / static_cast<double>(n_micro);
        m.balance_loss += l.balance / static_cast<double>(n_micro);
        break;
      }
      case Action::Kind::backward: model_->backward(1.0 / static_cast<double>(n_micro)); break;
      case Action::Kind::optimizer_step: grad_norm = optimizer_->step(lr); break;
      default: throw std::logic_error("single-process schedule produced " + to_string(a));
    }
  }
  for (const ExpertLoad& l : model_->expert_load().layers) {
    m.expert_load.push_back({l.layer, static_cast<double>(l.min_tokens), static_cast<double>(l.max_tokens), l.cv,
                             l.bias_spread});
  }
  model_->update_router_biases(recipe_.model.bias_update_rate);
  tokens_ += global_batch * recipe_.train.seq_len;
  step_ = step + 1;
  m.step = step_;
  m.grad_norm = grad_norm;
  m.lr = lr;
  m.tokens = tokens_;
  return m;
}

TrainResult Trainer::run() {
  StopSignals signals;
  const int64_t total = total_steps(recipe_);
  const int64_t first = step_;
  if (options_.console) {
    const ParameterCounts counts = count_parameters(recipe_.model);
    fmt::print("dsx train: {} parameters ({} active per token, {} MTP), {} steps from step {}\n", counts.total,
               counts.active, counts.mtp, total, first);
    fmt::print("  data: {}\n  run dir: {}\n", data_->describe(), run_dir_.string());
  }
  auto run_start = std::chrono::steady_clock::now();
  auto interval_start = run_start;
  int64_t interval_tokens = 0;
  double last_loss = 0;
  int64_t ran = 0;
  while (step_ < total && !g_stop_requested) {
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
    if (recipe_.logging.peak_flops > 0) {
      m.mfu = model_->flops_per_token() * m.tokens_per_s / recipe_.logging.peak_flops;
    }
    const bool log_now = step_ % recipe_.logging.interval == 0 || step_ == total || step_ == first + 1;
    if (log_now) {
      if (options_.console) fmt::print("{}\n", console_line(m));
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
  if (g_stop_requested && last_saved_step_ != step_) {
    save_checkpoint(step_);
    if (options_.console) fmt::print("stopped by signal at step {}; checkpoint saved\n", step_);
  }
  std::fflush(stdout);
  return {first, step_, last_loss, run_dir_, last_checkpoint_};
}

}  // namespace dsx
