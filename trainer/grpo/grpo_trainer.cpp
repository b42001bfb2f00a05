#include "trainer/grpo/grpo_trainer.h"

#include <fmt/core.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <csignal>
#include <fstream>
#include <limits>
#include <numbers>
#include <numeric>
#include <tuple>

#include "data/prompts.h"
#include "data/tokenizer.h"
#include "kernels/error.h"
#include "kernels/random.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/grpo/addition_task.h"
#include "trainer/grpo/generate.h"
#include "trainer/model/param_count.h"
#include "trainer/optim/distributed_optimizer.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/optim/optimizer.h"
#include "trainer/train/model_weights.h"
#include "trainer/train/stop_signals.h"
#include "trainer/train/train_parallel.h"

namespace dsx::grpo {
namespace {

// Philox streams of the stage's random choices.
constexpr uint64_t kRolloutSeedStream = random::stream_of("dsx.grpo.rollout_seed");  // + step
constexpr uint64_t kEvalSeedStream = random::stream_of("dsx.grpo.eval_seed");
constexpr uint64_t kShuffleStream = random::stream_of("dsx.grpo.debug_shuffle");  // + step

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

uint64_t seed_of(uint64_t seed, uint64_t stream, uint64_t counter) {
  const auto w = random::philox_words(seed, stream, counter);
  return static_cast<uint64_t>(w.v[1]) << 32 | w.v[0];
}

RecomputePolicy recompute_policy(const TrainSection& t) {
  return {.rmsnorm = t.recomputes(RecomputeKind::rmsnorm),
          .mla_up_proj = t.recomputes(RecomputeKind::mla_up_proj),
          .moe_act = t.recomputes(RecomputeKind::moe_act),
          .full = t.recomputes(RecomputeKind::full)};
}

CombinedReward build_rewards(const GrpoSection& g) {
  CombinedReward combined;
  for (const GrpoReward& r : g.rewards) {
    std::unique_ptr<Reward> reward;
    if (!r.command.empty()) {
      reward = std::make_unique<ExternalReward>(r.name, r.command, r.timeout_s);
    } else if (r.name == "answer_match") {
      reward = std::make_unique<AnswerMatchReward>();
    } else if (r.name == "format") {
      reward = std::make_unique<FormatReward>();
    } else if (r.name == "overlong_penalty") {
      reward = std::make_unique<OverlongPenaltyReward>(g.max_completion_length, g.overlong_cache);
    } else {
      throw UserError(fmt::format("grpo.rewards: `{}` is not a built-in reward and has no command", r.name));
    }
    combined.add(std::move(reward), r.weight);
  }
  return combined;
}

// Warm-up over the first tenth, then a half cosine down to a tenth of the peak.
double sft_lr(double peak, int64_t step, int64_t total) {
  const double warmup = std::max<double>(1.0, static_cast<double>(total) / 10.0);
  const auto t = static_cast<double>(step);
  if (t < warmup) return peak * (t + 1) / warmup;
  const double progress = std::min(1.0, (t - warmup) / std::max(1.0, static_cast<double>(total) - warmup));
  return peak * (0.1 + 0.9 * 0.5 * (1.0 + std::cos(std::numbers::pi * progress)));
}

// The completion's text without a final EOS. A model whose vocabulary is larger than the
// tokenizer's can sample ids the tokenizer does not know: they become U+FFFD, so no verifier
// accepts them as text.
std::string completion_text(const data::Tokenizer& tok, std::span<const int32_t> tokens) {
  if (!tokens.empty() && static_cast<int64_t>(tokens.back()) == tok.eos_id()) tokens = tokens.first(tokens.size() - 1);
  const auto vocab = static_cast<int64_t>(tok.vocab_size());
  std::string text;
  std::vector<data::TokenId> run;
  for (const int32_t id : tokens) {
    if (id >= 0 && id < vocab) {
      run.push_back(static_cast<data::TokenId>(id));
      continue;
    }
    text += tok.decode(run);
    run.clear();
    text += "\xEF\xBF\xBD";
  }
  return text + tok.decode(run);
}

}  // namespace

// One prompt with its G completions and their scores.
struct Group {
  data::Prompt prompt;
  std::vector<int32_t> prompt_tokens;
  std::vector<Completion> completions;
  std::vector<double> rewards;  // weighted totals
  bool zero_spread = false;
};

struct GrpoTrainer::State {
  // Data parallelism (null in one process). Declared first: destroyed after the model and the
  // optimizer, which hold its communicators.
  std::unique_ptr<TrainParallel> parallel;
  Recipe recipe;
  GrpoOptions options;
  std::filesystem::path run_dir, checkpoint_root;
  std::optional<AdditionTask> task;
  std::optional<data::Tokenizer> file_tokenizer;
  std::optional<data::PromptLoader> loader;
  int64_t task_prompts_consumed = 0;
  std::vector<data::Prompt> eval_prompts;
  std::unique_ptr<Model> model, reference;
  std::unique_ptr<Optimizer> optimizer;  // AdamW, or DistributedAdamW under data parallelism
  CombinedReward rewards;
  AnswerMatchReward accuracy;
  std::unique_ptr<LrSchedule> lr_schedule;
  std::unique_ptr<std::ofstream> jsonl;
  int64_t step = 0;  // GRPO steps completed
  bool resumed = false;
  std::optional<std::filesystem::path> last_checkpoint;
  int64_t last_saved_step = -1;

