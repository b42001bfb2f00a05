#include <yaml-cpp/yaml.h>
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "data/tokenizer.h"
#include "kernels/error.h"
#include "recipe_test_support.h"
#include "trainer/model/param_count.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/recipe/recipe.h"
#include "trainer/recipe/schema.h"
#include "trainer/recipe/suggest.h"
#include "trainer/recipe/summary.h"

using namespace dsx;
using dsx::test::recipe_path;
using dsx::test::user_error_of;

namespace {

// A bad recipe states what is wrong in a "# What is wrong:" line and the message fragments the
// error must contain in "# expect:" lines.
struct BadRecipe {
  std::filesystem::path path;
  std::string what_is_wrong;
  std::vector<std::string> expected;
};

std::vector<BadRecipe> bad_recipes() {
  std::vector<BadRecipe> list;
  for (const auto& entry : std::filesystem::directory_iterator(dsx::test::bad_recipes_dir())) {
    if (entry.path().extension() != ".yaml") continue;
    BadRecipe bad{entry.path(), "", {}};
    std::ifstream in(entry.path());
    for (std::string line; std::getline(in, line);) {
      if (line.starts_with("# What is wrong: ")) bad.what_is_wrong = line.substr(17);
      if (line.starts_with("# expect: ")) bad.expected.push_back(line.substr(10));
    }
    list.push_back(std::move(bad));
  }
  std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.path < b.path; });
  return list;
}

// Follows a dotted path through a YAML tree.
bool has_path(const YAML::Node& root, const std::string& path) {
  YAML::Node node = root;
  std::stringstream parts(path);
  for (std::string part; std::getline(parts, part, '.');) {
    if (!node.IsMap() || !node[part]) return false;
    node.reset(node[part]);
  }
  return true;
}

}  // namespace

TEST_CASE("shipped recipes load, validate and have the published shapes", "[recipe]") {
  SECTION("tiny: MLA, 1 dense + 3 MoE layers, 8 experts top-2 in 4 groups, 1 shared, MTP 1, 1-3M parameters") {
    const Recipe r = load_recipe(recipe_path("tiny.yaml"));
    CHECK(r.model.q_lora_rank > 0);
    CHECK(r.model.num_hidden_layers == 4);
    CHECK(r.model.first_k_dense_replace == 1);
    CHECK(r.model.n_routed_experts == 8);
    CHECK(r.model.num_experts_per_tok == 2);
    CHECK(r.model.n_group == 4);
    CHECK(r.model.topk_group == 2);
    CHECK(r.model.n_shared_experts == 1);
    CHECK(r.model.num_nextn_predict_layers == 1);
    CHECK(r.model.vocab_size >= 256);
    CHECK(r.model.vocab_size <= 512);
    CHECK(r.train.seq_len >= 64);
    CHECK(r.train.seq_len <= 128);
    CHECK(r.data.kind == DataKind::synthetic);  // runs with nothing prepared
    CHECK(r.model.device == Device::cpu);
    const ParameterCounts counts = count_parameters(r.model);
    CHECK(counts.total + counts.mtp >= 1'000'000);
    CHECK(counts.total + counts.mtp <= 3'000'000);
  }
  SECTION("DeepSeek-V3 671B: shape and training setup of the technical report") {
    const Recipe r = load_recipe(recipe_path("deepseek-v3-671b.yaml"));
    CHECK(r.model.hidden_size == 7168);
    CHECK(r.model.num_hidden_layers == 61);
    CHECK(r.model.n_routed_experts == 256);
    CHECK(r.model.num_experts_per_tok == 8);
    CHECK(r.model.vocab_size == 129280);
    CHECK(r.parallel.pp == 16);
    CHECK(r.parallel.ep == 64);
    CHECK(r.parallel.pp * r.parallel.dp * r.parallel.tp == 2048);
    CHECK(r.parallel.pp_schedule == PipelineSchedule::dualpipe);
    CHECK(r.train.seq_len == 4096);
    CHECK(r.train.global_batch == 15360);
    CHECK(r.train.batch_ramp.start == 3072);
    CHECK(r.train.tokens == 14.8e12);
    CHECK(r.optim.moments == MomentPrecision::bf16);
    CHECK(r.precision.gemm == GemmPrecision::fp8_blockwise);
    CHECK(r.optim.schedule.kind == ScheduleKind::piecewise);
    CHECK(r.optim.schedule.segments.size() == 5);
  }
  SECTION("DeepSeek-V2-Lite 16B") {
    const Recipe r = load_recipe(recipe_path("deepseek-v2-lite-16b.yaml"));
    CHECK(r.model.q_lora_rank == 0);
    CHECK(r.model.n_routed_experts == 64);
    CHECK(r.model.n_shared_experts == 2);
    CHECK(r.model.num_experts_per_tok == 6);
    CHECK(r.model.scoring_func == "softmax");
    CHECK_FALSE(r.model.norm_topk_prob);
    CHECK(r.model.num_nextn_predict_layers == 0);
    CHECK(r.train.tokens == 5.7e12);
  }
}

