#include "trainer/recipe/schema.h"

#include <fmt/core.h>
#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <functional>
#include <set>

#include "kernels/error.h"
#include "trainer/recipe/schema_codecs.h"
#include "trainer/recipe/suggest.h"

namespace dsx::schema {

void Reporter::fail(std::string_view key, const std::string& message) const {
  const std::string location = location_of(key);
  throw UserError(location.empty() ? message : location + ": " + message);
}

void Reporter::fail(std::initializer_list<std::string_view> keys, const std::string& message) const {
  std::string location;
  for (const auto key : keys) {
    const std::string here = location_of(key);
    if (here.starts_with("--set ")) {
      location = here;
      break;
    }
    if (location.empty()) location = here;
  }
  throw UserError(location.empty() ? message : location + ": " + message);
}

std::string Reporter::location_of(std::string_view key) const {
  if (locations_ == nullptr) return "";
  // The key itself, else the nearest enclosing path that has a location (a --set of a whole map).
  std::string path(key);
  while (!path.empty()) {
    if (auto it = locations_->find(path); it != locations_->end()) return it->second;
    const size_t cut = path.find_last_of(".[");
    path.resize(cut == std::string::npos ? 0 : cut);
  }
  return "";
}

namespace {

// A range rule on a numeric key: "must be <requirement>".
struct Rule {
  std::string requirement;
  std::function<bool(double)> ok;
};
Rule positive() {
  return {"> 0", [](double v) { return v > 0; }};
}
Rule non_negative() {
  return {">= 0", [](double v) { return v >= 0; }};
}
Rule at_least(double low) {
  return {fmt::format(">= {}", low), [low](double v) { return v >= low; }};
}
Rule in_closed(double low, double high) {
  return {fmt::format("in [{}, {}]", low, high), [low, high](double v) { return v >= low && v <= high; }};
}
Rule in_half_open(double low, double high) {
  return {fmt::format("in [{}, {})", low, high), [low, high](double v) { return v >= low && v < high; }};
}

// How one key is read, written, compared and checked, for objects of type Root (the Recipe,
// or one element of a list of records such as data.sources).
template <class Root>
struct Field {
  std::string path;  // relative to Root, dotted
  std::string type;
  std::string doc;
  bool required = false;  // record fields only: must be written
  std::function<void(Root&, const YAML::Node&, const ReadContext&)> read;
  std::function<YAML::Node(const Root&)> write;
  std::function<bool(const Root&, const Root&)> same;
  std::function<void(const Root&, const std::string& shown_path, const Reporter&)> check;
  std::vector<KeyInfo> record_keys;  // lists of records: their fields (paths relative to an element)
};

template <class Root>
using Table = std::vector<Field<Root>>;

// A key whose value is `access(root)`, read and written by Codec.
template <class Root, class CodecT = void, class Access>
Field<Root> key(std::string path, Access access, std::string doc, std::vector<Rule> rules = {}) {
  using T = std::remove_cvref_t<decltype(access(std::declval<Root&>()))>;
  using C = std::conditional_t<std::is_void_v<CodecT>, Codec<T>, CodecT>;
  Field<Root> field;
  field.path = std::move(path);
  field.type = C::type();
  field.doc = std::move(doc);
  field.read = [access](Root& root, const YAML::Node& node, const ReadContext& context) {
    access(root) = C::read(node, context);
  };
  field.write = [access](const Root& root) { return C::write(access(root)); };
  field.same = [access](const Root& a, const Root& b) { return access(a) == access(b); };
  field.check = [access, rules](const Root& root, const std::string& shown, const Reporter& report) {
    if constexpr (std::is_arithmetic_v<T> && !std::is_same_v<T, bool>) {
      const auto value = access(root);
      for (const auto& rule : rules)
        if (!rule.ok(static_cast<double>(value)))
          report.fail(shown,
                      fmt::format("`{}` must be {}, got {}", shown, rule.requirement, Codec<T>::write(value).Scalar()));
    }
  };
  return field;
}

template <class Root>
Field<Root> required(Field<Root> field) {
  field.required = true;
  return field;
}

std::string default_text(const YAML::Node& value) {
  YAML::Emitter out;
  out << YAML::Flow << value;
  return out.c_str();
}

// ---- reading a map of keys ----------------------------------------------------------------

// Locations of values: the --set text for overridden paths, else "file:line:col".
std::string locate(const ReadSession& session, const std::string& shown_path, const YAML::Node& node) {
  const std::string from_command_line = Reporter(&session.overridden).location_of(shown_path);
  if (!from_command_line.empty()) return from_command_line;
  const YAML::Mark mark = node.Mark();
  if (mark.line < 0) return session.source_name;
  return fmt::format("{}:{}:{}", session.source_name, mark.line + 1, mark.column + 1);
}

std::string joined(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// Every proper dotted prefix of the table's paths: the maps a recipe may contain.
template <class Root>
std::set<std::string> map_paths(const Table<Root>& table) {
  std::set<std::string> maps;
  for (const auto& field : table)
    for (size_t dot = field.path.find('.'); dot != std::string::npos; dot = field.path.find('.', dot + 1))
      maps.insert(field.path.substr(0, dot));
  return maps;
}

template <class Root>
const Field<Root>* find_field(const Table<Root>& table, const std::string& path) {
  for (const auto& field : table)
    if (field.path == path) return &field;
  return nullptr;
}

// Reads `node` (a map at `prefix` inside Root) into `root`. `shown_base` is what precedes the
// relative path in messages ("" for the recipe, "data.sources[2]" for a record).
template <class Root>
struct MapReader {
  const Table<Root>& table;
  const std::set<std::string>& maps;
  const std::function<std::string(const std::string&)>& suggest;  // relative path -> hint
  const ReadSession& session;

  static std::string shown(const std::string& shown_base, const std::string& path) {
    return shown_base.empty() ? path : path.empty() ? shown_base : shown_base + "." + path;
  }

  void read(const YAML::Node& node, const std::string& prefix, const std::string& shown_base, Root& root,
            std::set<std::string>& seen_fields) const {
    std::set<std::string> seen_here;
    for (const auto& entry : node) {
      const YAML::Node& name_node = entry.first;
      if (!name_node.IsScalar())
        throw UserError(fmt::format("{}: keys must be plain names (in `{}`)",
                                    locate(session, shown(shown_base, prefix), name_node), shown(shown_base, prefix)));
      const std::string path = joined(prefix, name_node.Scalar());
      const std::string display = shown(shown_base, path);
      const std::string key_location = locate(session, display, name_node);
      if (!seen_here.insert(name_node.Scalar()).second)
        throw UserError(fmt::format("{}: duplicate key `{}`", key_location, display));
      if (const Field<Root>* field = find_field(table, path)) {
        const std::string value_location = locate(session, display, entry.second);
        session.where[display] = value_location;
        field->read(root, entry.second, ReadContext{display, value_location + ": ", &session});
        seen_fields.insert(path);
      } else if (maps.count(path) != 0) {
        if (entry.second.IsNull()) continue;  // `model:` with nothing under it keeps the defaults
        if (!entry.second.IsMap())
          wrong_type(ReadContext{display, locate(session, display, entry.second) + ": ", &session}, "a map of keys",
                     entry.second);
        read(entry.second, path, shown_base, root, seen_fields);
      } else {
        const bool section = prefix.empty() && shown_base.empty();
        throw UserError(
            fmt::format("{}: unknown {} `{}`{}", key_location, section ? "section" : "key", display, suggest(path)));
      }
    }
  }
};

// A key holding a list of records (maps) of type Elem, each read with its own table.
template <class Root, class Elem, class Access>
Field<Root> records(std::string path, Access access, const Table<Elem>& element_table, std::string doc) {
  Field<Root> field;
  field.path = std::move(path);
  std::vector<std::string> members;
  for (const auto& f : element_table) members.push_back(f.path);
  field.type = fmt::format("list of {{{}}}", fmt::join(members, ", "));
  field.doc = std::move(doc);
  for (const auto& f : element_table) {
    field.record_keys.push_back({f.path, f.type, f.required ? "required" : default_text(f.write(Elem{})), f.doc});
  }
  field.read = [access, element_table, list_path = field.path](Root& root, const YAML::Node& node,
                                                               const ReadContext& context) {
    if (!node.IsSequence()) wrong_type(context, "a list of maps", node);
    const ReadSession& session = *context.session;
    const auto maps = map_paths(element_table);
    const std::function<std::string(const std::string&)> suggest = [&](const std::string& name) {
      std::vector<std::string> names;
      for (const auto& f : element_table) names.push_back(f.path);
      const auto guess = closest_match(name, names);
      return guess ? fmt::format("; did you mean `{}[].{}`?", list_path, *guess) : std::string();
    };
    const MapReader<Elem> reader{element_table, maps, suggest, session};
    std::vector<Elem> elements;
    for (size_t i = 0; i < node.size(); ++i) {
      const std::string element_path = fmt::format("{}[{}]", context.path, i);
      const std::string element_location = locate(session, element_path, node[i]);
      if (!node[i].IsMap()) wrong_type(ReadContext{element_path, element_location + ": ", &session}, "a map", node[i]);
      Elem element;
      std::set<std::string> seen;
      reader.read(node[i], "", element_path, element, seen);
      for (const auto& f : element_table)
        if (f.required && seen.count(f.path) == 0)
          throw UserError(fmt::format("{}: `{}` is missing `{}`", element_location, element_path, f.path));
      elements.push_back(std::move(element));
    }
    access(root) = std::move(elements);
  };
  field.write = [access, element_table](const Root& root) {
    YAML::Node list(YAML::NodeType::Sequence);
    for (const Elem& element : access(root)) {
      YAML::Node item(YAML::NodeType::Map);
      for (const auto& f : element_table) item[f.path] = f.write(element);
      item.SetStyle(YAML::EmitterStyle::Flow);
      list.push_back(item);
    }
    return list;
  };
  field.same = [access](const Root& a, const Root& b) { return access(a) == access(b); };
  field.check = [access, element_table](const Root& root, const std::string& shown, const Reporter& report) {
    const auto& elements = access(root);
    for (size_t i = 0; i < elements.size(); ++i)
      for (const auto& f : element_table) f.check(elements[i], fmt::format("{}[{}].{}", shown, i, f.path), report);
  };
  return field;
}

// ---- the tables --------------------------------------------------------------------------

#define DSX_KEY(member)           \
#member, [](auto& r) -> auto& { \
    return r.member;              \
  }

const Table<DataSource>& source_table() {
  static const Table<DataSource> table = {
      required(key<DataSource>(DSX_KEY(path),
                               "dataset directory made by `dsx data prep` (relative to the working "
                               "directory)")),
      key<DataSource>(DSX_KEY(weight), "blending weight; each source's share is weight / sum of weights", {positive()}),
  };
  return table;
}

const Table<LrSegment>& segment_table() {
  static const Table<LrSegment> table = {
      required(key<LrSegment>(DSX_KEY(until), "where the segment ends (cumulative, in `unit`)", {positive()})),
      key<LrSegment>(DSX_KEY(unit), "unit of `until`"),
      key<LrSegment>(DSX_KEY(kind),
                     "linear or cosine from the previous segment's LR (0 before the first) to `lr`; constant holds "
                     "`lr`"),
      required(key<LrSegment>(DSX_KEY(lr), "LR at the end of the segment (absolute)", {non_negative()})),
  };
  return table;
}

const Table<PrecisionException>& precision_exception_table() {
  static const Table<PrecisionException> table = {
      required(key<PrecisionException>(DSX_KEY(modules),
                                       "fnmatch pattern on Hugging Face parameter names, e.g. \"*.mlp.experts.*\"")),
      required(key<PrecisionException>(DSX_KEY(gemm), "GEMM precision of the matching weights")),
  };
  return table;
}

Table<Recipe> model_keys() {
  return {
      key<Recipe>(DSX_KEY(model.device), "device holding the model and running its ops"),
      key<Recipe, ModelDTypeCodec>(DSX_KEY(model.dtype),
                                   "float type of parameters and master weights; f64 for gradient checks "
                                   "(needs every precision.* at fp32)"),
      key<Recipe>(DSX_KEY(model.vocab_size), "vocabulary size: embedding rows and output-head columns", {positive()}),
      key<Recipe>(DSX_KEY(model.hidden_size), "width of the residual stream", {positive()}),
      key<Recipe>(DSX_KEY(model.intermediate_size), "hidden width of the dense SwiGLU FFN layers", {positive()}),
      key<Recipe>(DSX_KEY(model.num_hidden_layers), "transformer layers (dense then MoE)", {positive()}),
      key<Recipe>(DSX_KEY(model.num_attention_heads), "attention heads", {positive()}),
      key<Recipe>(DSX_KEY(model.q_lora_rank), "query compression rank; 0 = direct query projection (V2-Lite)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(model.kv_lora_rank), "key/value latent rank (the MLA cache width)", {positive()}),
      key<Recipe>(DSX_KEY(model.qk_nope_head_dim), "per-head query/key width without rotary embedding", {positive()}),
      key<Recipe>(DSX_KEY(model.qk_rope_head_dim),
                  "per-head rotary width (decoupled key shared by heads); even, RoPE rotates pairs", {positive()}),
      key<Recipe>(DSX_KEY(model.v_head_dim), "per-head value width", {positive()}),
      key<Recipe>(DSX_KEY(model.n_routed_experts), "routed experts per MoE layer; 0 = every layer dense",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(model.n_shared_experts), "always-on shared experts per MoE layer", {non_negative()}),
      key<Recipe>(DSX_KEY(model.num_experts_per_tok), "routed experts chosen per token (top-k)", {non_negative()}),
      key<Recipe>(DSX_KEY(model.moe_intermediate_size), "hidden width of each expert's SwiGLU FFN", {positive()}),
      key<Recipe>(DSX_KEY(model.first_k_dense_replace), "the first k layers use the dense FFN instead of MoE",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(model.n_group), "expert groups for group-limited routing; divides n_routed_experts",
                  {positive()}),
      key<Recipe>(DSX_KEY(model.topk_group), "groups a token may route to (best by sum of top-2 scores)", {positive()}),
      key<Recipe>(DSX_KEY(model.routed_scaling_factor), "multiplier on the routed experts' gate weights", {positive()}),
      key<Recipe, ChoiceCodec<kScoringFuncs>>(DSX_KEY(model.scoring_func),
                                              "router score: sigmoid (V3) or softmax (V2)"),
      key<Recipe>(DSX_KEY(model.norm_topk_prob), "normalise the chosen experts' gate weights to sum to 1"),
      key<Recipe>(DSX_KEY(model.num_nextn_predict_layers), "multi-token prediction depth D (0 = no MTP)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(model.rms_norm_eps), "epsilon of every RMSNorm", {positive()}),
      key<Recipe>(DSX_KEY(model.rope_theta), "RoPE base", {positive()}),
      key<Recipe, ChoiceCodec<kRopeScalingTypes>>(DSX_KEY(model.rope_scaling.type), "RoPE scaling: none or yarn"),
      key<Recipe>(DSX_KEY(model.rope_scaling.factor), "YaRN context extension factor", {at_least(1)}),
      key<Recipe>(DSX_KEY(model.rope_scaling.original_max_position_embeddings),
                  "YaRN: context length the model was pre-trained with", {positive()}),
      key<Recipe>(DSX_KEY(model.rope_scaling.beta_fast), "YaRN: high-frequency ramp boundary (rotations)",
                  {positive()}),
      key<Recipe>(DSX_KEY(model.rope_scaling.beta_slow), "YaRN: low-frequency ramp boundary (rotations)", {positive()}),
      key<Recipe>(DSX_KEY(model.rope_scaling.mscale), "YaRN: attention-temperature coefficient", {non_negative()}),
      key<Recipe>(DSX_KEY(model.rope_scaling.mscale_all_dim), "YaRN: mscale applied to all dims (0 = none)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(model.max_position_embeddings), "longest sequence the positions support", {positive()}),
      key<Recipe>(DSX_KEY(model.tie_word_embeddings), "share the embedding matrix with the output head"),
      key<Recipe>(DSX_KEY(model.initializer_range), "std of the normal initialisation (DeepSeek-V3: 0.006)",
                  {positive()}),
      key<Recipe>(DSX_KEY(model.bias_update_rate), "aux-loss-free balancing: router bias step γ per training step",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(model.seq_aux_loss_alpha), "sequence-wise balance loss weight α (0 = off)", {non_negative()}),
      key<Recipe>(DSX_KEY(model.mtp_loss_weight), "MTP loss weight λ", {non_negative()}),
  };
}

Table<Recipe> data_keys() {
  return {
      key<Recipe>(DSX_KEY(data.kind),
                  "synthetic (generated, nothing to prepare) or datasets (directories from `dsx data prep`)"),
      key<Recipe>(DSX_KEY(data.seed), "seed of the data order (datasets) or of the generating chain (synthetic)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(data.synthetic.vocab_size), "synthetic tokens lie in [0, vocab_size); 0 = model.vocab_size",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(data.synthetic.order), "Markov order: the next token depends on this many previous ones",
                  {positive()}),
      key<Recipe>(DSX_KEY(data.synthetic.branching), "possible successors of each context", {positive()}),
      key<Recipe>(DSX_KEY(data.synthetic.decay),
                  "successor k has probability ∝ decay^k; 1 = equally likely (lowest loss ln(branching))",
                  {Rule{"in (0, 1]", [](double v) { return v > 0 && v <= 1; }}}),
      records<Recipe>(DSX_KEY(data.sources), source_table(), "kind datasets: token datasets blended by weight"),
      key<Recipe>(DSX_KEY(data.tokenizer), "tokenizer.json the datasets must have been made with; \"\" = none"),
      key<Recipe>(DSX_KEY(data.tokenizer_hash),
                  "tokenizer hash the datasets must carry (as `dsx data prep` records "
                  "it); \"\" = the datasets only need to agree"),
  };
}

Table<Recipe> parallel_keys() {
  return {
      key<Recipe>(DSX_KEY(parallel.world_size), "ranks in the job; 0 = pp·dp·tp, otherwise must equal it",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(parallel.pp), "pipeline-parallel stages (contiguous runs of layers, 1F1B)", {positive()}),
      key<Recipe>(DSX_KEY(parallel.dp), "data-parallel ranks", {positive()}),
      key<Recipe>(DSX_KEY(parallel.tp),
                  "tensor-parallel ranks (divides heads, FFN widths and the vocabulary; CPU ranks only so far)",
                  {positive()}),
      key<Recipe>(DSX_KEY(parallel.sequence_parallel),
                  "with tp > 1, keep the residual stream and the norms on 1/tp of each micro-batch's tokens per "
                  "rank (all-gather before, reduce-scatter after each tensor-parallel block; pipeline stages pass 1/tp "
                  "of the tokens)"),
      key<Recipe>(DSX_KEY(parallel.ep), "expert-parallel ranks, carved out of dp (divides dp and n_routed_experts)",
                  {positive()}),
      key<Recipe>(DSX_KEY(parallel.zero), "ZeRO stage: 0 = replicated optimizer state, 1 = sharded over dp",
                  {in_closed(0, 1)}),
      key<Recipe>(DSX_KEY(parallel.overlap_a2a), "overlap expert all-to-all with compute (two chunks per micro-batch)"),
      key<Recipe>(DSX_KEY(parallel.comm_timeout_s), "a collective waiting longer aborts the job with its name",
                  {positive()}),
      key<Recipe>(DSX_KEY(parallel.pp_schedule),
                  "pipeline schedule: 1f1b, interleaved_1f1b (pp_chunks stages per rank), zero_bubble and "
                  "dualpipev are built (on GPUs, layouts whose transfers one in-order NCCL stream cannot keep are "
                  "refused); dualpipe is not (DeepSeek-V3 used it)"),
      key<Recipe>(DSX_KEY(parallel.pp_chunks),
                  "interleaved_1f1b: model chunks (virtual stages) per pipeline rank; the model is cut into "
                  "pp·pp_chunks stages, rank r holding stages r, r + pp, ... (Megatron's virtual pipeline)",
                  {at_least(2)}),
      key<Recipe>(DSX_KEY(parallel.pp_split),
                  "decoder layers per pipeline stage: even (the first num_hidden_layers % stages one more) or "
                  "balanced (minimise the costliest stage by model FLOPs; the last also runs the head and MTP)"),
  };
}

Table<Recipe> train_keys() {
  return {
      key<Recipe>(DSX_KEY(train.steps), "optimizer steps to run; 0 = run until train.tokens", {non_negative()}),
      key<Recipe>(DSX_KEY(train.tokens), "tokens to train on; 0 = run train.steps (exactly one of the two is > 0)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(train.global_batch),
                  "sequences per optimizer step (after any ramp); multiple of "
                  "micro_batch·dp",
                  {positive()}),
      key<Recipe>(DSX_KEY(train.micro_batch), "sequences per forward/backward on one rank", {positive()}),
      key<Recipe>(DSX_KEY(train.seq_len), "tokens per sequence", {at_least(2)}),
      key<Recipe>(DSX_KEY(train.seed), "seed of the parameter initialisation", {non_negative()}),
      key<Recipe>(DSX_KEY(train.eval_interval), "evaluate every N steps; 0 = never", {non_negative()}),
      key<Recipe>(DSX_KEY(train.eval_batches), "micro-batches per evaluation", {positive()}),
      key<Recipe>(DSX_KEY(train.batch_ramp.start), "global batch at token 0; 0 = no ramp (DeepSeek-V3: 3072)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(train.batch_ramp.tokens),
                  "tokens over which the batch grows linearly to train.global_batch (DeepSeek-V3: 469e9)",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(train.recompute),
                  "activations recomputed in backward instead of kept (DeepSeek-V3: "
                  "all three)"),
  };
}

Table<Recipe> optim_keys() {
  return {
      key<Recipe>(DSX_KEY(optim.lr), "peak learning rate (for piecewise: the highest segment LR)", {positive()}),
      key<Recipe>(DSX_KEY(optim.beta1), "AdamW β1", {in_half_open(0, 1)}),
      key<Recipe>(DSX_KEY(optim.beta2), "AdamW β2", {in_half_open(0, 1)}),
      key<Recipe>(DSX_KEY(optim.eps), "AdamW ε", {positive()}),
      key<Recipe>(DSX_KEY(optim.weight_decay), "decoupled weight decay", {non_negative()}),
      key<Recipe>(DSX_KEY(optim.grad_clip), "clip the global gradient norm to this; 0 = off", {non_negative()}),
      key<Recipe>(DSX_KEY(optim.ema_decay),
                  "keep an exponential moving average of the weights in host memory, ema = decay·ema + (1 − "
                  "decay)·weights after each step (DeepSeek-V3's EMA in CPU; checkpoints hold it as ema.*, "
                  "`dsx generate --ema` and `dsx convert to-hf --ema` read it); 0 = off",
                  {in_half_open(0, 1)}),
      key<Recipe>(DSX_KEY(optim.moments), "AdamW moment storage (DeepSeek-V3: bf16)"),
      key<Recipe>(DSX_KEY(optim.no_decay), "parameters (HF names, fnmatch patterns) without weight decay"),
      key<Recipe>(DSX_KEY(optim.schedule.kind), "LR schedule: constant, warmup_cosine, wsd or piecewise"),
      key<Recipe>(DSX_KEY(optim.schedule.unit), "unit of warmup and of the decay progress: steps or tokens"),
      key<Recipe>(DSX_KEY(optim.schedule.warmup), "linear warm-up from 0 to optim.lr, in `unit`", {non_negative()}),
      key<Recipe>(DSX_KEY(optim.schedule.min_lr_ratio), "warmup_cosine and wsd end at optim.lr times this",
                  {in_closed(0, 1)}),
      key<Recipe>(DSX_KEY(optim.schedule.decay_fraction), "wsd: share of the run spent decaying", {in_closed(0, 1)}),
      key<Recipe>(DSX_KEY(optim.schedule.decay_shape), "wsd: shape of the decay"),
      records<Recipe>(DSX_KEY(optim.schedule.segments), segment_table(),
                      "piecewise: consecutive segments; after the last the LR stays at its value"),
  };
}

Table<Recipe> precision_keys() {
  return {
      key<Recipe>(DSX_KEY(precision.activations), "activations kept between ops (DeepSeek-V3: bf16)"),
      key<Recipe>(DSX_KEY(precision.gemm),
                  "GEMMs of the attention projections, dense FFN and experts: fp32, bf16 (bf16 operands, fp32 "
                  "sums) or DeepSeek-V3 FP8 (1x128 / 128x128 blocks)"),
      key<Recipe>(DSX_KEY(precision.dispatch), "expert all-to-all dispatch payload (DeepSeek-V3: fp8)"),
      key<Recipe>(DSX_KEY(precision.combine), "expert all-to-all combine payload (DeepSeek-V3: bf16)"),
      records<Recipe>(DSX_KEY(precision.exceptions), precision_exception_table(),
                      "per-module GEMM precision: the first entry whose pattern matches a weight's name wins "
                      "(e.g. the output head or eh_proj)"),
  };
}

Table<Recipe> checkpoint_keys() {
  return {
      key<Recipe>(DSX_KEY(checkpoint.dir), "checkpoint directory; \"\" = <logging.run_dir>/checkpoints"),
      key<Recipe>(DSX_KEY(checkpoint.interval), "save every N steps; 0 = only at the end", {non_negative()}),
      key<Recipe>(DSX_KEY(checkpoint.keep_last), "complete checkpoints kept; older ones are deleted", {positive()}),
      key<Recipe>(DSX_KEY(checkpoint.resume),
                  "auto (newest complete checkpoint, if any), never, or a checkpoint "
                  "path"),
      key<Recipe>(DSX_KEY(checkpoint.init_from),
                  "a checkpoint (or a root: its newest) whose model weights start the run when it does not resume, "
                  "e.g. from dsx convert from-hf; optimizer, step and data start fresh; \"\" = random init"),
  };
}

Table<Recipe> logging_keys() {
  return {
      key<Recipe>(DSX_KEY(logging.interval), "print and record metrics every N steps", {positive()}),
      key<Recipe>(DSX_KEY(logging.run_dir),
                  "run directory (resolved recipe, metrics, checkpoints); \"\" = "
                  "runs/<recipe file name>"),
      key<Recipe>(DSX_KEY(logging.jsonl), "append metrics to <run_dir>/metrics.jsonl"),
      key<Recipe>(DSX_KEY(logging.rank_logs),
                  "multi-rank: every rank also appends its own step lines to <run_dir>/logs/rank-NNNNN.log"),
      key<Recipe>(DSX_KEY(logging.peak_flops), "peak FLOP/s of one device, for MFU; 0 = no MFU", {non_negative()}),
  };
}

const Table<GrpoReward>& reward_table() {
  static const Table<GrpoReward> table = {
      required(key<GrpoReward>(DSX_KEY(name),
                               "answer_match (1 when <answer> matches), format (1 for <think>…</think><answer>…"
                               "</answer>), overlong_penalty (DAPO), or any name with a `command`")),
      key<GrpoReward>(DSX_KEY(weight), "weight of this reward in the total"),
      key<GrpoReward>(DSX_KEY(command),
                      "external program (argv, no shell): one JSON object per sample on stdin, one number per "
                      "line on stdout; [] = the built-in `name`"),
      key<GrpoReward>(DSX_KEY(timeout_s), "an external program running longer is killed (error)", {positive()}),
  };
  return table;
}

Table<Recipe> grpo_keys() {
  const Rule open_unit{"in (0, 1]", [](double v) { return v > 0 && v <= 1; }};
  return {
      key<Recipe>(DSX_KEY(grpo.task),
                  "built-in prompt source: addition (the demonstration task; prompts and held-out split drawn "
                  "with data.seed), or none with grpo.prompts"),
      key<Recipe>(DSX_KEY(grpo.prompts),
                  "JSONL prompt set ({prompt, answer, ...} per line), tokenized with "
                  "data.tokenizer; \"\" = use grpo.task"),
      key<Recipe>(DSX_KEY(grpo.addition.digits), "addition task: operands have up to this many digits",
                  {in_closed(1, 6)}),
      key<Recipe>(DSX_KEY(grpo.addition.direct_fraction),
                  "addition task: share of SFT completions that answer at once after an empty <think></think> "
                  "(the rest show column sums); GRPO then learns to reason",
                  {in_closed(0, 1)}),
      key<Recipe>(DSX_KEY(grpo.init_checkpoint),
                  "checkpoint directory whose parameters the policy starts from; \"\" = train.seed's "
                  "initialisation"),
      key<Recipe>(DSX_KEY(grpo.sft_steps), "supervised steps on the task's reference completions before GRPO",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.sft_batch), "sequences per supervised step", {positive()}),
      key<Recipe>(DSX_KEY(grpo.sft_lr), "peak LR of the supervised phase (warm-up then cosine to 10%)", {positive()}),
      key<Recipe>(DSX_KEY(grpo.prompts_per_step), "prompts per GRPO step (R1-Zero: 32)", {positive()}),
      key<Recipe>(DSX_KEY(grpo.group_size), "G: completions per prompt (R1-Zero: 16, DeepSeekMath: 64)", {at_least(2)}),
      key<Recipe>(DSX_KEY(grpo.max_completion_length), "most tokens generated per completion", {positive()}),
      key<Recipe>(DSX_KEY(grpo.temperature), "sampling temperature of the rollouts (R1-Zero: 1)", {positive()}),
      key<Recipe>(DSX_KEY(grpo.top_p), "nucleus sampling: keep the smallest set of tokens with this mass", {open_unit}),
      key<Recipe>(DSX_KEY(grpo.top_k), "keep only the k most likely tokens; 0 = off", {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.epsilon_low), "clip ratios below 1 − ε_low (GRPO: 0.2)", {in_half_open(0, 1)}),
      key<Recipe>(DSX_KEY(grpo.epsilon_high), "clip ratios above 1 + ε_high (GRPO: 0.2, DAPO: 0.28)", {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.beta),
                  "KL coefficient against the reference model, k3 estimator (R1-Zero: 0.001, DeepSeekMath: 0.04); "
                  "0 = no reference model",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.mu), "μ: optimizer steps on each batch of rollouts (ratios against π_old)",
                  {positive()}),
      key<Recipe>(DSX_KEY(grpo.loss),
                  "loss aggregation: grpo (mean per sequence, then over sequences), dapo (token mean over the "
                  "batch), dr_grpo (token sum / (sequences · max_completion_length))"),
      key<Recipe>(DSX_KEY(grpo.scale_rewards),
                  "advantages (r − group mean) divided by the group's std, the batch's std, or none (Dr. GRPO)"),
      key<Recipe>(DSX_KEY(grpo.dynamic_sampling), "DAPO: drop groups whose rewards are all equal (no signal)"),
      key<Recipe>(DSX_KEY(grpo.resample_rounds),
                  "with dynamic_sampling: extra rounds of fresh prompts to refill the dropped groups",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.ref_refresh_interval),
                  "copy the policy into the reference model every N steps (R1-Zero: 400); 0 = never", {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.micro_batch), "sequences per forward/backward of the update; 0 = the whole batch",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.overlong_cache),
                  "overlong_penalty: the penalty grows linearly over the last N tokens before "
                  "max_completion_length",
                  {non_negative()}),
      records<Recipe>(DSX_KEY(grpo.rewards), reward_table(), "reward functions, summed with their weights"),
      key<Recipe>(DSX_KEY(grpo.seed), "seed of the rollout and evaluation sampling and of the prompt-set order",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.debug_advantages),
                  "negative controls: normal, zero (no learning signal) or shuffled (advantages permuted over "
                  "the batch)"),
      key<Recipe>(DSX_KEY(grpo.eval.prompts), "held-out JSONL prompt set; \"\" = the task's held-out prompts"),
      key<Recipe>(DSX_KEY(grpo.eval.count), "held-out prompts per evaluation; 0 = no evaluation", {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.eval.samples), "completions per held-out prompt (accuracy is their mean)", {positive()}),
      key<Recipe>(DSX_KEY(grpo.eval.temperature), "sampling temperature of the evaluation; 0 = greedy",
                  {non_negative()}),
      key<Recipe>(DSX_KEY(grpo.eval.interval),
                  "evaluate every N steps, before the first and after the last; 0 = "
                  "only before and after",
                  {non_negative()}),
  };
}