  const data::Tokenizer& tokenizer() const { return task ? task->tokenizer() : *file_tokenizer; }
  int32_t pad_id() const { return tokenizer().pad_id() >= 0 ? static_cast<int32_t>(tokenizer().pad_id()) : 0; }
  const GrpoSection& g() const { return recipe.grpo; }

  void log(const nlohmann::json& j) {
    if (!jsonl) return;
    *jsonl << j.dump() << '\n';
    jsonl->flush();
  }

  // ---- data parallelism ----------------------------------------------------------------------
  //
  // `mpirun -np N dsx grpo` with parallel.dp = N: every rank holds the whole model and runs the
  // same loop on its share of each step. DP rank r owns the step's prompt groups
  // [r·P/N, (r+1)·P/N) of every generation round (validation: N divides grpo.prompts_per_step),
  // a prompt and its G completions always on one rank, so rewards and group advantages need no
  // communication. What the single process computes over the whole step is summed over the DP
  // group instead: the normalisers of the loss aggregation (sequences, tokens), the kept-group
  // counts of dynamic sampling, the batch reward std of scale_rewards: batch, and every metric.
  // Gradients are summed by the pre-training DistributedAdamW (ZeRO-1 included), whose update
  // keeps the replicas equal. The SFT warm-up runs whole on every rank (a short, identical
  // computation; its router-load sums over DP are N equal counts, which leave the sign-based
  // bias update unchanged).

  int dp_rank() const { return parallel ? parallel->mesh.coords.dp : 0; }
  int dp_size() const { return parallel ? parallel->mesh.sizes.dp : 1; }
  bool is_rank0() const { return !parallel || parallel->world_rank() == 0; }
  void sum_over_dp(std::span<double> values) {
    if (parallel) parallel->sum_over_dp(values);
  }
  // Every DP rank's `values`, rank after rank (a sum of zero-padded slots: exact).
  std::vector<double> gather_over_dp(std::span<const double> values) {
    const size_t n = values.size();
    std::vector<double> all(n * static_cast<size_t>(dp_size()), 0.0);
    std::copy(values.begin(), values.end(), all.begin() + static_cast<std::ptrdiff_t>(n * dp_rank()));
    sum_over_dp(all);
    return all;
  }
  // A signal may reach the ranks at different steps: they stop together at the first check
  // where any of them has seen one. Every rank must call this at the same points.
  bool stop_requested() {
    return parallel ? parallel->any_rank(StopSignals::stop_requested()) : StopSignals::stop_requested();
  }
  // The rollout metrics over every generated completion of the step (dropped groups included),
  // summed over the DP ranks: the single process's values up to the order of the sums. Returns
  // the step's generated tokens over all ranks.
  double add_rollout_metrics(const std::vector<Group>& generated, int64_t generated_tokens, GrpoStepMetrics& m) {
    const std::vector<RewardSample> samples = reward_samples(generated);
    const RewardScores scores = rewards.score(samples);
    const std::vector<double> correct = accuracy.score(samples);
    const size_t n_rewards = scores.names.size();
    // [completions, groups, zero-spread groups, truncated, length sum, generated tokens,
    //  correct answers, Σ total reward, Σ each reward]
    std::vector<double> sums(8 + n_rewards, 0.0);
    sums[0] = static_cast<double>(samples.size());
    sums[1] = static_cast<double>(generated.size());
    int64_t length_min = std::numeric_limits<int64_t>::max(), length_max = 0;
    for (const Group& grp : generated) {
      sums[2] += grp.zero_spread;
      for (const Completion& c : grp.completions) {
        const auto n = static_cast<int64_t>(c.tokens.size());
        sums[3] += c.finish == FinishReason::length;
        sums[4] += static_cast<double>(n);
        length_min = std::min(length_min, n);
        length_max = std::max(length_max, n);
      }
    }
    sums[5] = static_cast<double>(generated_tokens);
    sums[6] = std::accumulate(correct.begin(), correct.end(), 0.0);
    sums[7] = std::accumulate(scores.total.begin(), scores.total.end(), 0.0);
    for (size_t k = 0; k < n_rewards; ++k)
      sums[8 + k] = std::accumulate(scores.per_reward[k].begin(), scores.per_reward[k].end(), 0.0);
    sum_over_dp(sums);
    const double n = sums[0];
    // Standard deviations in two passes like mean_std (rewards.h): squared deviations from the step's means.
    std::vector<double> squares(1 + n_rewards, 0.0);
    const auto add_squares = [&](const std::vector<double>& values, double mean, double& out) {
      for (double v : values) out += (v - mean) * (v - mean);
    };
    add_squares(scores.total, sums[7] / n, squares[0]);
    for (size_t k = 0; k < n_rewards; ++k) add_squares(scores.per_reward[k], sums[8 + k] / n, squares[1 + k]);
    sum_over_dp(squares);
    m.reward_mean = sums[7] / n;
    m.reward_std = std::sqrt(squares[0] / n);
    for (size_t k = 0; k < n_rewards; ++k)
      m.per_reward[scores.names[k]] = {sums[8 + k] / n, std::sqrt(squares[1 + k] / n)};
    m.accuracy = sums[6] / n;
    m.completions = static_cast<int64_t>(n);
    m.prompts = static_cast<int64_t>(sums[1]);
    m.zero_spread_fraction = sums[2] / sums[1];
    m.truncated_fraction = sums[3] / n;
    m.length_mean = sums[4] / n;
    const std::array<double, 2> extremes{static_cast<double>(length_min), static_cast<double>(length_max)};
    const std::vector<double> all = gather_over_dp(extremes);
    m.length_min = std::numeric_limits<int64_t>::max();
    m.length_max = 0;
    for (size_t r = 0; r < all.size(); r += 2) {
      m.length_min = std::min(m.length_min, static_cast<int64_t>(all[r]));
      m.length_max = std::max(m.length_max, static_cast<int64_t>(all[r + 1]));
    }
    return sums[5];
  }

