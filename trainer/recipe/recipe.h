// A training recipe: everything `dsx train` needs to know, read from YAML.
//
// Sections: model, data, parallel, train, optim, precision, checkpoint, logging. Every key
// has a full path (`optim.lr`), a type, a default, a one-line doc and a validation rule; the
// table lives in trainer/recipe/schema.cpp and `dsx recipe explain` prints it. Defaults are
// the member initialisers below (DeepSeek-V3's values where a value applies at every scale).
//
// Loading is strict: an unknown key, a value of the wrong type or an inconsistent setting
// throws dsx::UserError with one message naming the key (and the file, line and column when
// known) before any work starts.
#pragma once
#include <array>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kernels/dtype.h"
#include "trainer/grpo/grpo_loss.h"
#include "trainer/model/config.h"

namespace dsx {

// ---- enumerations (names as written in YAML) ----------------------------------------------

enum class DataKind : uint8_t { synthetic, datasets };
enum class RecomputeKind : uint8_t { rmsnorm, mla_up_proj, moe_act, full };
enum class ScheduleKind : uint8_t { constant, warmup_cosine, wsd, piecewise };
enum class ScheduleUnit : uint8_t { steps, tokens };
enum class SegmentKind : uint8_t { linear, constant, cosine };
enum class DecayShape : uint8_t { linear, cosine };
enum class MomentPrecision : uint8_t { fp32, bf16 };
enum class ActivationPrecision : uint8_t { fp32, bf16 };
enum class GemmPrecision : uint8_t { fp32, bf16, fp8_blockwise };
enum class DispatchPrecision : uint8_t { fp32, bf16, fp8 };
enum class CombinePrecision : uint8_t { fp32, bf16 };
enum class PipelineSchedule : uint8_t { one_f_one_b, interleaved_1f1b, zero_bubble, dualpipe, dualpipev };
enum class PipelineSplit : uint8_t { even, balanced };

// The YAML spelling of each enumerator, in declaration order (found by argument-dependent
// lookup: enum_names(E{}) lists E's names).
template <class E>
using EnumTable = std::pair<E, std::string_view>;

constexpr auto enum_names(DataKind) {
  return std::to_array<EnumTable<DataKind>>({{DataKind::synthetic, "synthetic"}, {DataKind::datasets, "datasets"}});
}
constexpr auto enum_names(RecomputeKind) {
  return std::to_array<EnumTable<RecomputeKind>>({{RecomputeKind::rmsnorm, "rmsnorm"},
                                                  {RecomputeKind::mla_up_proj, "mla_up_proj"},
                                                  {RecomputeKind::moe_act, "moe_act"},
                                                  {RecomputeKind::full, "full"}});
}
constexpr auto enum_names(ScheduleKind) {
  return std::to_array<EnumTable<ScheduleKind>>({{ScheduleKind::constant, "constant"},
                                                 {ScheduleKind::warmup_cosine, "warmup_cosine"},
                                                 {ScheduleKind::wsd, "wsd"},
                                                 {ScheduleKind::piecewise, "piecewise"}});
}
constexpr auto enum_names(ScheduleUnit) {
  return std::to_array<EnumTable<ScheduleUnit>>({{ScheduleUnit::steps, "steps"}, {ScheduleUnit::tokens, "tokens"}});
}
constexpr auto enum_names(SegmentKind) {
  return std::to_array<EnumTable<SegmentKind>>(
      {{SegmentKind::linear, "linear"}, {SegmentKind::constant, "constant"}, {SegmentKind::cosine, "cosine"}});
}
constexpr auto enum_names(DecayShape) {
  return std::to_array<EnumTable<DecayShape>>({{DecayShape::linear, "linear"}, {DecayShape::cosine, "cosine"}});
}
constexpr auto enum_names(MomentPrecision) {
  return std::to_array<EnumTable<MomentPrecision>>({{MomentPrecision::fp32, "fp32"}, {MomentPrecision::bf16, "bf16"}});
}
constexpr auto enum_names(ActivationPrecision) {
  return std::to_array<EnumTable<ActivationPrecision>>(
      {{ActivationPrecision::fp32, "fp32"}, {ActivationPrecision::bf16, "bf16"}});
}
constexpr auto enum_names(GemmPrecision) {
  return std::to_array<EnumTable<GemmPrecision>>(
      {{GemmPrecision::fp32, "fp32"}, {GemmPrecision::bf16, "bf16"}, {GemmPrecision::fp8_blockwise, "fp8_blockwise"}});
}
constexpr auto enum_names(DispatchPrecision) {
  return std::to_array<EnumTable<DispatchPrecision>>(
      {{DispatchPrecision::fp32, "fp32"}, {DispatchPrecision::bf16, "bf16"}, {DispatchPrecision::fp8, "fp8"}});
}
constexpr auto enum_names(CombinePrecision) {
  return std::to_array<EnumTable<CombinePrecision>>(
      {{CombinePrecision::fp32, "fp32"}, {CombinePrecision::bf16, "bf16"}});
}
constexpr auto enum_names(PipelineSchedule) {
  return std::to_array<EnumTable<PipelineSchedule>>({{PipelineSchedule::one_f_one_b, "1f1b"},
                                                     {PipelineSchedule::interleaved_1f1b, "interleaved_1f1b"},
                                                     {PipelineSchedule::zero_bubble, "zero_bubble"},
                                                     {PipelineSchedule::dualpipe, "dualpipe"},
                                                     {PipelineSchedule::dualpipev, "dualpipev"}});
}
constexpr auto enum_names(PipelineSplit) {
  return std::to_array<EnumTable<PipelineSplit>>(
      {{PipelineSplit::even, "even"}, {PipelineSplit::balanced, "balanced"}});
}
constexpr auto enum_names(Device) {
  return std::to_array<EnumTable<Device>>({{Device::cpu, "cpu"}, {Device::cuda, "cuda"}});
}

template <class E>
constexpr std::string_view enum_name(E value) {
  for (const auto& [v, name] : enum_names(E{}))
    if (v == value) return name;
  return "?";
}

// ---- sections --------------------------------------------------------------------------

// HF DeepseekV3Config fields (inherited, so a ModelSection is a ModelConfig) plus where and
// in which float type the model lives.
struct ModelSection : ModelConfig {
  Device device = Device::cpu;
  DType dtype = DType::f32;  // f32, or f64 for gradient checks (then every precision.* is fp32)
};

// data/synthetic.h's sparse Markov chain: every context of `order` tokens has `branching`
// successors, successor k with probability ∝ decay^k; its entropy is the lowest reachable loss.
struct SyntheticData {
  int64_t vocab_size = 0;  // tokens drawn from [0, vocab_size); 0 = model.vocab_size
  int64_t order = 1;
  int64_t branching = 4;
  double decay = 0.5;  // 1 = equally likely successors (loss floor ln(branching))
};

struct DataSource {
  std::string path;
  double weight = 1.0;
  bool operator==(const DataSource&) const = default;
};

struct DataSection {
  DataKind kind = DataKind::synthetic;
  int64_t seed = 1234;  // data order (datasets) or the generating chain (synthetic)
  SyntheticData synthetic;
  std::vector<DataSource> sources;  // kind datasets: HDF5 token files blended by weight
  std::string tokenizer;            // tokenizer.json whose hash the datasets must carry; "" = none
  std::string tokenizer_hash;       // expected tokenizer hash (hex); "" = not checked
};

struct ParallelSection {
  int64_t world_size = 0;  // 0 = pp·dp·tp; otherwise must equal it
  int64_t pp = 1;
  int64_t dp = 1;
  int64_t tp = 1;
  bool sequence_parallel = false;  // with tp > 1: norms and the residual stream on 1/tp of the tokens
  int64_t ep = 1;                  // carved out of dp: divides dp and n_routed_experts
  int64_t zero = 1;
  bool overlap_a2a = true;
  double comm_timeout_s = 600.0;
  PipelineSchedule pp_schedule = PipelineSchedule::one_f_one_b;
  int64_t pp_chunks = 2;  // interleaved_1f1b: model chunks (virtual stages) per pipeline rank
  PipelineSplit pp_split = PipelineSplit::even;
};

struct BatchRamp {
  int64_t start = 0;  // global batch (sequences) at token 0; 0 = no ramp
  double tokens = 0;  // tokens over which the batch grows linearly to train.global_batch
};

struct TrainSection {
  int64_t steps = 1000;  // exactly one of steps / tokens is > 0
  double tokens = 0;     // train until this many tokens are consumed (counts up to 2^53 exactly)
  int64_t global_batch = 32;
  int64_t micro_batch = 8;
  int64_t seq_len = 128;
  int64_t seed = 1234;  // parameter initialisation (Philox key)
  int64_t eval_interval = 0;
  int64_t eval_batches = 8;
  BatchRamp batch_ramp;
  std::vector<RecomputeKind> recompute;  // [] = keep every activation; [full] = recompute every layer