TEST_CASE("tiny.yaml loads from any working directory", "[recipe]") {
  const auto previous = std::filesystem::current_path();
  std::filesystem::current_path(std::filesystem::temp_directory_path());
  std::string error;
  try {
    load_recipe(recipe_path("tiny.yaml"));
  } catch (const std::exception& e) {
    error = e.what();
  }
  std::filesystem::current_path(previous);
  CHECK(error == "");
}

TEST_CASE("an empty recipe gives the documented defaults and resolves its paths", "[recipe]") {
  const Recipe r = parse_recipe("", "experiments/my-run.yaml");
  CHECK(r.optim.lr == 2.2e-4);
  CHECK(r.optim.beta1 == 0.9);
  CHECK(r.optim.beta2 == 0.95);
  CHECK(r.optim.weight_decay == 0.1);
  CHECK(r.optim.grad_clip == 1.0);
  CHECK(r.optim.no_decay == std::vector<std::string>{"*norm.weight", "*.bias"});
  CHECK(r.checkpoint.resume == "auto");
  CHECK(r.logging.run_dir == "runs/my-run");
  CHECK(r.checkpoint.dir == "runs/my-run/checkpoints");
  CHECK(r.data.kind == DataKind::synthetic);
  // Comments and a section with nothing in it are fine too.
  CHECK(parse_recipe("# nothing\nmodel:\n", "x.yaml").model.hidden_size == ModelConfig{}.hidden_size);
}

TEST_CASE("every bad recipe is refused with its expected message", "[recipe]") {
  const auto list = bad_recipes();
  REQUIRE(list.size() >= 15);
  for (const auto& bad : list) {
    INFO(bad.path.filename().string() << ": " << bad.what_is_wrong);
    CHECK_FALSE(bad.what_is_wrong.empty());
    REQUIRE_FALSE(bad.expected.empty());
    const std::string message = user_error_of([&] { load_recipe(bad.path.string()); });
    REQUIRE(message != "");
    for (const auto& fragment : bad.expected) {
      INFO("message: " << message);
      CHECK(message.find(fragment) != std::string::npos);
    }
    // One line, starting at the file: a user can jump straight to the spot.
    CHECK(message.find('\n') == std::string::npos);
    CHECK(message.starts_with(bad.path.string()));
  }
}

TEST_CASE("messages give the line and column of the offending value", "[recipe]") {
  const std::string message = user_error_of([] { parse_recipe("model:\n  hidden_size: x\n", "r.yaml"); });
  CHECK(message == "r.yaml:2:16: `model.hidden_size` must be an integer, got `x`");
  const std::string cross = user_error_of([] { parse_recipe("model:\n  n_group: 4\n  topk_group: 6\n", "r.yaml"); });
  CHECK(cross == "r.yaml:3:15: `model.topk_group` (6) exceeds `model.n_group` (4)");
}