  // Sample standard deviation (n − 1) of the step's rewards given this rank's share, in two
  // passes like group_advantages' own.
  double step_sample_std(const std::vector<double>& rewards) {
    std::array<double, 2> sums{std::accumulate(rewards.begin(), rewards.end(), 0.0),
                               static_cast<double>(rewards.size())};
    sum_over_dp(sums);
    if (sums[1] < 2) return 0.0;
    const double mean = sums[0] / sums[1];
    std::array<double, 1> squares{0.0};
    for (double r : rewards) squares[0] += (r - mean) * (r - mean);
    sum_over_dp(squares);
    return std::sqrt(squares[0] / (sums[1] - 1));
  }

  std::unique_ptr<Optimizer> make_optimizer() {
    if (!parallel) return std::make_unique<AdamW>(model->parameters(), recipe.optim);
    MeshComms& c = parallel->comms;
    return std::make_unique<DistributedAdamW>(model->parameters(), recipe.optim, *c.dp, *c.edp, *c.world,
                                              DistributedOptimizerOptions{.zero1 = recipe.parallel.zero >= 1});
  }

  // ---- prompts -------------------------------------------------------------------------------

  // This rank's first group of a round, in the round's order over all ranks.
  int64_t first_group() const { return dp_rank() * (g().prompts_per_step / dp_size()); }

  // This rank's prompts of the next round: its slice of the round's grpo.prompts_per_step.
  // Every rank advances through the same prompt stream (the task's counter, the loader's global
  // sample position), so the state saved by rank 0 resumes on any number of ranks.
  std::vector<data::Prompt> next_prompts() {
    if (task) {
      std::vector<data::Prompt> out;
      const int64_t share = g().prompts_per_step / dp_size();
      for (int64_t i = 0; i < share; ++i) out.push_back(task->train_prompt(task_prompts_consumed + first_group() + i));
      task_prompts_consumed += g().prompts_per_step;
      return out;
    }
    return loader->next().prompts;
  }

  nlohmann::json prompt_state() const {
    if (task) return {{"task_prompts_consumed", task_prompts_consumed}};
    return {{"loader", nlohmann::json::parse(loader->state().to_json())}};
  }

  void restore_prompt_state(const nlohmann::json& j, const std::filesystem::path& dir) {
    if (task) {
      task_prompts_consumed = j.at("task_prompts_consumed").get<int64_t>();
      return;
    }
    loader->restore(data::PromptLoaderState::from_json(j.at("loader").dump(), dir.string()));
  }

  std::vector<int32_t> prompt_tokens(const data::Prompt& p) const {
    std::vector<int32_t> ids = encode_prompt(tokenizer(), p.prompt);
    const auto limit = recipe.model.max_position_embeddings - g().max_completion_length;
    if (static_cast<int64_t>(ids.size()) > limit) {
      throw UserError(
          fmt::format("grpo.prompts: prompt {} of {} has {} tokens; with grpo.max_completion_length {} "
                      "it exceeds model.max_position_embeddings ({})",
                      p.index, g().prompts.empty() ? "the task" : g().prompts, ids.size(), g().max_completion_length,
                      recipe.model.max_position_embeddings));
    }
    return ids;
  }

  SamplingParams sampling(double temperature) const {
    SamplingParams p;
    p.temperature = temperature;
    p.top_k = g().top_k;
    p.top_p = g().top_p;
    p.max_new_tokens = g().max_completion_length;
    p.eos_token_id = static_cast<int32_t>(tokenizer().eos_id());
    return p;
  }

  std::vector<RewardSample> reward_samples(const std::vector<Group>& groups) const {
    std::vector<RewardSample> samples;
    for (const Group& grp : groups) {
      for (const Completion& c : grp.completions) {
        RewardSample s;
        s.prompt = grp.prompt.prompt;
        s.completion = completion_text(tokenizer(), c.tokens);
        s.answer = grp.prompt.answer;
        s.extra_json = grp.prompt.extra_json.empty() ? "{}" : grp.prompt.extra_json;
        s.completion_tokens = static_cast<int64_t>(c.tokens.size());
        samples.push_back(std::move(s));
      }
    }
    return samples;
  }

  // ---- checkpoints ---------------------------------------------------------------------------

  // What this rank writes: the replicated policy and reference by rank 0, the AdamW moments as
  // the optimizer lays them out (1-D ranges of the flattened tensors, as in pre-training: one
  // process writes them whole, ZeRO-1 ranks their shards), so any layout resumes any other.
  std::vector<ckpt::TensorSlice> save_slices() {
    std::vector<ckpt::TensorSlice> out;
    if (is_rank0()) {
      for (Parameter& p : model->parameters()) out.push_back(parameter_slice(p));
      if (reference) {
        for (Parameter& p : reference->parameters()) out.push_back(parameter_slice(p, "reference."));
      }
    }
    for (ckpt::TensorSlice& sl : optimizer->state_slices()) out.push_back(std::move(sl));
    return out;
  }