#undef DSX_KEY

const Table<Recipe>& recipe_table() {
  static const Table<Recipe> table = [] {
    Table<Recipe> all;
    for (auto part : {model_keys(), data_keys(), parallel_keys(), train_keys(), optim_keys(), precision_keys(),
                      checkpoint_keys(), logging_keys(), grpo_keys()})
      for (auto& field : part) all.push_back(std::move(field));
    return all;
  }();
  return table;
}

const std::set<std::string>& recipe_maps() {
  static const std::set<std::string> maps = map_paths(recipe_table());
  return maps;
}

// Keys people reach for that dsx spells differently.
const std::map<std::string, std::string>& aliases() {
  static const std::map<std::string, std::string> table = {
      {"data.seq_len", "train.seq_len"},
      {"precision.params", "model.dtype"},
      {"precision.optimizer_moments", "optim.moments"},
      {"optim.learning_rate", "optim.lr"},
      {"optim.betas", "optim.beta1` and `optim.beta2"},
      {"model.rope_scaling.rope_type", "model.rope_scaling.type"},
      {"model.device_type", "model.device"},
  };
  return table;
}

}  // namespace

const std::vector<SectionInfo>& sections() {
  static const std::vector<SectionInfo> list = {
      {"model", "the network: DeepSeek-V3 family, Hugging Face DeepseekV3Config names"},
      {"data", "where tokens come from"},
      {"parallel", "how ranks split the work: world = pp·dp·tp, ep inside dp"},
      {"train", "length, batch and sequence shape, recompute"},
      {"optim", "AdamW and the learning-rate schedule"},
      {"precision", "mixed precision of activations, GEMMs and expert communication"},
      {"checkpoint", "saving and resuming"},
      {"logging", "console and JSONL metrics"},
      {"grpo", "reinforcement learning with GRPO (`dsx grpo`): prompts, sampling, rewards, loss, evaluation"},
  };
  return list;
}

