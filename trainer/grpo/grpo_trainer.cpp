#include "trainer/grpo/grpo_trainer.h"

#include <fmt/core.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <fstream>
#include <limits>
#include <numbers>
#include <numeric>

#include "data/prompts.h"
#include "data/tokenizer.h"
#include "kernels/error.h"
#include "kernels/random.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/grpo/addition_task.h"
#include "trainer/grpo/generate.h"
#include "trainer/model/param_count.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/optim/optimizer.h"
#include "trainer/train/stop_signals.h"

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

double mean_of(std::span<const double> v) {
  return v.empty() ? 0.0 : std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
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
  Recipe recipe;
  GrpoOptions options;
  std::filesystem::path run_dir, checkpoint_root;
  std::optional<AdditionTask> task;
  std::optional<data::Tokenizer> file_tokenizer;
  std::optional<data::PromptLoader> loader;
  int64_t task_prompts_consumed = 0;
  std::vector<data::Prompt> eval_prompts;
  std::unique_ptr<Model> model, reference;
  std::unique_ptr<AdamW> optimizer;
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

  // ---- prompts -------------------------------------------------------------------------------

  std::vector<data::Prompt> next_prompts() {
    if (task) {
      std::vector<data::Prompt> out;
      for (int64_t i = 0; i < g().prompts_per_step; ++i) out.push_back(task->train_prompt(task_prompts_consumed++));
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

  std::vector<ckpt::TensorSlice> slices() {
    std::vector<ckpt::TensorSlice> out;
    for (Parameter& p : model->parameters()) out.push_back({p.spec.name, p.value.shape(), {}, p.value});
    for (const auto& st : optimizer->state_tensors()) out.push_back({st.name, st.tensor->shape(), {}, *st.tensor});
    if (reference) {
      for (Parameter& p : reference->parameters())
        out.push_back({"reference." + p.spec.name, p.value.shape(), {}, p.value});
    }
    return out;
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
    const auto s = slices();
    last_checkpoint = ckpt::save(checkpoint_root, state, s, options);
    last_saved_step = step;
    return *last_checkpoint;
  }

  // Returns the SFT loss recorded in the checkpoint.
  double restore(const std::filesystem::path& dir) {
    std::vector<ckpt::LoadRequest> requests;
    for (auto& sl : slices()) requests.push_back({sl.name, sl.global_shape, {}, sl.data});
    const ckpt::CheckpointState state = ckpt::load(dir, requests);
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

  void load_initial_parameters(const std::string& dir) {
    std::vector<ckpt::LoadRequest> requests;
    for (Parameter& p : model->parameters()) requests.push_back({p.spec.name, p.value.shape(), {}, p.value});
    try {
      ckpt::load(dir, requests);
    } catch (const UserError& e) {
      throw UserError(fmt::format("grpo.init_checkpoint: {}", e.what()));
    }
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
  s.run_dir = r.logging.run_dir;
  s.checkpoint_root = r.checkpoint.dir;
  std::filesystem::create_directories(s.run_dir);
  std::ofstream(s.run_dir / "recipe.yaml") << to_yaml(r);

  if (g.task == GrpoTask::addition) {
    s.task.emplace(AdditionTaskConfig{.digits = g.addition.digits,
                                      .direct_fraction = g.addition.direct_fraction,
                                      .seed = static_cast<uint64_t>(r.data.seed)});
    std::ofstream(s.run_dir / "tokenizer.json") << AdditionTask::tokenizer_json();
    if (g.eval.count > 0 && g.eval.prompts.empty()) s.eval_prompts = s.task->heldout_prompts(g.eval.count);
  } else {
    s.file_tokenizer.emplace(data::Tokenizer::load(r.data.tokenizer));
    auto set = std::make_shared<const data::PromptSet>(data::PromptSet::load(g.prompts));
    s.loader.emplace(
        set,
        data::PromptLoaderConfig{
            .global_batch = g.prompts_per_step, .dp_rank = 0, .dp_size = 1, .seed = static_cast<uint64_t>(g.seed)});
  }
  if (g.eval.count > 0 && !g.eval.prompts.empty()) {
    const data::PromptSet held_out = data::PromptSet::load(g.eval.prompts);
    if (static_cast<int64_t>(held_out.size()) < g.eval.count) {
      throw UserError(fmt::format("grpo.eval.count: {} prompts requested but `{}` holds {}", g.eval.count,
                                  g.eval.prompts, held_out.size()));
    }
    for (int64_t i = 0; i < g.eval.count; ++i) s.eval_prompts.push_back(held_out[static_cast<size_t>(i)]);
  }

  s.model = std::make_unique<Model>(r.model, r.model.dtype, static_cast<uint64_t>(r.train.seed),
                                    recompute_policy(r.train), precision_policy(r.precision));
  model_ = s.model.get();
  if (!g.init_checkpoint.empty()) s.load_initial_parameters(g.init_checkpoint);
  s.rewards = build_rewards(g);
  s.lr_schedule = std::make_unique<LrSchedule>(r);
  if (r.logging.jsonl) s.jsonl = std::make_unique<std::ofstream>(s.run_dir / "metrics.jsonl", std::ios::app);
}

GrpoTrainer::~GrpoTrainer() = default;

const data::Tokenizer& GrpoTrainer::tokenizer() const {
  return s_->tokenizer();
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
  for (int64_t step = 0; step < steps && !StopSignals::stop_requested(); ++step) {
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
  for (size_t i = 0; i < s.eval_prompts.size(); ++i) {
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
  std::vector<Completion> completions = generator.generate(requests, s.sampling(g.eval.temperature));
  for (size_t i = 0; i < groups.size(); ++i)
    for (int64_t k = 0; k < g.eval.samples; ++k)
      groups[i].completions.push_back(std::move(completions[i * static_cast<size_t>(g.eval.samples) + k]));

  const std::vector<RewardSample> samples = s.reward_samples(groups);
  EvalMetrics m;
  m.step = s.step;
  m.prompts = static_cast<int64_t>(groups.size());
  m.samples = g.eval.samples;
  m.accuracy = mean_of(s.accuracy.score(samples));
  m.format_rate = mean_of(FormatReward().score(samples));
  m.reward_mean = mean_of(s.rewards.score(samples).total);
  double length = 0;
  for (const RewardSample& x : samples) length += static_cast<double>(x.completion_tokens);
  m.length_mean = samples.empty() ? 0.0 : length / static_cast<double>(samples.size());
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
  if (!s.optimizer) s.optimizer = std::make_unique<AdamW>(s.model->parameters(), s.recipe.optim);
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
  const auto rollout_start = Clock::now();
  std::vector<Group> generated, kept;
  int64_t generated_tokens = 0;
  double generation_s = 0, reward_s = 0;
  const int64_t rounds = g.dynamic_sampling ? 1 + g.resample_rounds : 1;
  Generator generator(*s.model, &s.tokenizer());
  for (int64_t round = 0; round < rounds; ++round) {
    std::vector<Group> groups;
    std::vector<GenerationRequest> requests;
    for (data::Prompt& p : s.next_prompts()) {
      Group grp;
      grp.prompt = std::move(p);
      grp.prompt_tokens = s.prompt_tokens(grp.prompt);
      for (int64_t k = 0; k < g.group_size; ++k) {
        const uint64_t counter = (static_cast<uint64_t>(round) << 32) | static_cast<uint64_t>(requests.size());
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
    for (size_t i = 0; i < groups.size(); ++i) {
      const auto first = scores.total.begin() + static_cast<std::ptrdiff_t>(i * g.group_size);
      groups[i].rewards.assign(first, first + g.group_size);
      groups[i].zero_spread = flat_zero[i];
      if (!g.dynamic_sampling || !groups[i].zero_spread) kept.push_back(groups[i]);
    }
    generated.insert(generated.end(), std::make_move_iterator(groups.begin()), std::make_move_iterator(groups.end()));
    m.generation_rounds = round + 1;
    if (static_cast<int64_t>(kept.size()) >= g.prompts_per_step) break;
  }
  if (static_cast<int64_t>(kept.size()) > g.prompts_per_step) kept.resize(static_cast<size_t>(g.prompts_per_step));

  // Metrics over every generated completion (dropped groups included).
  const std::vector<RewardSample> samples = s.reward_samples(generated);
  const RewardScores scores = s.rewards.score(samples);
  const MeanStd total = mean_std(scores.total);
  m.reward_mean = total.mean;
  m.reward_std = total.std;
  for (size_t k = 0; k < scores.names.size(); ++k) m.per_reward[scores.names[k]] = mean_std(scores.per_reward[k]);
  m.accuracy = mean_of(s.accuracy.score(samples));
  m.prompts = static_cast<int64_t>(generated.size());
  m.completions = static_cast<int64_t>(samples.size());
  int64_t zero = 0, truncated = 0;
  m.length_min = std::numeric_limits<int64_t>::max();
  double length_sum = 0;
  for (const Group& grp : generated) {
    zero += grp.zero_spread;
    for (const Completion& c : grp.completions) {
      const auto n = static_cast<int64_t>(c.tokens.size());
      length_sum += static_cast<double>(n);
      m.length_min = std::min(m.length_min, n);
      m.length_max = std::max(m.length_max, n);
      truncated += c.finish == FinishReason::length;
    }
  }
  m.zero_spread_fraction = static_cast<double>(zero) / static_cast<double>(generated.size());
  m.length_mean = length_sum / static_cast<double>(samples.size());
  m.truncated_fraction = static_cast<double>(truncated) / static_cast<double>(samples.size());
  m.groups_trained = static_cast<int64_t>(kept.size());
  m.generation_tokens_per_s = generation_s > 0 ? static_cast<double>(generated_tokens) / generation_s : 0.0;
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
  std::vector<double> advantages = group_advantages(kept_rewards, g.group_size, g.scale_rewards);
  if (g.debug_advantages == GrpoAdvantages::zero) std::fill(advantages.begin(), advantages.end(), 0.0);
  if (g.debug_advantages == GrpoAdvantages::shuffled) {
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
  UpdateConfig config;
  config.loss = {.epsilon_low = g.epsilon_low,
                 .epsilon_high = g.epsilon_high,
                 .beta = g.beta,
                 .aggregation = g.loss,
                 .max_completion_length = g.max_completion_length};
  config.micro_batch = g.micro_batch;
  config.pad_id = s.pad_id();
  int64_t trained_tokens = 0;
  for (const Rollout& r : rollouts) trained_tokens += static_cast<int64_t>(r.prompt.size() + r.completion.size()) - 1;
  if (!rollouts.empty()) {
    for (int64_t it = 0; it < g.mu; ++it) {
      const UpdateStats u = policy_update(*s.model, *s.optimizer, m.lr, rollouts, config);
      s.model->update_router_biases(s.recipe.model.bias_update_rate);
      const double w = 1.0 / static_cast<double>(g.mu);
      m.loss += w * u.loss;
      m.grad_norm += w * u.grad_norm;
      m.kl += w * u.mean_kl;
      m.entropy += w * u.entropy;
      m.clip_low += w * u.clip_fraction_low;
      m.clip_high += w * u.clip_fraction_high;
      if (it == 0) m.max_abs_log_ratio = u.max_abs_log_ratio;
    }
  }
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
  s.optimizer = std::make_unique<AdamW>(s.model->parameters(), s.recipe.optim);
  if (g.beta > 0) {
    s.reference = std::make_unique<Model>(s.recipe.model, s.recipe.model.dtype, 0, RecomputePolicy{},
                                          precision_policy(s.recipe.precision));
  }
  const std::string& resume = s.recipe.checkpoint.resume;
  if (resume == "auto") {
    if (auto dir = ckpt::latest(s.checkpoint_root, {.remove_stale = true})) result.sft_loss = s.restore(*dir);
  } else if (resume != "never") {
    result.sft_loss = s.restore(resume);
  }
  if (s.options.console) {
    const ParameterCounts counts = count_parameters(s.recipe.model);
    fmt::print(
        "dsx grpo: {} parameters, {} SFT steps then {} GRPO steps ({} prompts × {} completions, loss {}, "
        "β {}, μ {})\n  prompts: {}\n  run dir: {}\n",
        counts.total, s.resumed ? 0 : g.sft_steps, total, g.prompts_per_step, g.group_size, enum_name(g.loss), g.beta,
        g.mu, g.prompts.empty() ? fmt::format("addition task, {} digits", g.addition.digits) : g.prompts,
        s.run_dir.string());
    if (s.resumed) fmt::print("resumed from {} at GRPO step {}\n", s.last_checkpoint->string(), s.step);
  }
  if (!s.resumed) {
    if (g.sft_steps > 0) result.sft_loss = sft(g.sft_steps);
    if (s.reference) s.copy_policy_into_reference();
    // The SFT result is step 0: a resumed run starts GRPO from it, other runs can init from it.
    if (g.sft_steps > 0 && !StopSignals::stop_requested()) s.save(result.sft_loss);
  }
  const bool evaluating = g.eval.count > 0;
  if (evaluating && !StopSignals::stop_requested()) result.evals.push_back(evaluate());

  const auto start = Clock::now();
  const int64_t first = s.step;
  while (s.step < total && !StopSignals::stop_requested()) {
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
  if (StopSignals::stop_requested()) {
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