TEST_CASE("file errors are user errors", "[recipe]") {
  CHECK(user_error_of([] {
          load_recipe("/nonexistent/recipe.yaml");
        }).starts_with("cannot read recipe `/nonexistent/recipe.yaml`"));
  CHECK(user_error_of([] { load_recipe(dsx::test::repo_root().string()); }).find("is a directory") !=
        std::string::npos);
  CHECK(user_error_of([] { parse_recipe("- a\n- b\n", "list.yaml"); }).find("must be a map of sections") !=
        std::string::npos);
}

TEST_CASE("recipe: --set overrides are parsed with the key's type before validation", "[recipe]") {
  const std::string tiny = recipe_path("tiny.yaml");
  SECTION("valid overrides") {
    const Recipe r =
        load_recipe(tiny, {"optim.lr=1e-3", "train.recompute=[rmsnorm, moe_act]", "model.tie_word_embeddings=true",
                           "optim.schedule.kind=wsd", "logging.run_dir=/tmp/elsewhere", "optim.no_decay=['*norm*']"});
    CHECK(r.optim.lr == 1e-3);
    CHECK(r.train.recompute == std::vector<RecomputeKind>{RecomputeKind::rmsnorm, RecomputeKind::moe_act});
    CHECK(r.model.tie_word_embeddings);
    CHECK(r.optim.schedule.kind == ScheduleKind::wsd);
    CHECK(r.logging.run_dir == "/tmp/elsewhere");
    CHECK(r.checkpoint.dir == "/tmp/elsewhere/checkpoints");  // derived after the overrides
    CHECK(r.optim.no_decay == std::vector<std::string>{"*norm*"});
    CHECK(load_recipe(tiny, {"train.recompute=full"}).train.recomputes(RecomputeKind::mla_up_proj));
  }
  SECTION("a map value sets its keys and keeps the others; the last --set wins") {
    const Recipe r = load_recipe(
        tiny, {"model={hidden_size: 96, num_attention_heads: 2}", "model.hidden_size=80", "train.steps=70"});
    CHECK(r.model.hidden_size == 80);
    CHECK(r.model.num_attention_heads == 2);
    CHECK(r.model.kv_lora_rank == 32);  // from the file
    CHECK(r.train.steps == 70);
  }
  SECTION("invalid overrides name the --set and the key") {
    CHECK(user_error_of([&] { load_recipe(tiny, {"optim.learning_rate=1e-3"}); }) ==
          "--set optim.learning_rate=1e-3: unknown key `optim.learning_rate`; did you mean `optim.lr`?");
    CHECK(user_error_of([&] { load_recipe(tiny, {"model.hiden_size=64"}); }) ==
          "--set model.hiden_size=64: unknown key `model.hiden_size`; did you mean `model.hidden_size`?");
    CHECK(user_error_of([&] { load_recipe(tiny, {"model.hidden_size=wide"}); }) ==
          "--set model.hidden_size=wide: `model.hidden_size` must be an integer, got `wide`");
    CHECK(user_error_of([&] { load_recipe(tiny, {"optim.lr"}); }).find("expected KEY=VALUE") != std::string::npos);
    CHECK(user_error_of([&] { load_recipe(tiny, {"train.recompute=[rmsnorm"}); }).find("not valid YAML") !=
          std::string::npos);
    CHECK(user_error_of([&] { load_recipe(tiny, {"train.recompute=[rmsnorm, attention]"}); }) ==
          "--set train.recompute=[rmsnorm, attention]: `train.recompute[1]` must be one of rmsnorm, mla_up_proj, "
          "moe_act, full; got `attention`");
    CHECK(user_error_of([&] { load_recipe(tiny, {"train.steps="}); }).find("no value for `train.steps`") !=
          std::string::npos);
  }
  SECTION("overrides go through the same validation as the file") {
    CHECK(user_error_of([&] { load_recipe(tiny, {"optim.lr=-1"}); }) ==
          "--set optim.lr=-1: `optim.lr` must be > 0, got -1");
    // The message points at the --set that broke the rule, not at the file's line for the other key.
    CHECK(user_error_of([&] { load_recipe(tiny, {"model.n_group=3"}); }) ==
          "--set model.n_group=3: `model.n_routed_experts` (8) must be divisible by `model.n_group` (3)");
    const std::string missing = user_error_of([&] {
      load_recipe(tiny, {"data.kind=datasets", "data.sources=[{path: /nonexistent/c.h5, weight: 2}]"});
    });
    CHECK(missing ==
          "--set data.sources=[{path: /nonexistent/c.h5, weight: 2}]: `data.sources[0].path`: no such "
          "dataset `/nonexistent/c.h5`");
  }
}