std::vector<KeyInfo> keys() {
  const Recipe defaults;
  std::vector<KeyInfo> list;
  for (const auto& field : recipe_table()) {
    list.push_back({field.path, field.type, default_text(field.write(defaults)), field.doc});
    for (const auto& sub : field.record_keys)
      list.push_back({field.path + "[]." + sub.path, sub.type, sub.default_value, sub.doc});
  }
  return list;
}

std::string explain(const std::string& section) {
  std::vector<std::string> names;
  for (const auto& s : sections()) names.push_back(s.name);
  if (!section.empty() && std::find(names.begin(), names.end(), section) == names.end()) {
    const auto guess = closest_match(section, names);
    throw UserError(fmt::format("unknown recipe section `{}`{}; sections: {}", section,
                                guess ? fmt::format(" (did you mean `{}`?)", *guess) : "", fmt::join(names, ", ")));
  }
  const auto all = keys();
  std::string text;
  for (const auto& s : sections()) {
    if (!section.empty() && s.name != section) continue;
    text += fmt::format("{}: {}\n", s.name, s.doc);
    for (const auto& k : all) {
      if (!k.path.starts_with(s.name + ".")) continue;
      text += fmt::format("  {}  ({}; default {})\n      {}\n", k.path, k.type, k.default_value, k.doc);
    }
    text += "\n";
  }
  return text;
}