  // What this rank reads back: the whole policy and reference, its own moments.
  std::vector<ckpt::LoadRequest> load_requests() {
    std::vector<ckpt::LoadRequest> out;
    for (Parameter& p : model->parameters()) out.push_back(parameter_request(p));
    if (reference) {
      for (Parameter& p : reference->parameters()) out.push_back(parameter_request(p, "reference."));
    }
    for (ckpt::LoadRequest& r : optimizer->state_requests()) out.push_back(std::move(r));
    return out;
  }

  // checkpoint.resume: auto; every rank resumes from the same step.
  std::optional<std::filesystem::path> latest_checkpoint() {
    return newest_checkpoint_on_every_rank(checkpoint_root, parallel.get());
  }

  std::filesystem::path save(double sft_loss) {
    ckpt::CheckpointState state;
    state.step = step;
    state.metadata = {{"phase", "grpo"},
                      {"optimizer_steps", optimizer->steps_taken()},
                      {"prompts", prompt_state()},
                      {"sft_loss", sft_loss},
                      {"init_seed", recipe.train.seed}};
    state.recipe_yaml = to_yaml(recipe);
    ckpt::SaveOptions options;
    options.keep_last = static_cast<int>(recipe.checkpoint.keep_last);
    if (parallel) {
      options.writer_index = parallel->world_rank();
      options.n_writers = parallel->world_size();
      options.barrier = [this] { parallel->barrier(); };
      options.attempt_id = std::to_string(parallel->broadcast_from_rank0(static_cast<int64_t>(::getpid())));
    }
    const auto s = save_slices();
    last_checkpoint = ckpt::save(checkpoint_root, state, s, options);
    last_saved_step = step;
    return *last_checkpoint;
  }

  // Returns the SFT loss recorded in the checkpoint.
  double restore(const std::filesystem::path& dir) {
    const ckpt::CheckpointState state = ckpt::load(dir, load_requests());
    if (state.metadata.value("phase", "") != "grpo") {
      throw UserError(
          fmt::format("checkpoint.resume: {} is not a GRPO checkpoint (no \"phase\": \"grpo\"); use "
                      "grpo.init_checkpoint to start from a pre-training checkpoint",
                      dir.string()));
    }
    step = state.step;
    optimizer->set_steps_taken(state.metadata.at("optimizer_steps").get<int64_t>());
    restore_prompt_state(state.metadata.at("prompts"), dir);
    last_checkpoint = dir;
    last_saved_step = step;
    resumed = true;
    return state.metadata.value("sft_loss", 0.0);
  }