TEST_CASE("datasets are checked against the model and the tokenizer before any work starts", "[recipe]") {
  const dsx::test::TempDir dir;
  const std::string a = dsx::test::write_dataset(dir / "a", 512, "aaaa");
  const std::string b = dsx::test::write_dataset(dir / "b", 300, "aaaa");
  const std::string other = dsx::test::write_dataset(dir / "other", 512, "bbbb");
  const std::string big = dsx::test::write_dataset(dir / "big", 100000, "aaaa");
  const std::string tiny = recipe_path("tiny.yaml");
  const auto with_sources = [&](const std::string& list, std::vector<std::string> more = {}) {
    more.insert(more.begin(), {"data.kind=datasets", "data.sources=" + list});
    return more;
  };
  const Recipe r = load_recipe(tiny, with_sources("[{path: " + a + ", weight: 3}, {path: " + b + "}]"));
  REQUIRE(r.data.sources.size() == 2);
  CHECK(r.data.sources[0].weight == 3.0);
  CHECK(r.data.sources[1].weight == 1.0);
  CHECK(load_recipe(tiny, with_sources("[{path: " + a + "}]", {"data.tokenizer_hash=aaaa"})).data.tokenizer_hash ==
        "aaaa");
  CHECK(user_error_of([&] { load_recipe(tiny, with_sources("[{path: " + big + "}]")); })
            .find("`data.sources[0].path`: dataset `" + big +
                  "` has a vocabulary of 100000 tokens, more than "
                  "`model.vocab_size` (512)") != std::string::npos);
  CHECK(user_error_of([&] { load_recipe(tiny, with_sources("[{path: " + a + "}, {path: " + other + "}]")); })
            .find("`data.sources[1].path`: dataset `" + other +
                  "` was tokenized by tokenizer bbbb, but "
                  "`data.sources[0]` has aaaa") != std::string::npos);
  CHECK(user_error_of([&] {
          load_recipe(tiny, with_sources("[{path: " + a + "}]", {"data.tokenizer_hash=cccc"}));
        }).find("was tokenized by tokenizer aaaa, but `data.tokenizer_hash` has cccc") != std::string::npos);
  CHECK(user_error_of([&] { load_recipe(tiny, with_sources("[]")); }).find("`data.sources` is empty") !=
        std::string::npos);
  CHECK(user_error_of([&] { load_recipe(tiny, with_sources("[{path: " + a + ", weight: 0}]")); }) ==
        "--set data.sources=[{path: " + a + ", weight: 0}]: `data.sources[0].weight` must be > 0, got 0");
}