  bool recomputes(RecomputeKind kind) const;  // true also when `full` is listed
  // Micro-batches per optimizer step on one data-parallel rank, at a given global batch.
  int64_t accumulation_steps(int64_t global_batch_now, int64_t dp) const {
    return global_batch_now / (micro_batch * dp);
  }
};

struct LrSegment {
  double until = 0;  // end of the segment (cumulative), in `unit`
  ScheduleUnit unit = ScheduleUnit::steps;
  SegmentKind kind = SegmentKind::linear;
  double lr = 0;  // LR at the end (linear, cosine) or throughout (constant)
  bool operator==(const LrSegment&) const = default;
};

struct LrScheduleSection {
  ScheduleKind kind = ScheduleKind::warmup_cosine;
  ScheduleUnit unit = ScheduleUnit::steps;  // unit of `warmup` and of the decay progress
  double warmup = 0;
  double min_lr_ratio = 0.1;    // final LR / optim.lr (DeepSeek-V3: 2.2e-5 / 2.2e-4)
  double decay_fraction = 0.1;  // wsd: share of the run spent decaying
  DecayShape decay_shape = DecayShape::linear;
  std::vector<LrSegment> segments;  // piecewise
};

struct OptimSection {
  double lr = 2.2e-4;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;
  double grad_clip = 1.0;  // global-norm clip; 0 = off
  double ema_decay = 0;    // weight EMA in host memory (trainer/optim/weight_ema.h); 0 = off
  MomentPrecision moments = MomentPrecision::fp32;
  std::vector<std::string> no_decay = {"*norm.weight", "*.bias"};  // fnmatch patterns on HF names
  LrScheduleSection schedule;