  void copy_policy_into_reference() {
    for (Parameter& p : reference->parameters()) p.value.copy_from(model->parameters().at(p.spec.name).value);
  }
};

GrpoTrainer::GrpoTrainer(Recipe recipe, GrpoOptions options) : s_(std::make_unique<State>()) {
  State& s = *s_;
  s.recipe = std::move(recipe);
  s.options = std::move(options);
  const Recipe& r = s.recipe;
  const GrpoSection& g = r.grpo;
  if (!g.enabled()) {
    throw UserError("grpo: the recipe has no prompt source; set grpo.task (addition) or grpo.prompts (a JSONL file)");
  }
  if (r.model.device != Device::cpu) {
    throw UserError(
        "model.device: dsx grpo runs on the CPU only for now (its generator is host code); set model.device: cpu");
  }
  s.parallel = start_train_parallel(r);  // checks the world size against parallel.dp before any work
  s.options.console = s.options.console && s.is_rank0();
  s.run_dir = r.logging.run_dir;
  s.checkpoint_root = r.checkpoint.dir;
  std::filesystem::create_directories(s.run_dir);
  if (s.is_rank0()) std::ofstream(s.run_dir / "recipe.yaml") << to_yaml(r);

  if (g.task == GrpoTask::addition) {
    s.task.emplace(AdditionTaskConfig{.digits = g.addition.digits,
                                      .direct_fraction = g.addition.direct_fraction,
                                      .seed = static_cast<uint64_t>(r.data.seed)});
    if (s.is_rank0()) std::ofstream(s.run_dir / "tokenizer.json") << AdditionTask::tokenizer_json();
    if (g.eval.count > 0 && g.eval.prompts.empty()) s.eval_prompts = s.task->heldout_prompts(g.eval.count);
  } else {
    s.file_tokenizer.emplace(data::Tokenizer::load(r.data.tokenizer));
    auto set = std::make_shared<const data::PromptSet>(data::PromptSet::load(g.prompts));
    s.loader.emplace(set, data::PromptLoaderConfig{.global_batch = g.prompts_per_step,
                                                   .dp_rank = s.dp_rank(),
                                                   .dp_size = s.dp_size(),
                                                   .seed = static_cast<uint64_t>(g.seed)});
  }
  if (g.eval.count > 0 && !g.eval.prompts.empty()) {
    const data::PromptSet held_out = data::PromptSet::load(g.eval.prompts);
    if (static_cast<int64_t>(held_out.size()) < g.eval.count) {
      throw UserError(fmt::format("grpo.eval.count: {} prompts requested but `{}` holds {}", g.eval.count,
                                  g.eval.prompts, held_out.size()));
    }
    for (int64_t i = 0; i < g.eval.count; ++i) s.eval_prompts.push_back(held_out[static_cast<size_t>(i)]);
  }

  // Under DP the MoE layers sum their router loads over the DP group before the bias update.
  const ModelParallel model_parallel = s.parallel ? s.parallel->model_parallel(r) : ModelParallel{};
  s.model = std::make_unique<Model>(r.model, r.model.dtype, static_cast<uint64_t>(r.train.seed),
                                    recompute_policy(r.train), precision_policy(r.precision), model_parallel);
  model_ = s.model.get();
  if (!g.init_checkpoint.empty()) load_model_weights(s.model->parameters(), g.init_checkpoint, "grpo.init_checkpoint");
  s.rewards = build_rewards(g);
  s.lr_schedule = std::make_unique<LrSchedule>(r);
  if (r.logging.jsonl && s.is_rank0())
    s.jsonl = std::make_unique<std::ofstream>(s.run_dir / "metrics.jsonl", std::ios::app);
}

GrpoTrainer::~GrpoTrainer() = default;

const data::Tokenizer& GrpoTrainer::tokenizer() const {
  return s_->tokenizer();
}

bool GrpoTrainer::is_rank0() const {
  return s_->is_rank0();
}

// ---- supervised warm-up ------------------------------------------------------------------------

double GrpoTrainer::sft(int64_t steps) {
  State& s = *s_;
  const GrpoSection& g = s.g();
  if (!s.task) throw UserError("grpo.sft_steps: supervised steps need a built-in task (grpo.task)");
  AdamW optimizer(s.model->parameters(), s.recipe.optim);
  const auto start = Clock::now();
  auto interval_start = start;
  int64_t interval_tokens = 0;
  double loss = 0;
  // Every DP rank runs the whole warm-up (see "data parallelism" above).
  for (int64_t step = 0; step < steps && !s.stop_requested(); ++step) {
    std::vector<SftSequence> seqs;
    int64_t width = 0;
    for (int64_t i = 0; i < g.sft_batch; ++i) {
      seqs.push_back(s.task->sft_sequence(step * g.sft_batch + i));
      width = std::max(width, static_cast<int64_t>(seqs.back().tokens.size()) - 1);
    }
    std::vector<int32_t> inputs(static_cast<size_t>(g.sft_batch * width), s.pad_id());
    std::vector<int32_t> targets(inputs.size(), static_cast<int32_t>(OutputHead::kIgnoreIndex));
    for (int64_t b = 0; b < g.sft_batch; ++b) {
      const SftSequence& q = seqs[static_cast<size_t>(b)];
      for (size_t p = 0; p + 1 < q.tokens.size(); ++p) {
        inputs[static_cast<size_t>(b * width) + p] = q.tokens[p];
        // loss only on the completion: position p predicts token p + 1
        if (static_cast<int64_t>(p) + 1 >= q.prompt_tokens)
          targets[static_cast<size_t>(b * width) + p] = q.tokens[p + 1];
      }
    }
    Batch batch;
    batch.inputs = Tensor::from<int32_t>(std::span<const int32_t>(inputs), {g.sft_batch, width});
    batch.targets = Tensor::from<int32_t>(std::span<const int32_t>(targets), {g.sft_batch, width});
    s.model->parameters().zero_grad();
    const Losses l = s.model->forward(batch);
    s.model->backward(1.0);
    const double lr = sft_lr(g.sft_lr, step, steps);
    optimizer.step(lr);
    s.model->update_router_biases(s.recipe.model.bias_update_rate);
    loss = l.total;
    interval_tokens += g.sft_batch * width;

    const int64_t done = step + 1;
    if (done % s.recipe.logging.interval == 0 || done == steps || done == 1) {
      SftMetrics m;
      m.step = done;
      m.total_steps = steps;
      m.loss = l.total;
      m.lr = lr;
      m.tokens_per_s = static_cast<double>(interval_tokens) / std::max(1e-9, seconds_since(interval_start));
      m.elapsed_s = seconds_since(start);
      m.eta_s = m.elapsed_s / static_cast<double>(done) * static_cast<double>(steps - done);
      if (s.options.console) fmt::print("{}\n", console_line(m));
      s.log(to_json(m));
      interval_start = Clock::now();
      interval_tokens = 0;
    }
  }
  std::fflush(stdout);
  return loss;
}

// ---- evaluation --------------------------------------------------------------------------------

EvalMetrics GrpoTrainer::evaluate() {
  State& s = *s_;
  const GrpoSection& g = s.g();
  const auto start = Clock::now();
  std::vector<Group> groups;
  std::vector<GenerationRequest> requests;
  // DP rank r evaluates held-out prompts [r·C/N, (r+1)·C/N); the sums are reduced over the ranks.
  const auto count = static_cast<int64_t>(s.eval_prompts.size());
  const int64_t begin = count * s.dp_rank() / s.dp_size(), end = count * (s.dp_rank() + 1) / s.dp_size();
  for (auto i = static_cast<size_t>(begin); i < static_cast<size_t>(end); ++i) {
    Group grp;
    grp.prompt = s.eval_prompts[i];
    grp.prompt_tokens = s.prompt_tokens(grp.prompt);
    for (int64_t k = 0; k < g.eval.samples; ++k) {
      // The same seeds at every evaluation: accuracy changes come from the policy alone.
      const uint64_t counter = static_cast<uint64_t>(i) * static_cast<uint64_t>(g.eval.samples) + k;
      requests.push_back({grp.prompt_tokens, seed_of(static_cast<uint64_t>(g.seed), kEvalSeedStream, counter)});
    }
    groups.push_back(std::move(grp));
  }
  Generator generator(*s.model, &s.tokenizer());
  std::vector<Completion> completions;
  if (!requests.empty()) completions = generator.generate(requests, s.sampling(g.eval.temperature));
  for (size_t i = 0; i < groups.size(); ++i)
    for (int64_t k = 0; k < g.eval.samples; ++k)
      groups[i].completions.push_back(std::move(completions[i * static_cast<size_t>(g.eval.samples) + k]));

  const std::vector<RewardSample> samples = s.reward_samples(groups);
  const auto sum_of = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0); };
  double length = 0;
  for (const RewardSample& x : samples) length += static_cast<double>(x.completion_tokens);
  std::array<double, 5> sums{sum_of(s.accuracy.score(samples)), sum_of(FormatReward().score(samples)),
                             sum_of(s.rewards.score(samples).total), length, static_cast<double>(samples.size())};
  s.sum_over_dp(sums);
  const double n = sums[4];
  EvalMetrics m;
  m.step = s.step;
  m.prompts = count;
  m.samples = g.eval.samples;
  m.accuracy = n > 0 ? sums[0] / n : 0.0;
  m.format_rate = n > 0 ? sums[1] / n : 0.0;
  m.reward_mean = n > 0 ? sums[2] / n : 0.0;
  m.length_mean = n > 0 ? sums[3] / n : 0.0;
  m.seconds = seconds_since(start);
  if (s.options.console) fmt::print("{}\n", console_line(m));
  s.log(to_json(m));
  if (s.options.on_eval) s.options.on_eval(m);
  std::fflush(stdout);
  return m;
}