TEST_CASE("a named tokenizer must be the one the datasets were made with", "[recipe]") {
  const dsx::test::TempDir dir;
  {
    std::ofstream text(dir / "text.txt");
    for (int i = 0; i < 50; ++i) text << "the quick brown fox jumps over the lazy dog " << i << "\n";
  }
  data::BpeTrainerOptions options;
  options.vocab_size = 300;
  options.show_progress = false;
  const std::vector<std::string> files = {dir / "text.txt"};
  const data::Tokenizer tokenizer = data::train_bpe(files, options);
  tokenizer.save(dir / "tokenizer.json");
  const std::string hash = tokenizer.hash();
  const std::string good = dsx::test::write_dataset(dir / "good", 300, hash);
  const std::string foreign = dsx::test::write_dataset(dir / "foreign", 300, "0123");
  const std::string tiny = recipe_path("tiny.yaml");
  const auto sets = [&](const std::string& dataset, const std::string& tokenizer_path) {
    return std::vector<std::string>{"data.kind=datasets", "data.sources=[{path: " + dataset + "}]",
                                    "data.tokenizer=" + tokenizer_path};
  };
  CHECK(load_recipe(tiny, sets(good, dir / "tokenizer.json")).data.tokenizer == dir / "tokenizer.json");
  CHECK(user_error_of([&] {
          load_recipe(tiny, sets(foreign, dir / "tokenizer.json"));
        }).find("was tokenized by tokenizer 0123, but the tokenizer `" + dir / "tokenizer.json" + "` has " + hash) !=
        std::string::npos);
  auto mismatched = sets(good, dir / "tokenizer.json");
  mismatched.push_back("data.tokenizer_hash=0123");
  CHECK(user_error_of([&] {
          load_recipe(tiny, mismatched);
        }).find("`data.tokenizer_hash` (0123) differs from the hash") != std::string::npos);
  CHECK(user_error_of([&] {
          load_recipe(tiny, sets(good, dir / "missing.json"));
        }).find("`data.tokenizer`: no such file") != std::string::npos);
  CHECK(user_error_of([&] { load_recipe(tiny, sets(good, dir / "text.txt")); }).find("`data.tokenizer`: ") !=
        std::string::npos);
}

TEST_CASE("to_yaml writes every key and reads back to an equal recipe", "[recipe]") {
  const dsx::test::TempDir dir;
  const std::string dataset = dsx::test::write_dataset(dir / "corpus", 512, "abcd");
  const std::vector<std::string> overrides = {"data.kind=datasets",
                                              "data.sources=[{path: " + dataset + ", weight: 0.25}]",
                                              "optim.schedule.kind=wsd",
                                              "optim.schedule.decay_shape=cosine",
                                              "optim.schedule.warmup=10",
                                              "train.recompute=full",
                                              "model.dtype=f64",
                                              "model.tie_word_embeddings=true",
                                              "optim.lr=0.0003",
                                              "logging.run_dir='out dir/with: colon'",
                                              "model.rope_scaling.beta_fast=31.5",
                                              "checkpoint.resume=never"};
  for (const auto& [name, sets] :
       std::vector<std::pair<std::string, std::vector<std::string>>>{{"tiny.yaml", {}},
                                                                     {"tiny.yaml", overrides},
                                                                     {"deepseek-v3-671b.yaml", {}},
                                                                     {"deepseek-v2-lite-16b.yaml", {}}}) {
    INFO(name << " with " << sets.size() << " overrides");
    const Recipe original = load_recipe(recipe_path(name), sets);
    const std::string text = to_yaml(original);
    const Recipe again = parse_recipe(text, recipe_path(name));
    CHECK(again == original);
    CHECK(to_yaml(again) == text);
    const YAML::Node tree = YAML::Load(text);
    for (const auto& key : schema::keys()) {
      if (key.path.find("[]") != std::string::npos) continue;  // record fields live inside lists
      INFO(key.path);
      CHECK(has_path(tree, key.path));
    }
  }
}

TEST_CASE("recipe equality sees every kind of key", "[recipe]") {
  const Recipe base = load_recipe(recipe_path("deepseek-v3-671b.yaml"));
  CHECK(base == base);
  const auto differs = [&](auto change) {
    Recipe other = base;
    change(other);
    return !(other == base);
  };
  CHECK(differs([](Recipe& r) { r.model.rope_scaling.beta_slow = 2; }));
  CHECK(differs([](Recipe& r) { r.model.scoring_func = "softmax"; }));
  CHECK(differs([](Recipe& r) { r.model.dtype = DType::f64; }));
  CHECK(differs([](Recipe& r) { r.train.recompute.pop_back(); }));
  CHECK(differs([](Recipe& r) { r.optim.schedule.segments[4].lr = 7e-6; }));
  CHECK(differs([](Recipe& r) { r.optim.no_decay.push_back("*gate*"); }));
  CHECK(differs([](Recipe& r) { r.data.synthetic.decay = 1.0; }));
  CHECK(differs([](Recipe& r) { r.logging.jsonl = false; }));
}