  bool decays(std::string_view parameter_name) const;  // false if a no_decay pattern matches
};

// One entry of precision.exceptions: the GEMM weights whose HF name matches `modules` (fnmatch,
// as optim.no_decay) run `gemm` instead of precision.gemm; the first matching entry wins.
struct PrecisionException {
  std::string modules;
  GemmPrecision gemm = GemmPrecision::fp32;
  bool operator==(const PrecisionException&) const = default;
};

struct PrecisionSection {
  ActivationPrecision activations = ActivationPrecision::fp32;
  GemmPrecision gemm = GemmPrecision::fp32;  // DeepSeek-V3's FP8 GEMM set (trainer/model/precision.h)
  DispatchPrecision dispatch = DispatchPrecision::fp32;
  CombinePrecision combine = CombinePrecision::fp32;
  std::vector<PrecisionException> exceptions;
};

struct CheckpointSection {
  std::string dir;  // "" = <logging.run_dir>/checkpoints (resolved at load)
  int64_t interval = 1000;
  int64_t keep_last = 3;
  std::string resume = "auto";  // auto | never | path of a checkpoint directory
  std::string init_from;        // "" = none; a checkpoint (or root) whose model tensors start a fresh run
};

struct LoggingSection {
  int64_t interval = 10;
  std::string run_dir;  // "" = runs/<recipe file stem> (resolved at load)
  bool jsonl = true;
  bool rank_logs = false;  // every rank writes <run_dir>/logs/rank-NNNNN.log
  double peak_flops = 0;   // per device, FLOP/s; 0 = no MFU column
};

// ---- the GRPO stage (`dsx grpo`; trainer/grpo/grpo_trainer.h) ----------------------------

enum class GrpoTask : uint8_t { none, addition };
// Negative controls for tests and debugging: the advantages as computed, all zero, or randomly
// permuted over the batch (same magnitudes, no relation to the rewards).
enum class GrpoAdvantages : uint8_t { normal, zero, shuffled };

constexpr auto enum_names(GrpoTask) {
  return std::to_array<EnumTable<GrpoTask>>({{GrpoTask::none, "none"}, {GrpoTask::addition, "addition"}});
}
constexpr auto enum_names(GrpoAdvantages) {
  return std::to_array<EnumTable<GrpoAdvantages>>(
      {{GrpoAdvantages::normal, "normal"}, {GrpoAdvantages::zero, "zero"}, {GrpoAdvantages::shuffled, "shuffled"}});
}
namespace grpo {  // found by argument-dependent lookup for the enums of grpo_loss.h
constexpr auto enum_names(ScaleRewards) {
  return std::to_array<EnumTable<ScaleRewards>>(
      {{ScaleRewards::group, "group"}, {ScaleRewards::batch, "batch"}, {ScaleRewards::none, "none"}});
}
constexpr auto enum_names(LossAggregation) {
  return std::to_array<EnumTable<LossAggregation>>(
      {{LossAggregation::grpo, "grpo"}, {LossAggregation::dapo, "dapo"}, {LossAggregation::dr_grpo, "dr_grpo"}});
}
}  // namespace grpo

// One reward function: a built-in (answer_match, format, overlong_penalty) when `command` is
// empty, otherwise an external program (argv) under any other name.
struct GrpoReward {
  std::string name;
  double weight = 1.0;
  std::vector<std::string> command;
  double timeout_s = 60.0;
  bool operator==(const GrpoReward&) const = default;
};

struct GrpoAdditionTask {
  int64_t digits = 2;            // operands in [0, 10^digits)
  double direct_fraction = 0.5;  // share of SFT sequences that answer without reasoning
};

struct GrpoEval {
  std::string prompts;       // held-out JSONL prompt set; "" = the task's held-out prompts
  int64_t count = 64;        // held-out prompts per evaluation; 0 = no evaluation
  int64_t samples = 4;       // completions per prompt
  double temperature = 1.0;  // 0 = greedy
  int64_t interval = 10;     // evaluate every N steps (and before the first and after the last)
};

struct GrpoSection {
  GrpoTask task = GrpoTask::none;  // built-in prompt source, or none with `prompts`
  std::string prompts;             // JSONL prompt set (tokenized with data.tokenizer)
  GrpoAdditionTask addition;
  std::string init_checkpoint;  // parameters to start from ("" = the initialisation of train.seed)
  int64_t sft_steps = 0;        // supervised steps on the task's reference completions first
  int64_t sft_batch = 32;
  double sft_lr = 1e-3;
  int64_t prompts_per_step = 32;
  int64_t group_size = 16;  // G completions per prompt
  int64_t max_completion_length = 256;
  double temperature = 1.0;
  double top_p = 1.0;
  int64_t top_k = 0;
  double epsilon_low = 0.2;
  double epsilon_high = 0.2;  // DAPO: 0.28
  double beta = 0.0;          // KL coefficient; 0 = no reference model
  int64_t mu = 1;             // optimizer steps per batch of rollouts
  grpo::LossAggregation loss = grpo::LossAggregation::grpo;
  grpo::ScaleRewards scale_rewards = grpo::ScaleRewards::group;
  bool dynamic_sampling = false;     // drop groups whose rewards are all equal
  int64_t resample_rounds = 0;       // extra generation rounds to refill dropped groups
  int64_t ref_refresh_interval = 0;  // copy the policy into the reference every N steps; 0 = never
  int64_t micro_batch = 0;           // sequences per forward/backward; 0 = all at once
  int64_t overlong_cache = 0;        // overlong_penalty: soft-penalty span before the length limit
  std::vector<GrpoReward> rewards = {{"answer_match", 1.0, {}, 60.0}, {"format", 0.1, {}, 60.0}};
  int64_t seed = 1234;  // rollout and evaluation sampling, prompt-set order (the task uses data.seed)
  GrpoAdvantages debug_advantages = GrpoAdvantages::normal;
  GrpoEval eval;