// ---- one GRPO step -----------------------------------------------------------------------------

GrpoStepMetrics GrpoTrainer::step() {
  State& s = *s_;
  const GrpoSection& g = s.g();
  if (!s.optimizer) s.optimizer = s.make_optimizer();
  if (g.beta > 0 && !s.reference) {
    s.reference = std::make_unique<Model>(s.recipe.model, s.recipe.model.dtype, 0, RecomputePolicy{},
                                          precision_policy(s.recipe.precision));
    s.copy_policy_into_reference();
  } else if (s.reference && g.ref_refresh_interval > 0 && s.step > 0 && s.step % g.ref_refresh_interval == 0) {
    s.copy_policy_into_reference();
  }
  GrpoStepMetrics m;
  m.lr = s.lr_schedule->lr(s.step, 0);

  // Rollouts: G completions per prompt; with dynamic sampling, fresh prompts refill dropped groups.
  // Under DP this rank generates its groups of each round; a request's Philox seed is keyed by
  // its index in the round over all ranks ((first group + g)·G + k), so the ranks together sample
  // exactly the single process's completions.
  const auto rollout_start = Clock::now();
  std::vector<Group> generated, kept;
  int64_t kept_total = 0;  // groups kept so far, over every rank
  int64_t generated_tokens = 0;
  double generation_s = 0, reward_s = 0;
  const int64_t rounds = g.dynamic_sampling ? 1 + g.resample_rounds : 1;
  const auto first_request = static_cast<uint64_t>(s.first_group() * g.group_size);
  Generator generator(*s.model, &s.tokenizer());
  for (int64_t round = 0; round < rounds; ++round) {
    std::vector<Group> groups;
    std::vector<GenerationRequest> requests;
    for (data::Prompt& p : s.next_prompts()) {
      Group grp;
      grp.prompt = std::move(p);
      grp.prompt_tokens = s.prompt_tokens(grp.prompt);
      for (int64_t k = 0; k < g.group_size; ++k) {
        const uint64_t counter = (static_cast<uint64_t>(round) << 32) | (first_request + requests.size());
        requests.push_back({grp.prompt_tokens, seed_of(static_cast<uint64_t>(g.seed),
                                                       kRolloutSeedStream + static_cast<uint64_t>(s.step), counter)});
      }
      groups.push_back(std::move(grp));
    }
    const auto gen_start = Clock::now();
    std::vector<Completion> completions = generator.generate(requests, s.sampling(g.temperature));
    generation_s += seconds_since(gen_start);
    generated_tokens += generator.last_stats().generated_tokens;
    for (size_t i = 0; i < groups.size(); ++i)
      for (int64_t k = 0; k < g.group_size; ++k)
        groups[i].completions.push_back(std::move(completions[i * static_cast<size_t>(g.group_size) + k]));

    const auto reward_start = Clock::now();
    const RewardScores scores = s.rewards.score(s.reward_samples(groups));
    reward_s += seconds_since(reward_start);
    const std::vector<bool> flat_zero = zero_spread_groups(scores.total, g.group_size);
    std::vector<Group> kept_now;
    for (size_t i = 0; i < groups.size(); ++i) {
      const auto first = scores.total.begin() + static_cast<std::ptrdiff_t>(i * g.group_size);
      groups[i].rewards.assign(first, first + g.group_size);
      groups[i].zero_spread = flat_zero[i];
      if (!g.dynamic_sampling || !groups[i].zero_spread) kept_now.push_back(groups[i]);
    }
    // The step trains the first grpo.prompts_per_step kept groups in generation order (round,
    // then rank, then group): this rank's kept groups are numbered after every earlier round's
    // and every lower rank's of this round.
    const std::array<double, 1> kept_here{static_cast<double>(kept_now.size())};
    const std::vector<double> kept_per_rank = s.gather_over_dp(kept_here);
    auto index = kept_total +
                 static_cast<int64_t>(std::accumulate(kept_per_rank.begin(), kept_per_rank.begin() + s.dp_rank(), 0.0));
    for (Group& grp : kept_now)
      if (index++ < g.prompts_per_step) kept.push_back(std::move(grp));
    kept_total += static_cast<int64_t>(std::accumulate(kept_per_rank.begin(), kept_per_rank.end(), 0.0));
    generated.insert(generated.end(), std::make_move_iterator(groups.begin()), std::make_move_iterator(groups.end()));
    m.generation_rounds = round + 1;
    if (kept_total >= g.prompts_per_step) break;
  }
  m.groups_trained = std::min(kept_total, g.prompts_per_step);
  const double step_generated_tokens = s.add_rollout_metrics(generated, generated_tokens, m);
  // throughput of the step's tokens over this rank's generation time (the ranks generate at once)
  m.generation_tokens_per_s = generation_s > 0 ? step_generated_tokens / generation_s : 0.0;
  m.reward_s = reward_s;
  m.rollout_s = seconds_since(rollout_start) - reward_s;

  // Advantages and the update.
  const auto train_start = Clock::now();
  std::vector<Rollout> rollouts;
  std::vector<double> kept_rewards;
  for (const Group& grp : kept) {
    kept_rewards.insert(kept_rewards.end(), grp.rewards.begin(), grp.rewards.end());
    for (const Completion& c : grp.completions) rollouts.push_back({grp.prompt_tokens, c.tokens, c.logprobs, {}, 0.0});
  }
  std::optional<double> step_std;  // scale_rewards: batch over the whole step's rewards
  if (s.parallel && g.scale_rewards == ScaleRewards::batch) step_std = s.step_sample_std(kept_rewards);
  std::vector<double> advantages = group_advantages(kept_rewards, g.group_size, g.scale_rewards, 1e-4, step_std);
  if (g.debug_advantages == GrpoAdvantages::zero) std::fill(advantages.begin(), advantages.end(), 0.0);
  if (g.debug_advantages == GrpoAdvantages::shuffled) {  // one process only (validation)
    // Fisher-Yates with Philox draws: the same permutation for a given seed and step.
    for (size_t i = advantages.size(); i > 1; --i) {
      const uint64_t r = seed_of(static_cast<uint64_t>(g.seed), kShuffleStream + static_cast<uint64_t>(s.step), i);
      std::swap(advantages[i - 1], advantages[r % i]);
    }
  }
  for (size_t i = 0; i < rollouts.size(); ++i) rollouts[i].advantage = advantages[i];
  if (s.reference && !rollouts.empty()) {
    auto ref = completion_logprobs(*s.reference, rollouts, g.micro_batch, s.pad_id());
    for (size_t i = 0; i < rollouts.size(); ++i) rollouts[i].ref_logp = std::move(ref[i]);
  }
  // The step's rollouts and completion tokens over every rank: the aggregation's normalisers.
  std::array<double, 3> batch{static_cast<double>(rollouts.size()), 0.0, 0.0};
  int64_t longest = 1;  // positions of the longest row (prompt + completion − 1)
  for (const Rollout& r : rollouts) {
    const auto positions = static_cast<int64_t>(r.prompt.size() + r.completion.size()) - 1;
    batch[1] += static_cast<double>(r.completion.size());
    batch[2] += static_cast<double>(positions);
    longest = std::max(longest, positions);
  }
  s.sum_over_dp(batch);
  const std::array<double, 1> longest_here{static_cast<double>(longest)};
  const std::vector<double> longest_per_rank = s.gather_over_dp(longest_here);
  UpdateConfig config;
  config.loss = {.epsilon_low = g.epsilon_low,
                 .epsilon_high = g.epsilon_high,
                 .beta = g.beta,
                 .aggregation = g.loss,
                 .max_completion_length = g.max_completion_length};
  config.micro_batch = g.micro_batch;
  config.pad_id = s.pad_id();
  config.batch_sequences = static_cast<int64_t>(batch[0]);
  config.batch_tokens = static_cast<int64_t>(batch[1]);
  config.seq_len = static_cast<int64_t>(*std::max_element(longest_per_rank.begin(), longest_per_rank.end()));
  if (config.batch_sequences > 0) {  // every rank steps (the optimizer is collective), rollouts or not
    // This rank's parts of the step's loss, KL, entropy and clip fractions, summed over DP below.
    std::array<double, 5> parts{};
    double max_abs_log_ratio = 0;
    for (int64_t it = 0; it < g.mu; ++it) {
      const UpdateStats u = policy_update(*s.model, *s.optimizer, m.lr, rollouts, config);
      s.model->update_router_biases(s.recipe.model.bias_update_rate);
      const double w = 1.0 / static_cast<double>(g.mu);
      parts[0] += w * u.loss;
      parts[1] += w * u.mean_kl;
      parts[2] += w * u.entropy;
      parts[3] += w * u.clip_fraction_low;
      parts[4] += w * u.clip_fraction_high;
      m.grad_norm += w * u.grad_norm;  // already the norm of the gradient summed over DP
      if (it == 0) max_abs_log_ratio = u.max_abs_log_ratio;
    }
    s.sum_over_dp(parts);
    std::tie(m.loss, m.kl, m.entropy, m.clip_low, m.clip_high) =
        std::tuple(parts[0], parts[1], parts[2], parts[3], parts[4]);
    const std::array<double, 1> ratio{max_abs_log_ratio};
    const std::vector<double> ratios = s.gather_over_dp(ratio);
    m.max_abs_log_ratio = *std::max_element(ratios.begin(), ratios.end());
  }
  const auto trained_tokens = static_cast<int64_t>(batch[2]);
  m.train_s = seconds_since(train_start);
  m.training_tokens_per_s = m.train_s > 0 ? static_cast<double>(trained_tokens * g.mu) / m.train_s : 0.0;
  ++s.step;
  m.step = s.step;
  m.total_steps = total_steps(s.recipe);
  return m;
}