TEST_CASE("the schema documents every key with a type, a default and a doc", "[recipe]") {
  const auto keys = schema::keys();
  CHECK(keys.size() > 90);
  std::set<std::string> paths;
  for (const auto& key : keys) {
    INFO(key.path);
    CHECK(paths.insert(key.path).second);  // no key twice
    CHECK_FALSE(key.type.empty());
    CHECK_FALSE(key.default_value.empty());
    CHECK_FALSE(key.doc.empty());
    CHECK(key.doc.find('\n') == std::string::npos);
    const std::string section = key.path.substr(0, key.path.find('.'));
    CHECK(std::any_of(schema::sections().begin(), schema::sections().end(),
                      [&](const schema::SectionInfo& s) { return s.name == section; }));
  }
  // Every ModelConfig field the model helper defines is a model.* key (HF names).
  for (const char* name : {"model.q_lora_rank", "model.kv_lora_rank", "model.qk_rope_head_dim", "model.n_group",
                           "model.topk_group", "model.rope_scaling.mscale_all_dim", "model.mtp_loss_weight",
                           "model.device", "model.dtype", "optim.schedule.segments[].until", "data.sources[].weight"})
    CHECK(paths.count(name) == 1);

  const std::string all = schema::explain("");
  for (const auto& key : keys) CHECK(all.find(key.path) != std::string::npos);
  const std::string optim = schema::explain("optim");
  CHECK(optim.find("optim.lr  (number; default 0.00022)") != std::string::npos);
  CHECK(optim.find("model.hidden_size") == std::string::npos);
  CHECK(user_error_of([] { schema::explain("optimizer"); }).find("did you mean `optim`?") != std::string::npos);
}

TEST_CASE("closest-key suggestions", "[recipe]") {
  CHECK(edit_distance("", "abc") == 3);
  CHECK(edit_distance("kitten", "sitting") == 3);
  CHECK(edit_distance("flaw", "lawn") == 2);
  const std::vector<std::string> keys = {"model",    "model.kv_lora_rank", "model.q_lora_rank", "optim",
                                         "optim.lr", "train.seq_len",      "train.steps"};
  CHECK(closest_match("model.kv_lora_rnk", keys) == "model.kv_lora_rank");
  CHECK(closest_match("model.q_lora_rnk", keys) == "model.q_lora_rank");
  CHECK(closest_match("train.lr", keys) == "optim.lr");
  CHECK(closest_match("optimizer", keys) == "optim");
  CHECK(closest_match("train.step", keys) == "train.steps");
  CHECK_FALSE(closest_match("logging.colour", keys).has_value());
}

TEST_CASE("weight decay skips norms and biases by default", "[recipe]") {
  const OptimSection optim;
  CHECK_FALSE(optim.decays("model.norm.weight"));
  CHECK_FALSE(optim.decays("model.layers.0.input_layernorm.weight"));
  CHECK_FALSE(optim.decays("model.layers.3.self_attn.kv_a_layernorm.weight"));
  CHECK_FALSE(optim.decays("model.layers.61.enorm.weight"));
  CHECK_FALSE(optim.decays("lm_head.bias"));
  CHECK(optim.decays("model.embed_tokens.weight"));
  CHECK(optim.decays("model.layers.3.mlp.experts.17.up_proj.weight"));
  CHECK(optim.decays("model.layers.3.self_attn.q_a_proj.weight"));
}

