#include "trainer/recipe/summary.h"

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <string_view>
#include <vector>

#include "trainer/model/param_count.h"
#include "trainer/optim/lr_schedule.h"

namespace dsx {
namespace {

std::string line(const char* label, const std::string& text) {
  return fmt::format("{:<11} {}\n", label, text);
}

std::string model_line(const ModelSection& m) {
  const int64_t dense = std::min(m.first_k_dense_replace, m.num_hidden_layers);
  const int64_t moe = m.n_routed_experts > 0 ? m.num_hidden_layers - dense : 0;
  return fmt::format("{} layers ({} dense + {} MoE), hidden {}, {} heads, vocab {}, on {} in {}", m.num_hidden_layers,
                     m.num_hidden_layers - moe, moe, m.hidden_size, m.num_attention_heads, m.vocab_size,
                     enum_name(m.device), dtype_name(m.dtype));
}

std::string attention_line(const ModelSection& m) {
  const std::string query = m.q_lora_rank > 0 ? fmt::format("q_lora_rank {}", m.q_lora_rank) : "direct q projection";
  const std::string rope = m.rope_scaling.type == "yarn" ? fmt::format(", YaRN x{:g}", m.rope_scaling.factor) : "";
  return fmt::format("MLA: {}, kv_lora_rank {}, qk head {} + {} rope, v head {}{}", query, m.kv_lora_rank,
                     m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim, rope);
}

std::string experts_line(const ModelSection& m) {
  const std::string mtp = m.num_nextn_predict_layers > 0
                              ? fmt::format("MTP depth {} (λ {:g})", m.num_nextn_predict_layers, m.mtp_loss_weight)
                              : "no MTP";
  if (m.n_routed_experts == 0) return "none (dense model); " + mtp;
  const std::string groups =
      m.n_group > 1 ? fmt::format(" within the best {} of {} groups", m.topk_group, m.n_group) : "";
  return fmt::format("{} routed (top-{}{}, {}, scale {:g}) + {} shared, width {}; {}", m.n_routed_experts,
                     m.num_experts_per_tok, groups, m.scoring_func, m.routed_scaling_factor, m.n_shared_experts,
                     m.moe_intermediate_size, mtp);
}

std::string parameters_line(const ModelSection& m) {
  const ParameterCounts counts = count_parameters(m);
  const std::string mtp = counts.mtp > 0 ? fmt::format(", MTP {} more", human_count(counts.mtp)) : "";
  return fmt::format("total {}, active {} per token ({} without the embedding){}", human_count(counts.total),
                     human_count(counts.active), human_count(counts.active_non_embedding), mtp);
}

std::string batch_line(const Recipe& r) {
  const TrainSection& t = r.train;
  if (r.grpo.enabled()) {  // the GRPO stage's batches are prompt groups; train.global_batch is unused
    const GrpoSection& g = r.grpo;
    return fmt::format("GRPO: {} prompts x {} completions = {} sequences per step, completions up to {} tokens",
                       g.prompts_per_step, g.group_size, g.prompts_per_step * g.group_size, g.max_completion_length);
  }
  const int64_t accumulation = t.accumulation_steps(t.global_batch, r.parallel.dp);
  std::string text =
      fmt::format("{} sequences x {} tokens = {} tokens per step ({} micro-batches of {} per rank)", t.global_batch,
                  t.seq_len, human_count(static_cast<double>(t.global_batch * t.seq_len)), accumulation, t.micro_batch);
  if (BatchSchedule(r).ramps())
    text += fmt::format("; ramp from {} over {} tokens", t.batch_ramp.start, human_count(t.batch_ramp.tokens));
  return text;
}

std::string run_line(const Recipe& r) {
  std::vector<std::string_view> kinds;
  for (const auto kind : r.train.recompute) kinds.push_back(enum_name(kind));
  const std::string recompute = kinds.empty() ? std::string("nothing") : fmt::format("{}", fmt::join(kinds, ", "));
  if (r.grpo.enabled()) {
    return fmt::format("{} GRPO steps after {} supervised; recompute {}", r.train.steps, r.grpo.sft_steps, recompute);
  }
  return fmt::format("{} steps, {} tokens; recompute {}", total_steps(r),
                     human_count(static_cast<double>(total_tokens(r))), recompute);
}

std::string layout_line(const Recipe& r) {
  const ParallelSection& p = r.parallel;
  const int64_t world = p.pp * p.dp * p.tp;
  const std::string experts =
      p.tp > 1 ? fmt::format("experts split over ep x tp = {} ranks, replicated {}x", p.ep * p.tp, p.dp / p.ep)
               : fmt::format("experts replicated {}x", p.dp / p.ep);
  return fmt::format(
      "{} rank{} = pp {} x dp {} x tp {}; ep {} inside dp ({}); ZeRO-{}; {}{}{}", world, world == 1 ? "" : "s", p.pp,
      p.dp, p.tp, p.ep, experts, p.zero, enum_name(p.pp_schedule),
      p.pp_schedule == PipelineSchedule::interleaved_1f1b ? fmt::format(" x {} chunks", p.pp_chunks) : std::string(),
      p.pp > 1 ? fmt::format(", {} split", enum_name(p.pp_split)) : std::string());
}

std::string precision_line(const Recipe& r) {
  const PrecisionSection& p = r.precision;
  return fmt::format("activations {}, gemm {}, dispatch {}, combine {}, AdamW moments {}", enum_name(p.activations),
                     enum_name(p.gemm), enum_name(p.dispatch), enum_name(p.combine), enum_name(r.optim.moments));
}

std::string data_line(const Recipe& r) {
  const DataSection& d = r.data;
  if (d.kind == DataKind::synthetic) {
    const int64_t vocab = d.synthetic.vocab_size > 0 ? d.synthetic.vocab_size : r.model.vocab_size;
    return fmt::format("synthetic Markov chain: vocab {}, order {}, branching {}, decay {:g}, seed {}", vocab,
                       d.synthetic.order, d.synthetic.branching, d.synthetic.decay, d.seed);
  }
  std::string text = fmt::format("{} dataset(s):", d.sources.size());
  for (const auto& source : d.sources) text += fmt::format(" {} (weight {:g})", source.path, source.weight);
  return text;
}

std::string output_line(const Recipe& r) {
  const CheckpointSection& c = r.checkpoint;
  const std::string every = c.interval > 0 ? fmt::format("every {} steps", c.interval) : "at the end";
  return fmt::format("{}; checkpoints {} {}, keep {}, resume {}", r.logging.run_dir, c.dir, every, c.keep_last,
                     c.resume);
}

}  // namespace

std::string human_count(double value) {
  const double magnitude = std::fabs(value);
  if (magnitude >= 1e12) return fmt::format("{:.3g}T", value / 1e12);
  if (magnitude >= 1e9) return fmt::format("{:.1f}B", value / 1e9);
  if (magnitude >= 1e6) return fmt::format("{:.2f}M", value / 1e6);
  if (magnitude >= 1e4) return fmt::format("{:.1f}K", value / 1e3);
  return fmt::format("{:g}", value);
}

std::string summarize(const Recipe& r) {
  return line("model", model_line(r.model)) + line("attention", attention_line(r.model)) +
         line("experts", experts_line(r.model)) + line("parameters", parameters_line(r.model)) +
         line("batch", batch_line(r)) + line("run", run_line(r)) + line("layout", layout_line(r)) +
         line("lr", LrSchedule(r).describe()) + line("precision", precision_line(r)) + line("data", data_line(r)) +
         line("output", output_line(r));
}

}  // namespace dsx