  bool enabled() const { return task != GrpoTask::none || !prompts.empty(); }
};

struct Recipe {
  ModelSection model;
  DataSection data;
  ParallelSection parallel;
  TrainSection train;
  OptimSection optim;
  PrecisionSection precision;
  CheckpointSection checkpoint;
  LoggingSection logging;
  GrpoSection grpo;

  // Equal when every schema key holds the same value.
  bool operator==(const Recipe& other) const;
};

// ---- loading, checking, writing ----------------------------------------------------------

// Reads a recipe file, applies `--set path=value` overrides (YAML values, parsed with the key's
// type), resolves the derived defaults and validates. Throws dsx::UserError.
Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides = {});
// The same from YAML text; `source_name` appears in messages and names the default run dir.
Recipe parse_recipe(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides = {});
// Every cross-field and range check; the loaders call it. Throws dsx::UserError.
void validate(const Recipe& recipe);
// The fully resolved recipe, every key written: parse_recipe(to_yaml(r), ...) == r.
std::string to_yaml(const Recipe& recipe);

// Length of the run: train.steps, or the steps needed to consume train.tokens.
int64_t total_steps(const Recipe& recipe);
// Tokens consumed by the whole run.
int64_t total_tokens(const Recipe& recipe);

}  // namespace dsx
