// dsx generate --checkpoint DIR --prompt TEXT... : sample completions from a trained checkpoint
// with the in-process KV-cached generator (trainer/grpo/generate.h).
#include <fmt/core.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/cli/checkpoint_source.h"
#include "trainer/cli/registry.h"
#include "trainer/grpo/generate.h"
#include "trainer/model/model.h"
#include "trainer/recipe/recipe.h"
#include "trainer/train/model_weights.h"

namespace dsx::cli {
namespace {

struct GenerateArgs {
  std::string checkpoint;
  std::string tokenizer;
  std::vector<std::string> prompts;
  std::vector<std::string> stops;
  double temperature = 1.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  int64_t max_new_tokens = 64;
  uint64_t seed = 0;
  int64_t num_samples = 1;
  bool ema = false;
};

// data.tokenizer of the checkpoint's recipe, "" when it names none.
std::string recipe_tokenizer(const std::string& recipe_yaml) {
  const YAML::Node stored = YAML::Load(recipe_yaml);
  if (!stored["data"] || !stored["data"]["tokenizer"]) return {};
  return stored["data"]["tokenizer"].as<std::string>();
}

data::Tokenizer load_tokenizer(const std::string& path, int64_t model_vocab) {
  if (!std::filesystem::is_regular_file(path)) {
    throw UserError(fmt::format("generate: tokenizer `{}`: no such file", path));
  }
  data::Tokenizer tokenizer = data::Tokenizer::load(path);
  if (static_cast<int64_t>(tokenizer.vocab_size()) > model_vocab) {
    throw UserError(
        fmt::format("generate: tokenizer `{}` has {} tokens, more than the model's vocabulary ({}): it "
                    "is not the tokenizer the model was trained with",
                    path, tokenizer.vocab_size(), model_vocab));
  }
  return tokenizer;
}

// Text of ids; ids the tokenizer does not know (the model's vocabulary may be larger) show as <id N>.
std::string decode(const data::Tokenizer& tokenizer, const std::vector<int32_t>& ids) {
  std::string text;
  std::vector<data::TokenId> run;
  for (const int32_t id : ids) {
    if (static_cast<size_t>(id) < tokenizer.vocab_size()) {
      run.push_back(static_cast<data::TokenId>(id));
      continue;
    }
    text += tokenizer.decode(run) + fmt::format("<id {}>", id);
    run.clear();
  }
  return text + tokenizer.decode(run);
}

std::string_view finish_name(grpo::FinishReason reason) {
  switch (reason) {
    case grpo::FinishReason::eos:
      return "end of sequence";
    case grpo::FinishReason::stop_string:
      return "stop string";
    case grpo::FinishReason::length:
      return "max-new-tokens";
  }
  return "?";
}

void run_generate(const GenerateArgs& args) {
  if (args.num_samples < 1)
    throw UserError(fmt::format("generate: --num-samples must be >= 1, got {}", args.num_samples));
  const std::filesystem::path dir = resolve_checkpoint(args.checkpoint, "generate: --checkpoint");
  const ckpt::Manifest manifest = ckpt::read_manifest(dir);
  const ModelSection config = checkpoint_model(manifest.recipe_yaml, dir, "generate");
  const std::string prefix = weights_prefix(ckpt::CheckpointReader(dir), args.ema, "generate");
  const std::string tokenizer_path = args.tokenizer.empty() ? recipe_tokenizer(manifest.recipe_yaml) : args.tokenizer;
  if (tokenizer_path.empty()) {
    throw UserError("generate: no tokenizer: pass --tokenizer (the checkpoint's recipe names no data.tokenizer)");
  }
  const data::Tokenizer tokenizer = load_tokenizer(tokenizer_path, config.vocab_size);

  Model model(config, config.dtype, /*seed=*/0);
  std::vector<ckpt::LoadRequest> requests;
  for (Parameter& p : model.parameters()) requests.push_back(parameter_request(p, prefix));
  ckpt::load(dir, requests);
  fmt::print("checkpoint {} (step {}){}\n", dir.string(), manifest.step, args.ema ? ", weight EMA" : "");

  // Training documents follow one another separated by EOS, so a prompt starts after one too.
  std::vector<grpo::GenerationRequest> batch;
  std::vector<std::vector<int32_t>> prompt_ids;
  for (const std::string& text : args.prompts) {
    std::vector<int32_t> ids;
    if (tokenizer.eos_id() >= 0) ids.push_back(static_cast<int32_t>(tokenizer.eos_id()));
    for (const data::TokenId id : tokenizer.encode(text)) ids.push_back(static_cast<int32_t>(id));
    if (ids.empty()) throw UserError("generate: --prompt is empty (and the tokenizer has no EOS to start from)");
    prompt_ids.push_back(ids);
    for (int64_t s = 0; s < args.num_samples; ++s) batch.push_back({ids, args.seed + batch.size()});
  }
  grpo::SamplingParams params;
  params.temperature = args.temperature;
  params.top_k = args.top_k;
  params.top_p = args.top_p;
  params.max_new_tokens = args.max_new_tokens;
  params.stop_strings = args.stops;
  params.eos_token_id = static_cast<int32_t>(tokenizer.eos_id());

  grpo::Generator generator(model, &tokenizer);
  const std::vector<grpo::Completion> completions = generator.generate(batch, params);
  for (size_t i = 0; i < completions.size(); ++i) {
    const size_t prompt = i / static_cast<size_t>(args.num_samples), sample = i % static_cast<size_t>(args.num_samples);
    const grpo::Completion& c = completions[i];
    fmt::print("\n--- prompt {}/{}, sample {}/{}: {} tokens, stopped by {}\n", prompt + 1, args.prompts.size(),
               sample + 1, args.num_samples, c.tokens.size(), finish_name(c.finish));
    fmt::print("{}{}\n", args.prompts[prompt], decode(tokenizer, c.tokens));
  }
  const grpo::GenerationStats& stats = generator.last_stats();
  // The first token of each completion comes from the prefill's logits; decode steps make the rest.
  int64_t decoded = 0;
  for (const grpo::Completion& c : completions)
    decoded += std::max<int64_t>(0, static_cast<int64_t>(c.tokens.size()) - 1);
  const auto rate = [](double n, double s) { return s > 0 ? n / s : 0.0; };
  fmt::print(
      "\n{} completions, {} tokens generated in {:.3f} s ({:.1f} tokens/s); prefill {} prompt tokens in "
      "{:.3f} s ({:.1f} tokens/s), decode {:.1f} tokens/s\n",
      completions.size(), stats.generated_tokens, stats.prefill_s + stats.decode_s,
      rate(static_cast<double>(stats.generated_tokens), stats.prefill_s + stats.decode_s), stats.prompt_tokens,
      stats.prefill_s, rate(static_cast<double>(stats.prompt_tokens), stats.prefill_s),
      rate(static_cast<double>(decoded), stats.decode_s));
}

const Register kRegister("generate", 30, [](CLI::App& app) {
  auto args = std::make_shared<GenerateArgs>();
  CLI::App* cmd = app.add_subcommand(
      "generate",
      "Sample completions of prompts from a trained checkpoint (KV-cached decoding with MLA's latent cache). Each "
      "prompt is tokenized and preceded by the tokenizer's EOS, as documents follow one another in the training "
      "data; generation stops at EOS, a stop string or --max-new-tokens.");
  cmd->add_option("--checkpoint", args->checkpoint,
                  "checkpoint directory (step-NNNNNN) or a checkpoint root, whose newest complete checkpoint is used")
      ->required();
  cmd->add_flag("--ema", args->ema, "Sample from the weight EMA (optim.ema_decay) instead of the trained weights");
  cmd->add_option("--tokenizer", args->tokenizer,
                  "tokenizer.json (default: data.tokenizer of the checkpoint's recipe)");
  cmd->add_option("--prompt", args->prompts, "prompt text (repeatable)")->required();
  cmd->add_option("--temperature", args->temperature, "sampling temperature; 0 = greedy")->capture_default_str();
  cmd->add_option("--top-k", args->top_k, "sample among the k most likely tokens; 0 = off")->capture_default_str();
  cmd->add_option("--top-p", args->top_p, "nucleus sampling: the most likely tokens holding this probability; 1 = off")
      ->capture_default_str();
  cmd->add_option("--max-new-tokens", args->max_new_tokens, "tokens generated at most per completion")
      ->capture_default_str();
  cmd->add_option("--seed", args->seed,
                  "sampling seed; completion i (prompts in order, their samples together) uses seed + i")
      ->capture_default_str();
  cmd->add_option("--stop", args->stops, "stop once the completion contains this text (repeatable)");
  cmd->add_option("--num-samples", args->num_samples, "completions per prompt")->capture_default_str();
  cmd->callback([args] { run_generate(*args); });
});

}  // namespace
}  // namespace dsx::cli