bool is_known_path(const std::string& path) {
  return find_field(recipe_table(), path) != nullptr || recipe_maps().count(path) != 0;
}

std::string suggestion_for(const std::string& path) {
  if (auto it = aliases().find(path); it != aliases().end()) return fmt::format("; did you mean `{}`?", it->second);
  std::vector<std::string> candidates(recipe_maps().begin(), recipe_maps().end());
  for (const auto& field : recipe_table()) candidates.push_back(field.path);
  if (path.find('.') == std::string::npos) {  // a section: compare with sections only
    candidates.clear();
    for (const auto& s : sections()) candidates.push_back(s.name);
  }
  const auto guess = closest_match(path, candidates);
  if (guess) return fmt::format("; did you mean `{}`?", *guess);
  const std::string section = path.substr(0, path.find('.'));
  if (path.find('.') != std::string::npos && recipe_maps().count(section) != 0)
    return fmt::format(" (`dsx recipe explain {}` lists the valid keys)", section);
  std::vector<std::string> names;
  for (const auto& s : sections()) names.push_back(s.name);
  return fmt::format(" (sections: {})", fmt::join(names, ", "));
}

void read(const YAML::Node& root, const std::string& source_name, const Locations& overridden, Recipe& recipe,
          Locations& where) {
  if (root.IsNull()) return;
  const ReadSession session{source_name, overridden, where};
  if (!root.IsMap())
    throw UserError(
        fmt::format("{}: a recipe must be a map of sections (model, data, ...)", locate(session, "", root)));
  const std::function<std::string(const std::string&)> suggest = suggestion_for;
  const MapReader<Recipe> reader{recipe_table(), recipe_maps(), suggest, session};
  std::set<std::string> seen;
  reader.read(root, "", "", recipe, seen);
}

YAML::Node write(const Recipe& recipe) {
  YAML::Node root(YAML::NodeType::Map);
  for (const auto& field : recipe_table()) {
    // Walk down the dotted path, creating maps; yaml-cpp handles refer into the tree.
    YAML::Node parent = root;
    std::string rest = field.path;
    for (size_t dot = rest.find('.'); dot != std::string::npos; dot = rest.find('.')) {
      const std::string name = rest.substr(0, dot);
      if (!parent[name]) parent[name] = YAML::Node(YAML::NodeType::Map);
      parent.reset(parent[name]);
      rest = rest.substr(dot + 1);
    }
    parent[rest] = field.write(recipe);
  }
  return root;
}

bool equal(const Recipe& a, const Recipe& b) {
  for (const auto& field : recipe_table())
    if (!field.same(a, b)) return false;
  return true;
}

void check_values(const Recipe& recipe, const Reporter& report) {
  for (const auto& field : recipe_table()) field.check(recipe, field.path, report);
}

}  // namespace dsx::schema