TEST_CASE("validate() checks recipes built in code", "[recipe]") {
  Recipe r;
  CHECK_NOTHROW(validate(r));
  r.model.topk_group = 5;
  CHECK(user_error_of([&] { validate(r); }) == "`model.topk_group` (5) exceeds `model.n_group` (1)");
  r = Recipe{};
  r.optim.schedule.kind = ScheduleKind::wsd;
  r.optim.schedule.warmup = 950;  // + 10% of 1000 steps decaying > the run
  CHECK(user_error_of([&] { validate(r); }).find("`optim.schedule.decay_fraction`") != std::string::npos);
  r = Recipe{};
  r.train.recompute = {RecomputeKind::full, RecomputeKind::rmsnorm};
  CHECK(user_error_of([&] { validate(r); }).find("write it alone") != std::string::npos);
  r = Recipe{};
  r.optim.schedule.kind = ScheduleKind::piecewise;
  r.optim.lr = 1e-3;
  r.optim.schedule.segments = {{100, ScheduleUnit::steps, SegmentKind::linear, 1e-3},
                               {1e6, ScheduleUnit::tokens, SegmentKind::cosine, 1e-4}};
  CHECK(user_error_of([&] { validate(r); }).find("ramps from the end of segment 0, which is in steps") !=
        std::string::npos);
  r.optim.schedule.segments[1].kind = SegmentKind::constant;
  CHECK_NOTHROW(validate(r));
  r.optim.lr = 2e-3;
  CHECK(user_error_of([&] { validate(r); }).find("must equal the highest LR") != std::string::npos);
}

TEST_CASE("run length from steps or from tokens", "[recipe]") {
  Recipe r;
  r.train.steps = 0;
  r.train.tokens = 1e6;          // 32 sequences x 128 tokens = 4096 tokens per step
  CHECK(total_steps(r) == 245);  // ceil(1e6 / 4096)
  CHECK(total_tokens(r) == 245 * 4096);
  r.train.tokens = 0;
  r.train.steps = 10;
  CHECK(total_steps(r) == 10);
  CHECK(total_tokens(r) == 40960);
}

