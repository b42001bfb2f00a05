// Cross-field rules of a recipe: each violated rule is one UserError naming the keys involved.
// Single-key ranges are in the schema table (schema.cpp).
#include <fmt/core.h>

#include <algorithm>
#include <cmath>
#include <filesystem>

#include "data/dataset.h"
#include "data/tokenizer.h"
#include "kernels/error.h"
#include "trainer/grpo/addition_task.h"
#include "trainer/model/precision.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/recipe/recipe.h"
#include "trainer/recipe/schema.h"
#include "trainer/recipe/validate.h"

namespace dsx {
namespace {

using schema::Reporter;

std::string number(double value) {
  return fmt::format("{:g}", value);
}

void check_attention(const ModelConfig& m, const Reporter& report) {
  if (m.qk_rope_head_dim % 2 != 0)
    report.fail("model.qk_rope_head_dim",
                fmt::format("`model.qk_rope_head_dim` must be even (RoPE rotates pairs of channels), got {}",
                            m.qk_rope_head_dim));
  if (m.rope_scaling.type == "yarn" && m.rope_scaling.original_max_position_embeddings > m.max_position_embeddings)
    report.fail({"model.rope_scaling.original_max_position_embeddings", "model.max_position_embeddings"},
                fmt::format("`model.rope_scaling.original_max_position_embeddings` ({}) exceeds "
                            "`model.max_position_embeddings` ({})",
                            m.rope_scaling.original_max_position_embeddings, m.max_position_embeddings));
}

void check_experts(const ModelConfig& m, const Reporter& report) {
  if (m.first_k_dense_replace > m.num_hidden_layers)
    report.fail({"model.first_k_dense_replace", "model.num_hidden_layers"},
                fmt::format("`model.first_k_dense_replace` ({}) exceeds `model.num_hidden_layers` ({})",
                            m.first_k_dense_replace, m.num_hidden_layers));
  if (m.n_routed_experts == 0) return;  // a dense model: the router keys are unused
  if (m.num_experts_per_tok == 0)
    report.fail("model.num_experts_per_tok", "`model.num_experts_per_tok` must be >= 1 when there are routed experts");
  if (m.num_experts_per_tok > m.n_routed_experts)
    report.fail({"model.num_experts_per_tok", "model.n_routed_experts"},
                fmt::format("`model.num_experts_per_tok` ({}) exceeds `model.n_routed_experts` ({})",
                            m.num_experts_per_tok, m.n_routed_experts));
  if (m.n_routed_experts % m.n_group != 0)
    report.fail({"model.n_routed_experts", "model.n_group"},
                fmt::format("`model.n_routed_experts` ({}) must be divisible by `model.n_group` ({})",
                            m.n_routed_experts, m.n_group));
  if (m.topk_group > m.n_group)
    report.fail({"model.topk_group", "model.n_group"},
                fmt::format("`model.topk_group` ({}) exceeds `model.n_group` ({})", m.topk_group, m.n_group));
  const int64_t per_group = m.n_routed_experts / m.n_group;
  if (m.num_experts_per_tok > m.topk_group * per_group)
    report.fail({"model.num_experts_per_tok", "model.topk_group", "model.n_group", "model.n_routed_experts"},
                fmt::format("`model.num_experts_per_tok` ({}) exceeds the {} experts a token can reach: "
                            "`model.topk_group` ({}) groups of {} (`model.n_routed_experts` / `model.n_group`)",
                            m.num_experts_per_tok, m.topk_group * per_group, m.topk_group, per_group));
  if (m.n_group > 1 && per_group < 2)
    report.fail({"model.n_group", "model.n_routed_experts"},
                fmt::format("`model.n_group` ({}) leaves {} expert per group; a group's score is the sum of its "
                            "top-2 expert scores, so each group needs at least 2",
                            m.n_group, per_group));
}

void check_precision(const Recipe& r, const Reporter& report) {
  if (r.model.dtype != DType::f64) return;
  if (r.model.device == Device::cuda)
    report.fail(
        {"model.dtype", "model.device"},
        "`model.dtype` f64 is the CPU reference path; `model.device` cuda trains in f32 (set model.dtype: f32)");
  const auto fail_if = [&](bool wrong, const char* key, std::string_view value) {
    if (wrong)
      report.fail(
          {key, "model.dtype"},
          fmt::format("`model.dtype` f64 runs the float64 reference path, so `{}` must be fp32, got {}", key, value));
  };
  fail_if(r.precision.activations != ActivationPrecision::fp32, "precision.activations",
          enum_name(r.precision.activations));
  fail_if(r.precision.gemm != GemmPrecision::fp32, "precision.gemm", enum_name(r.precision.gemm));
  fail_if(r.precision.dispatch != DispatchPrecision::fp32, "precision.dispatch", enum_name(r.precision.dispatch));
  fail_if(r.precision.combine != CombinePrecision::fp32, "precision.combine", enum_name(r.precision.combine));
  fail_if(r.optim.moments != MomentPrecision::fp32, "optim.moments", enum_name(r.optim.moments));
  for (size_t i = 0; i < r.precision.exceptions.size(); ++i) {
    const std::string key = fmt::format("precision.exceptions[{}].gemm", i);
    fail_if(r.precision.exceptions[i].gemm != GemmPrecision::fp32, key.c_str(),
            enum_name(r.precision.exceptions[i].gemm));
  }
}

// Each precision.exceptions pattern must decide the GEMM precision of at least one weight of
// this model: one that matches nothing, only weights without a GEMM, or only weights an earlier
// entry already decides (the first match wins) would silently do nothing.
void check_precision_exceptions(const Recipe& r, const Reporter& report) {
  const auto& exceptions = r.precision.exceptions;
  for (size_t i = 0; i < exceptions.size(); ++i)
    if (exceptions[i].modules.empty())
      report.fail(fmt::format("precision.exceptions[{}].modules", i),
                  fmt::format("`precision.exceptions[{}].modules` is an empty pattern", i));
  if (exceptions.empty()) return;
  const std::vector<ExceptionMatches> matches = exception_matches(r.precision, r.model);
  for (size_t i = 0; i < exceptions.size(); ++i) {
    const std::string key = fmt::format("precision.exceptions[{}].modules", i);
    const std::string what = fmt::format("`{}` (\"{}\")", key, exceptions[i].modules);
    if (matches[i].parameters == 0)
      report.fail(key, fmt::format("{} matches no parameter of the model (fnmatch on Hugging Face names such as "
                                   "model.layers.1.mlp.experts.0.up_proj.weight)",
                                   what));
    if (matches[i].gemm_weights == 0)
      report.fail(key, fmt::format("{} matches only parameters without a GEMM (norms, the embedding table, the "
                                   "router bias)",
                                   what));
    if (matches[i].decided == 0)
      report.fail(key, fmt::format("{} sets no weight: every GEMM weight it matches is matched by an earlier "
                                   "entry (the first match wins)",
                                   what));
  }
}

void check_file(const std::string& key, const std::string& path, const Reporter& report) {
  std::error_code error;
  const auto status = std::filesystem::status(path, error);
  if (!std::filesystem::exists(status)) report.fail(key, fmt::format("`{}`: no such file `{}`", key, path));
  if (!std::filesystem::is_regular_file(status))
    report.fail(key, fmt::format("`{}`: `{}` is not a regular file", key, path));
}

// The hash a tokenizer file has; its own load errors are reported against the key.
std::string tokenizer_hash_of(const std::string& path, const Reporter& report) {
  check_file("data.tokenizer", path, report);
  try {
    return data::Tokenizer::load(path).hash();
  } catch (const UserError& error) {
    report.fail("data.tokenizer", fmt::format("`data.tokenizer`: {}", error.what()));
  }
}

// Opens each dataset's index (cheap: index.json only) so a wrong path, a vocabulary larger
// than the model's or a foreign tokenizer stops the run before any work starts.
void check_datasets(const Recipe& r, const Reporter& report) {
  const DataSection& d = r.data;
  if (d.sources.empty())
    report.fail("data.sources", "`data.kind` is datasets but `data.sources` is empty; list {path, weight} entries");
  std::string expected_hash = d.tokenizer_hash;
  std::string hash_origin = "`data.tokenizer_hash`";
  if (!d.tokenizer.empty()) {
    const std::string actual = tokenizer_hash_of(d.tokenizer, report);
    if (!expected_hash.empty() && expected_hash != actual)
      report.fail("data.tokenizer_hash", fmt::format("`data.tokenizer_hash` ({}) differs from the hash of "
                                                     "`data.tokenizer` `{}` ({})",
                                                     expected_hash, d.tokenizer, actual));
    expected_hash = actual;
    hash_origin = fmt::format("the tokenizer `{}`", d.tokenizer);
  }
  for (size_t i = 0; i < d.sources.size(); ++i) {
    const std::string key = fmt::format("data.sources[{}].path", i);
    const std::string& path = d.sources[i].path;
    if (!std::filesystem::exists(path)) report.fail(key, fmt::format("`{}`: no such dataset `{}`", key, path));
    if (!std::filesystem::exists(std::filesystem::path(path) / data::kIndexFileName))
      report.fail(key, fmt::format("`{}`: `{}` is not a dsx dataset directory (no {}; `dsx data prep` makes one)", key,
                                   path, data::kIndexFileName));
    data::DatasetIndex index;
    try {
      index = data::DatasetIndex::load(path);
    } catch (const UserError& error) {
      report.fail(key, fmt::format("`{}`: {}", key, error.what()));
    }
    if (index.identity.vocab_size > r.model.vocab_size)
      report.fail(
          key, fmt::format("`{}`: dataset `{}` has a vocabulary of {} tokens, more than `model.vocab_size` ({})", key,
                           path, index.identity.vocab_size, r.model.vocab_size));
    if (expected_hash.empty()) {  // no tokenizer named: the datasets must at least agree with each other
      expected_hash = index.identity.tokenizer_hash;
      hash_origin = fmt::format("`data.sources[{}]`", i);
      continue;
    }
    if (index.identity.tokenizer_hash != expected_hash)
      report.fail(key, fmt::format("`{}`: dataset `{}` was tokenized by tokenizer {}, but {} has {}", key, path,
                                   index.identity.tokenizer_hash, hash_origin, expected_hash));
  }
}

void check_data(const Recipe& r, const Reporter& report) {
  const DataSection& d = r.data;
  if (d.kind == DataKind::datasets) {
    check_datasets(r, report);
    return;
  }
  if (!d.sources.empty())
    report.fail("data.sources", "`data.sources` is set but `data.kind` is synthetic; set `data.kind: datasets`");
  if (d.synthetic.vocab_size > r.model.vocab_size)
    report.fail({"data.synthetic.vocab_size", "model.vocab_size"},
                fmt::format("`data.synthetic.vocab_size` ({}) exceeds `model.vocab_size` ({})", d.synthetic.vocab_size,
                            r.model.vocab_size));
  const int64_t vocab = d.synthetic.vocab_size > 0 ? d.synthetic.vocab_size : r.model.vocab_size;
  if (d.synthetic.branching > vocab)
    report.fail("data.synthetic.branching", fmt::format("`data.synthetic.branching` ({}) exceeds the synthetic "
                                                        "vocabulary ({})",
                                                        d.synthetic.branching, vocab));
  if (!d.tokenizer.empty()) tokenizer_hash_of(d.tokenizer, report);
}

void check_layout(const Recipe& r, const Reporter& report) {
  const ParallelSection& p = r.parallel;
  const ModelConfig& m = r.model;
  const int64_t product = p.pp * p.dp * p.tp;
  if (p.world_size != 0 && p.world_size != product)
    report.fail({"parallel.world_size", "parallel.pp", "parallel.dp", "parallel.tp"},
                fmt::format("`parallel.world_size` ({}) must equal pp·dp·tp = {}·{}·{} = {}", p.world_size, p.pp, p.dp,
                            p.tp, product));
  if (p.dp % p.ep != 0)
    report.fail({"parallel.ep", "parallel.dp"},
                fmt::format("`parallel.ep` ({}) must divide `parallel.dp` ({}): expert-parallel groups are carved "
                            "out of data parallelism",
                            p.ep, p.dp));
  // what tensor parallelism splits: heads, the dense and shared-expert MLP widths, the vocabulary
  for (const auto& [key, size] :
       {std::pair{"model.num_attention_heads", m.num_attention_heads},
        std::pair{"model.intermediate_size", m.intermediate_size},
        std::pair{"model.moe_intermediate_size", m.moe_intermediate_size}, std::pair{"model.vocab_size", m.vocab_size}})
    if (size % p.tp != 0)
      report.fail({"parallel.tp", key}, fmt::format("`parallel.tp` ({}) must divide `{}` ({})", p.tp, key, size));
  if (m.n_routed_experts > 0 && m.n_routed_experts % (p.ep * p.tp) != 0)
    report.fail({"parallel.ep", "parallel.tp", "model.n_routed_experts"},
                fmt::format("`parallel.ep` · `parallel.tp` ({}·{}) must divide `model.n_routed_experts` ({}): the "
                            "routed experts are split over the EP × TP ranks",
                            p.ep, p.tp, m.n_routed_experts));
  if (p.sequence_parallel) {
    if (p.tp < 2)
      report.fail(
          {"parallel.sequence_parallel", "parallel.tp"},
          "`parallel.sequence_parallel` splits tokens over the tensor-parallel ranks; it needs `parallel.tp` > 1");
    if ((r.train.micro_batch * r.train.seq_len) % p.tp != 0)
      report.fail({"parallel.sequence_parallel", "train.micro_batch", "train.seq_len", "parallel.tp"},
                  fmt::format("`parallel.sequence_parallel` splits each micro-batch's {}·{} tokens evenly over "
                              "`parallel.tp` ({}) ranks; it must divide them",
                              r.train.micro_batch, r.train.seq_len, p.tp));
  }
  if (p.pp > m.num_hidden_layers)
    report.fail({"parallel.pp", "model.num_hidden_layers"},
                fmt::format("`parallel.pp` ({}) exceeds `model.num_hidden_layers` ({}): every stage "
                            "needs a layer",
                            p.pp, m.num_hidden_layers));
  if (p.pp > 1 && m.tie_word_embeddings)
    report.fail({"parallel.pp", "model.tie_word_embeddings"},
                fmt::format("`parallel.pp` ({}) needs `model.tie_word_embeddings: false`: the embedding table lives "
                            "on the first pipeline stage and the output head on the last",
                            p.pp));
  const int64_t micro_batches = r.train.accumulation_steps(r.train.global_batch, p.dp);
  if (p.pp_schedule == PipelineSchedule::dualpipe && p.pp % 2 != 0)
    report.fail({"parallel.pp_schedule", "parallel.pp"},
                fmt::format("`parallel.pp_schedule` dualpipe needs an even `parallel.pp`, got {}", p.pp));
  if (p.pp_schedule == PipelineSchedule::dualpipe && micro_batches % 2 != 0)
    report.fail("parallel.pp_schedule",
                fmt::format("`parallel.pp_schedule` dualpipe needs an even number of micro-batches per step; "
                            "`train.global_batch` / (`train.micro_batch`·`parallel.dp`) = {}",
                            micro_batches));
  // Interleaved 1F1B cuts the model into pp·pp_chunks stages and walks the micro-batches in rounds
  // of pp (Megatron's order), so a step's micro-batches come in whole rounds.
  const bool interleaved = p.pp_schedule == PipelineSchedule::interleaved_1f1b;
  if (!interleaved && p.pp_chunks != ParallelSection{}.pp_chunks)
    report.fail({"parallel.pp_chunks", "parallel.pp_schedule"},
                fmt::format("`parallel.pp_chunks` ({}) applies to `parallel.pp_schedule` interleaved_1f1b only, "
                            "not {}",
                            p.pp_chunks, enum_name(p.pp_schedule)));
  if (interleaved && p.pp > 1) {
    if (m.num_hidden_layers < p.pp * p.pp_chunks)
      report.fail({"parallel.pp_chunks", "model.num_hidden_layers"},
                  fmt::format("`parallel.pp_schedule` interleaved_1f1b splits the model into `parallel.pp` x "
                              "`parallel.pp_chunks` = {} stages, more than `model.num_hidden_layers` ({}): every "
                              "stage needs a layer",
                              p.pp * p.pp_chunks, m.num_hidden_layers));
    if (micro_batches % p.pp != 0)
      report.fail({"parallel.pp_schedule", "train.global_batch"},
                  fmt::format("`parallel.pp_schedule` interleaved_1f1b runs the micro-batches in rounds of "
                              "`parallel.pp` = {}; `train.global_batch` / (`train.micro_batch`·`parallel.dp`) = {} "
                              "is not a multiple of it",
                              p.pp, micro_batches));
  }
  // DualPipeV cuts the model into 2·pp stages, two per rank, and fills its V with 2·pp micro-batches.
  if (p.pp > 1 && p.pp_schedule == PipelineSchedule::dualpipev) {
    if (m.num_hidden_layers < 2 * p.pp)
      report.fail({"parallel.pp_schedule", "model.num_hidden_layers"},
                  fmt::format("`parallel.pp_schedule` dualpipev splits the model into 2 x `parallel.pp` = {} stages, "
                              "more than `model.num_hidden_layers` ({}): every stage needs a layer",
                              2 * p.pp, m.num_hidden_layers));
    if (micro_batches < 2 * p.pp)
      report.fail({"parallel.pp_schedule", "train.global_batch"},
                  fmt::format("`parallel.pp_schedule` dualpipev needs at least 2 x `parallel.pp` = {} micro-batches "
                              "per step; `train.global_batch` / (`train.micro_batch`·`parallel.dp`) = {}",
                              2 * p.pp, micro_batches));
  }
}

void check_train(const Recipe& r, const Reporter& report) {
  const TrainSection& t = r.train;
  if (t.steps == 0 && t.tokens == 0) report.fail("train.steps", "set `train.steps` or `train.tokens` (both are 0)");
  if (t.steps > 0 && t.tokens > 0)
    report.fail({"train.tokens", "train.steps"},
                fmt::format("`train.steps` ({}) and `train.tokens` ({}) are both set; set one to 0", t.steps,
                            number(t.tokens)));
  // The GRPO stage takes its batches from grpo.prompts_per_step × grpo.group_size; the
  // pre-training batch keys are not used there.
  const int64_t quantum = t.micro_batch * r.parallel.dp;
  if (!r.grpo.enabled() && t.global_batch % quantum != 0)
    report.fail({"train.global_batch", "train.micro_batch", "parallel.dp"},
                fmt::format("`train.global_batch` ({}) must be a multiple of `train.micro_batch`·`parallel.dp` = "
                            "{}·{} = {}",
                            t.global_batch, t.micro_batch, r.parallel.dp, quantum));
  if (t.batch_ramp.start > t.global_batch)
    report.fail({"train.batch_ramp.start", "train.global_batch"},
                fmt::format("`train.batch_ramp.start` ({}) exceeds `train.global_batch` ({}); the ramp only grows",
                            t.batch_ramp.start, t.global_batch));
  if (t.batch_ramp.start > 0 && t.batch_ramp.tokens == 0)
    report.fail("train.batch_ramp.tokens", "`train.batch_ramp.start` is set, so `train.batch_ramp.tokens` must be > 0");
  if (t.seq_len > r.model.max_position_embeddings)
    report.fail({"train.seq_len", "model.max_position_embeddings"},
                fmt::format("`train.seq_len` ({}) exceeds `model.max_position_embeddings` ({})", t.seq_len,
                            r.model.max_position_embeddings));
  if (t.seq_len <= r.model.num_nextn_predict_layers)
    report.fail("train.seq_len",
                fmt::format("`train.seq_len` ({}) must exceed the MTP depth `model.num_nextn_predict_layers` ({})",
                            t.seq_len, r.model.num_nextn_predict_layers));
  for (size_t i = 0; i < t.recompute.size(); ++i) {
    if (t.recompute[i] == RecomputeKind::full && t.recompute.size() > 1)
      report.fail("train.recompute", "`train.recompute`: `full` recomputes every layer; write it alone");
    if (std::count(t.recompute.begin(), t.recompute.end(), t.recompute[i]) > 1)
      report.fail("train.recompute",
                  fmt::format("`train.recompute` lists `{}` more than once", enum_name(t.recompute[i])));
  }
}

void check_segments(const Recipe& r, const Reporter& report) {
  const auto& segments = r.optim.schedule.segments;
  if (segments.empty())
    report.fail("optim.schedule.segments", "`optim.schedule.kind` is piecewise but `optim.schedule.segments` is empty");
  const BatchSchedule batches(r);
  double peak = 0;
  for (size_t i = 0; i < segments.size(); ++i) {
    const LrSegment& segment = segments[i];
    peak = std::max(peak, segment.lr);
    if (i == 0) continue;
    const LrSegment& before = segments[i - 1];
    const std::string key = fmt::format("optim.schedule.segments[{}].until", i);
    if (segment.kind != SegmentKind::constant && segment.unit != before.unit)
      report.fail(fmt::format("optim.schedule.segments[{}].unit", i),
                  fmt::format("`optim.schedule.segments[{}]` ({}) ramps from the end of segment {}, which is in {}; "
                              "give both boundaries in the same unit",
                              i, enum_name(segment.kind), i - 1, enum_name(before.unit)));
    const double end = boundary_in_tokens(segment, batches);
    const double start = boundary_in_tokens(before, batches);
    if (end <= start)
      report.fail(key, fmt::format("`{}` ({} {}, token {}) must come after the end of segment {} ({} {}, token {})",
                                   key, number(segment.until), enum_name(segment.unit), number(end), i - 1,
                                   number(before.until), enum_name(before.unit), number(start)));
  }
  if (r.optim.lr != peak)
    report.fail("optim.lr", fmt::format("`optim.lr` ({}) must equal the highest LR of `optim.schedule.segments` ({}): "
                                        "it is the peak LR a piecewise schedule reaches",
                                        number(r.optim.lr), number(peak)));
}

void check_schedule(const Recipe& r, const Reporter& report) {
  const LrScheduleSection& s = r.optim.schedule;
  // The GRPO stage counts steps, not tokens (its LR is a function of the step alone).
  const bool in_tokens = s.unit == ScheduleUnit::tokens ||
                         std::any_of(s.segments.begin(), s.segments.end(),
                                     [](const LrSegment& segment) { return segment.unit == ScheduleUnit::tokens; });
  if (r.grpo.enabled() && in_tokens)
    report.fail({"optim.schedule.unit", "optim.schedule.segments"},
                "the GRPO stage counts steps: give `optim.schedule` (and its segments) in steps");
  if (s.kind == ScheduleKind::piecewise) {
    check_segments(r, report);
    return;
  }
  if (!s.segments.empty())
    report.fail(
        "optim.schedule.segments",
        fmt::format("`optim.schedule.segments` is only used by kind piecewise (kind is {})", enum_name(s.kind)));
  const std::string unit(enum_name(s.unit));
  const double run =
      s.unit == ScheduleUnit::steps ? static_cast<double>(total_steps(r)) : static_cast<double>(total_tokens(r));
  if (s.warmup > run)
    report.fail({"optim.schedule.warmup", "train.steps", "train.tokens"},
                fmt::format("`optim.schedule.warmup` ({} {}) is longer than the run ({} {})", number(s.warmup), unit,
                            number(run), unit));
  if (s.kind == ScheduleKind::wsd && s.warmup + s.decay_fraction * run > run)
    report.fail("optim.schedule.decay_fraction",
                fmt::format("`optim.schedule.warmup` ({} {}) plus the decay (`optim.schedule.decay_fraction` {} of "
                            "{} {}) is longer than the run",
                            number(s.warmup), unit, number(s.decay_fraction), number(run), unit));
}

void check_optim(const Recipe& r, const Reporter& report) {
  for (size_t i = 0; i < r.optim.no_decay.size(); ++i)
    if (r.optim.no_decay[i].empty())
      report.fail(fmt::format("optim.no_decay[{}]", i), fmt::format("`optim.no_decay[{}]` is an empty pattern", i));
  check_schedule(r, report);
}

void check_checkpoint(const Recipe& r, const Reporter& report) {
  const std::string& resume = r.checkpoint.resume;
  if (resume.empty())
    report.fail("checkpoint.resume", "`checkpoint.resume` must be auto, never or a checkpoint path, got \"\"");
  if (resume != "auto" && resume != "never" && !std::filesystem::exists(resume))
    report.fail(
        "checkpoint.resume",
        fmt::format("`checkpoint.resume`: no checkpoint at `{}` (use auto, never or an existing path)", resume));
}

// The prompt source and its tokenizer: exactly one of grpo.task / grpo.prompts, files that
// exist, a vocabulary the model covers, prompts plus completions within the positions.
void check_grpo_source(const Recipe& r, const Reporter& report) {
  const GrpoSection& g = r.grpo;
  if (g.task != GrpoTask::none && !g.prompts.empty())
    report.fail(
        {"grpo.prompts", "grpo.task"},
        fmt::format("`grpo.prompts` and `grpo.task` ({}) are both set; choose one prompt source", enum_name(g.task)));
  if (g.task == GrpoTask::addition) {
    const grpo::AdditionTask task({.digits = g.addition.digits, .direct_fraction = 0, .seed = 0});
    const auto vocab = static_cast<int64_t>(task.tokenizer().vocab_size());
    if (vocab > r.model.vocab_size)
      report.fail({"model.vocab_size", "grpo.task"},
                  fmt::format("`model.vocab_size` ({}) is smaller than the addition task's vocabulary ({})",
                              r.model.vocab_size, vocab));
    int64_t largest = 1;
    for (int64_t d = 0; d < g.addition.digits; ++d) largest *= 10;
    --largest;
    const auto prompt = static_cast<int64_t>(
        grpo::encode_prompt(task.tokenizer(), grpo::AdditionTask::prompt_text(largest, largest)).size());
    if (prompt + g.max_completion_length > r.model.max_position_embeddings)
      report.fail({"grpo.max_completion_length", "model.max_position_embeddings"},
                  fmt::format("`grpo.max_completion_length` ({}) plus the longest addition prompt ({} tokens) exceeds "
                              "`model.max_position_embeddings` ({})",
                              g.max_completion_length, prompt, r.model.max_position_embeddings));
    if (g.eval.count > 0 && g.eval.prompts.empty() && g.eval.count > task.heldout_capacity())
      report.fail("grpo.eval.count", fmt::format("`grpo.eval.count` ({}) exceeds the {} held-out prompts of the "
                                                 "addition task with {} digits",
                                                 g.eval.count, task.heldout_capacity(), g.addition.digits));
    return;
  }
  check_file("grpo.prompts", g.prompts, report);
  if (r.data.tokenizer.empty())
    report.fail({"data.tokenizer", "grpo.prompts"},
                "`grpo.prompts` needs `data.tokenizer`: the tokenizer.json that turns the prompts into tokens");
  const auto vocab = static_cast<int64_t>(data::Tokenizer::load(r.data.tokenizer).vocab_size());
  if (vocab > r.model.vocab_size)
    report.fail({"model.vocab_size", "data.tokenizer"},
                fmt::format("`model.vocab_size` ({}) is smaller than the vocabulary of `data.tokenizer` ({})",
                            r.model.vocab_size, vocab));
  if (g.sft_steps > 0)
    report.fail({"grpo.sft_steps", "grpo.prompts"},
                "`grpo.sft_steps` needs a built-in task (`grpo.task`), which provides the reference completions");
  if (g.eval.count > 0 && g.eval.prompts.empty())
    report.fail({"grpo.eval.prompts", "grpo.eval.count"},
                "`grpo.eval.count` > 0 with `grpo.prompts` needs `grpo.eval.prompts` (a held-out JSONL prompt set); "
                "or set `grpo.eval.count: 0`");
}

void check_grpo_rewards(const GrpoSection& g, const Reporter& report) {
  if (g.rewards.empty()) report.fail("grpo.rewards", "`grpo.rewards` is empty; list at least one reward");
  static constexpr std::string_view kBuiltIn[] = {"answer_match", "format", "overlong_penalty"};
  for (size_t i = 0; i < g.rewards.size(); ++i) {
    const GrpoReward& reward = g.rewards[i];
    const std::string key = fmt::format("grpo.rewards[{}].name", i);
    const bool built_in = std::find(std::begin(kBuiltIn), std::end(kBuiltIn), reward.name) != std::end(kBuiltIn);
    if (reward.name.empty()) report.fail(key, fmt::format("`{}` is empty", key));
    if (built_in && !reward.command.empty())
      report.fail(key, fmt::format("`{}` ({}) is a built-in reward; give the external program in `command` another "
                                   "name",
                                   key, reward.name));
    if (!built_in && reward.command.empty())
      report.fail(key, fmt::format("`{}` ({}) is not a built-in reward (answer_match, format, overlong_penalty); "
                                   "an external reward needs `grpo.rewards[{}].command`",
                                   key, reward.name, i));
    if (!std::isfinite(reward.weight))
      report.fail(fmt::format("grpo.rewards[{}].weight", i),
                  fmt::format("`grpo.rewards[{}].weight` must be a finite number", i));
    for (size_t j = 0; j < i; ++j)
      if (g.rewards[j].name == reward.name)
        report.fail(key, fmt::format("`{}` ({}) repeats the name of `grpo.rewards[{}]`", key, reward.name, j));
    if (reward.name == "overlong_penalty" && g.overlong_cache > g.max_completion_length)
      report.fail({"grpo.overlong_cache", "grpo.max_completion_length"},
                  fmt::format("`grpo.overlong_cache` ({}) exceeds `grpo.max_completion_length` ({})", g.overlong_cache,
                              g.max_completion_length));
  }
}

void check_grpo(const Recipe& r, const Reporter& report) {
  const GrpoSection& g = r.grpo;
  if (!g.enabled()) return;  // a pre-training recipe: the defaults are never used
  check_grpo_source(r, report);
  check_grpo_rewards(g, report);
  if (r.train.tokens > 0)
    report.fail("train.tokens",
                "the GRPO stage counts steps: set `train.steps` (GRPO steps) instead of "
                "`train.tokens`");
  if (g.resample_rounds > 0 && !g.dynamic_sampling)
    report.fail({"grpo.resample_rounds", "grpo.dynamic_sampling"},
                "`grpo.resample_rounds` refills the groups dynamic sampling drops; set `grpo.dynamic_sampling: "
                "true`");
  if (r.optim.ema_decay > 0)
    report.fail("optim.ema_decay", "`optim.ema_decay`: the GRPO stage keeps no weight EMA; set it to 0");
  if (g.ref_refresh_interval > 0 && g.beta == 0)
    report.fail({"grpo.ref_refresh_interval", "grpo.beta"},
                "`grpo.ref_refresh_interval` is set but `grpo.beta` is 0, so there is no reference model to refresh");
  if (!g.init_checkpoint.empty() &&
      !std::filesystem::exists(std::filesystem::path(g.init_checkpoint) / "manifest.json"))
    report.fail("grpo.init_checkpoint",
                fmt::format("`grpo.init_checkpoint`: `{}` is not a checkpoint directory (no manifest.json)",
                            g.init_checkpoint));
  if (!g.eval.prompts.empty()) check_file("grpo.eval.prompts", g.eval.prompts, report);
  // The GRPO stage runs data-parallel only: every rank holds the whole model (its generator reads
  // every expert locally) and owns whole prompt groups of each step (trainer/grpo/grpo_trainer.cpp).
  const ParallelSection& p = r.parallel;
  if (p.ep > 1)
    report.fail("parallel.ep",
                fmt::format("`parallel.ep` ({}): the GRPO stage does not shard experts (its generator reads every "
                            "expert locally); set parallel.ep to 1 and scale with parallel.dp",
                            p.ep));
  for (const auto& [key, size] : {std::pair{"parallel.pp", p.pp}, std::pair{"parallel.tp", p.tp}})
    if (size > 1)
      report.fail(key, fmt::format("`{}` ({}): the GRPO stage runs data-parallel only; set it to 1 and scale with "
                                   "parallel.dp",
                                   key, size));
  if (p.dp > 1 && g.prompts_per_step % p.dp != 0)
    report.fail({"grpo.prompts_per_step", "parallel.dp"},
                fmt::format("`grpo.prompts_per_step` ({}) must be a multiple of `parallel.dp` ({}): each rank "
                            "takes the same number of whole prompt groups",
                            g.prompts_per_step, p.dp));
  if (p.dp > 1 && g.debug_advantages == GrpoAdvantages::shuffled)
    report.fail({"grpo.debug_advantages", "parallel.dp"},
                "`grpo.debug_advantages: shuffled` permutes advantages across the whole step; run it in one "
                "process (parallel.dp: 1)");
}

}  // namespace

void validate(const Recipe& recipe, const schema::Locations* locations) {
  const Reporter report(locations);
  schema::check_values(recipe, report);
  check_attention(recipe.model, report);
  check_experts(recipe.model, report);
  validate_model_config(recipe.model);  // the model's own invariants, should it know more than the above
  check_precision(recipe, report);
  check_precision_exceptions(recipe, report);
  check_data(recipe, report);
  check_train(recipe, report);  // before the layout and schedule: they build the batch schedule
  check_layout(recipe, report);
  check_optim(recipe, report);
  check_checkpoint(recipe, report);
  check_grpo(recipe, report);
}

void validate(const Recipe& recipe) {
  validate(recipe, nullptr);
}

}  // namespace dsx