// ---- the whole run -----------------------------------------------------------------------------

GrpoResult GrpoTrainer::run() {
  State& s = *s_;
  const GrpoSection& g = s.g();
  StopSignals signals;
  const int64_t total = total_steps(s.recipe);
  GrpoResult result;
  result.run_dir = s.run_dir;
  s.optimizer = s.make_optimizer();
  if (g.beta > 0) {
    s.reference = std::make_unique<Model>(s.recipe.model, s.recipe.model.dtype, 0, RecomputePolicy{},
                                          precision_policy(s.recipe.precision));
  }
  const std::string& resume = s.recipe.checkpoint.resume;
  if (resume == "auto") {
    if (auto dir = s.latest_checkpoint()) result.sft_loss = s.restore(*dir);
  } else if (resume != "never") {
    result.sft_loss = s.restore(resume);
  }
  if (!s.resumed && !s.recipe.checkpoint.init_from.empty()) {  // e.g. released weights, converted
    const std::filesystem::path from =
        load_model_weights(s.model->parameters(), s.recipe.checkpoint.init_from, "checkpoint.init_from");
    if (s.options.console) fmt::print("initialised the policy from {}\n", from.string());
  }
  if (s.options.console) {
    const ParameterCounts counts = count_parameters(s.recipe.model);
    fmt::print(
        "dsx grpo: {} parameters, {} SFT steps then {} GRPO steps ({} prompts × {} completions, loss {}, "
        "β {}, μ {})\n  prompts: {}\n  run dir: {}\n",
        counts.total, s.resumed ? 0 : g.sft_steps, total, g.prompts_per_step, g.group_size, enum_name(g.loss), g.beta,
        g.mu, g.prompts.empty() ? fmt::format("addition task, {} digits", g.addition.digits) : g.prompts,
        s.run_dir.string());
    if (s.parallel) {
      fmt::print("  layout: {} (zero {}): {} prompts per rank and step\n", describe_mesh(s.parallel->mesh.sizes),
                 s.recipe.parallel.zero, g.prompts_per_step / s.dp_size());
    }
    if (s.resumed) fmt::print("resumed from {} at GRPO step {}\n", s.last_checkpoint->string(), s.step);
  }
  if (!s.resumed) {
    if (g.sft_steps > 0) result.sft_loss = sft(g.sft_steps);
    if (s.reference) s.copy_policy_into_reference();
    // The SFT result is step 0: a resumed run starts GRPO from it, other runs can init from it.
    if (g.sft_steps > 0 && !s.stop_requested()) s.save(result.sft_loss);
  }
  const bool evaluating = g.eval.count > 0;
  if (evaluating && !s.stop_requested()) result.evals.push_back(evaluate());

  const auto start = Clock::now();
  const int64_t first = s.step;
  while (s.step < total && !s.stop_requested()) {
    GrpoStepMetrics m = step();
    m.elapsed_s = seconds_since(start);
    m.eta_s = m.elapsed_s / static_cast<double>(s.step - first) * static_cast<double>(total - s.step);
    if (s.step % s.recipe.logging.interval == 0 || s.step == total || s.step == first + 1) {
      if (s.options.console) fmt::print("{}\n", console_line(m));
      s.log(to_json(m));
      std::fflush(stdout);
    }
    if (s.options.on_step) s.options.on_step(m);
    if (evaluating && g.eval.interval > 0 && s.step % g.eval.interval == 0 && s.step != total)
      result.evals.push_back(evaluate());
    const int64_t interval = s.recipe.checkpoint.interval;  // 0 = only at the end
    if ((interval > 0 && s.step % interval == 0) || s.step == total) s.save(result.sft_loss);
  }
  if (s.stop_requested()) {
    if (s.last_saved_step != s.step) s.save(result.sft_loss);
    if (s.options.console) fmt::print("stopped by signal at GRPO step {}; checkpoint saved\n", s.step);
  } else if (evaluating && (s.step > first || result.evals.empty())) {
    result.evals.push_back(evaluate());
  }
  result.steps = s.step;
  result.last_checkpoint = s.last_checkpoint;
  std::fflush(stdout);
  return result;
}

}  // namespace dsx::grpo