TEST_CASE("the check summary reports shape, parameter counts, tokens per step and layout", "[recipe]") {
  const Recipe tiny = load_recipe(recipe_path("tiny.yaml"));
  const std::string text = summarize(tiny);
  const ParameterCounts counts = count_parameters(tiny.model);
  CHECK(text.find("4 layers (1 dense + 3 MoE)") != std::string::npos);
  CHECK(text.find("total " + human_count(static_cast<double>(counts.total))) != std::string::npos);
  CHECK(text.find("MTP " + human_count(static_cast<double>(counts.mtp))) != std::string::npos);
  CHECK(text.find("16 sequences x 64 tokens = 1024 tokens per step (2 micro-batches of 8 per rank)") !=
        std::string::npos);
  CHECK(text.find("1 rank = pp 1 x dp 1 x tp 1") != std::string::npos);

  const std::string v3 = summarize(load_recipe(recipe_path("deepseek-v3-671b.yaml")));
  CHECK(v3.find("2048 ranks = pp 16 x dp 128 x tp 1; ep 64") != std::string::npos);
  CHECK(v3.find("ramp from 3072") != std::string::npos);

  CHECK(human_count(671.04e9) == "671.0B");
  CHECK(human_count(2.4e9) == "2.4B");
  CHECK(human_count(1'234'567) == "1.23M");
  CHECK(human_count(45'600) == "45.6K");
  CHECK(human_count(512) == "512");
  CHECK(human_count(14.8e12) == "14.8T");
}

TEST_CASE("precision.exceptions: read, written back, listed by explain and checked against the model",
          "[recipe][precision]") {
  const std::string yaml =
      "precision:\n"
      "  gemm: fp8_blockwise\n"
      "  exceptions:\n"
      "    - {modules: \"*.mlp.experts.*\", gemm: fp32}\n"
      "    - {modules: \"model.layers.0.*\", gemm: bf16}\n";
  const Recipe r = parse_recipe(yaml, "exceptions.yaml");
  REQUIRE(r.precision.exceptions.size() == 2);
  CHECK(r.precision.exceptions[0] == PrecisionException{"*.mlp.experts.*", GemmPrecision::fp32});
  CHECK(r.precision.exceptions[1] == PrecisionException{"model.layers.0.*", GemmPrecision::bf16});
  CHECK(parse_recipe(to_yaml(r), "again.yaml") == r);
  CHECK(parse_recipe("", "empty.yaml").precision.exceptions.empty());  // default: none

  const std::string explained = schema::explain("precision");
  CHECK(explained.find("precision.exceptions  (list of {modules, gemm}; default [])") != std::string::npos);
  CHECK(explained.find("precision.exceptions[].modules") != std::string::npos);
  CHECK(explained.find("precision.exceptions[].gemm") != std::string::npos);

  const auto error_of = [](const std::string& exceptions, const std::vector<std::string>& sets = {}) {
    return user_error_of([&] { parse_recipe("precision:\n  exceptions: " + exceptions + "\n", "x.yaml", sets); });
  };
  // The default model: 4 layers (0-3), untied embedding.
  const std::string no_match = error_of("[{modules: \"model.layers.7.*\", gemm: bf16}]");
  CHECK(no_match.starts_with("x.yaml:2:"));  // the line of the pattern
  CHECK(no_match.ends_with(": `precision.exceptions[0].modules` (\"model.layers.7.*\") matches no parameter of the "
                           "model (fnmatch on Hugging Face names such as model.layers.1.mlp.experts.0.up_proj.weight)"));
  CHECK(error_of("[{modules: lm_head.weight, gemm: bf16}, {modules: \"*norm.weight\", gemm: bf16}]")
            .find("`precision.exceptions[1].modules` (\"*norm.weight\") matches only parameters without a GEMM") !=
        std::string::npos);
  CHECK(error_of("[{modules: \"*\", gemm: bf16}, {modules: \"*.o_proj.weight\", gemm: fp32}]")
            .find("`precision.exceptions[1].modules` (\"*.o_proj.weight\") sets no weight") != std::string::npos);
  CHECK(error_of("[{modules: \"\", gemm: bf16}]").find("`precision.exceptions[0].modules` is an empty pattern") !=
        std::string::npos);
  CHECK(error_of("[{modules: lm_head.weight, gemm: fp16}]").find("`precision.exceptions[0].gemm` must be one of") !=
        std::string::npos);
  CHECK(error_of("[{modules: lm_head.weight}]").find("`precision.exceptions[0]` is missing `gemm`") !=
        std::string::npos);
  CHECK(error_of("[{module: lm_head.weight, gemm: bf16}]")
            .find("unknown key `precision.exceptions[0].module`; did you mean `precision.exceptions[].modules`?") !=
        std::string::npos);
  CHECK(error_of("[{modules: lm_head.weight, gemm: bf16}]", {"model.dtype=f64"})
            .find("so `precision.exceptions[0].gemm` must be fp32, got bf16") != std::string::npos);
  CHECK(error_of("[{modules: lm_head.weight, gemm: fp32}]", {"model.dtype=f64"}).empty());
  // The pattern is checked against this model: with tied embeddings lm_head.weight does not exist.
  CHECK(error_of("[{modules: lm_head.weight, gemm: bf16}]", {"model.tie_word_embeddings=true"})
            .find("matches no parameter") != std::string::npos);
  CHECK(error_of("[{modules: model.embed_tokens.weight, gemm: bf16}]", {"model.tie_word_embeddings=true"}).empty());
  // --set replaces the whole list and is named in the message.
  CHECK(user_error_of([] {
          parse_recipe("", "x.yaml", {"precision.exceptions=[{modules: nothing, gemm: bf16}]"});
        }).starts_with("--set precision.exceptions="));
}
