// `dsx convert to-hf CHECKPOINT OUT_DIR`: a trained checkpoint as a Hugging Face DeepseekV3 model
// directory (config.json + safetensors; trainer/checkpoint/hf_export.h).
// `dsx convert from-hf HF_DIR OUT_ROOT`: the reverse, a model-only checkpoint (hf_import.h).
#include <fmt/core.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/checkpoint/hf_export.h"
#include "trainer/checkpoint/hf_import.h"
#include "trainer/cli/checkpoint_source.h"
#include "trainer/cli/registry.h"

namespace dsx::cli {
namespace {

struct ToHfArgs {
  std::string checkpoint;
  std::string out;
  std::string dtype = "bf16";
  double max_shard_gb = 5.0;
  bool ema = false;
};

// Prints "done/total tensors, elapsed, ETA" at most every 2 s, and at the end.
std::function<void(int64_t, int64_t)> tensor_progress() {
  const auto start = std::chrono::steady_clock::now();
  return [start, last = start](int64_t done, int64_t total) mutable {
    const auto now = std::chrono::steady_clock::now();
    if (done < total && now - last < std::chrono::seconds(2)) return;
    last = now;
    const double s = std::chrono::duration<double>(now - start).count();
    fmt::print("  {}/{} tensors, {:.1f}s elapsed, ETA {:.1f}s\n", done, total, s,
               done > 0 ? s * static_cast<double>(total - done) / static_cast<double>(done) : 0.0);
  };
}

void run_to_hf(const ToHfArgs& args) {
  const std::filesystem::path dir = resolve_checkpoint(args.checkpoint, "convert to-hf: CHECKPOINT");
  ckpt::CheckpointReader reader(dir);
  const ModelSection model = checkpoint_model(reader.manifest().recipe_yaml, dir, "convert to-hf");
  if (args.dtype != "bf16" && args.dtype != "f32") {
    throw UserError("convert to-hf: --dtype must be bf16 or f32, got " + args.dtype);
  }
  if (!(args.max_shard_gb > 0)) throw UserError("convert to-hf: --max-shard-gb must be > 0");
  ckpt::HfExportOptions options;
  options.dtype = args.dtype == "bf16" ? DType::bf16 : DType::f32;
  options.max_shard_bytes = static_cast<int64_t>(args.max_shard_gb * 1e9);
  options.source_prefix = weights_prefix(reader, args.ema, "convert to-hf");
  fmt::print("convert: {} (step {}{}) -> {} ({})\n", dir.string(), reader.step(), args.ema ? ", weight EMA" : "",
             args.out, args.dtype);
  const ckpt::HfExportResult r = ckpt::export_hugging_face(reader, model, args.out, options, tensor_progress());
  fmt::print("done: {} tensors ({} parameters), {:.3f} GB in {} safetensors file{} and config.json under {}\n",
             r.tensors, r.parameters, static_cast<double>(r.bytes) / 1e9, r.shards, r.shards == 1 ? "" : "s", args.out);
}

struct FromHfArgs {
  std::string hf_dir;
  std::string out;
};

void run_from_hf(const FromHfArgs& args) {
  fmt::print("convert: {} -> {}\n", args.hf_dir, args.out);
  const ckpt::HfImportResult r = ckpt::import_hugging_face(args.hf_dir, args.out, tensor_progress());
  fmt::print(
      "done: {} tensors ({} parameters; {} FP8 weights dequantized, {} other tensors skipped) in {}\n"
      "train from it with --set checkpoint.init_from={}\n",
      r.tensors, r.parameters, r.dequantized, r.skipped, r.checkpoint.string(), r.checkpoint.string());
}

const Register kRegister("convert", 65, [](CLI::App& app) {
  CLI::App* convert =
      app.add_subcommand("convert", "Convert between dsx checkpoints and Hugging Face model directories");
  convert->require_subcommand(1);
  auto args = std::make_shared<ToHfArgs>();
  CLI::App* to_hf = convert->add_subcommand(
      "to-hf",
      "Write a checkpoint's model as a Hugging Face DeepseekV3 directory: config.json and the weights as "
      "safetensors under their Hugging Face names (MTP modules included; optimizer state left out), loadable by "
      "transformers, vLLM and SGLang. CHECKPOINT is one checkpoint or a root (its newest complete one).");
  to_hf->add_option("CHECKPOINT", args->checkpoint, "checkpoint directory or checkpoint root")->required();
  to_hf->add_option("OUT_DIR", args->out, "output directory (must not exist, or be empty)")->required();
  to_hf->add_option("--dtype", args->dtype, "weights' dtype: bf16 (default) or f32")->capture_default_str();
  to_hf->add_flag("--ema", args->ema, "export the weight EMA (optim.ema_decay) instead of the trained weights");
  to_hf->add_option("--max-shard-gb", args->max_shard_gb, "largest safetensors file, GB (1e9 bytes)")
      ->capture_default_str();
  to_hf->callback([args] { run_to_hf(*args); });

  auto from_args = std::make_shared<FromHfArgs>();
  CLI::App* from_hf = convert->add_subcommand(
      "from-hf",
      "Read a Hugging Face DeepseekV3 directory (config.json + safetensors, e.g. DeepSeek-V3's released FP8 "
      "weights, whose 128x128 block scales are applied) into a dsx checkpoint of the model's tensors (f32, step "
      "0) under OUT_ROOT, for dsx train --set checkpoint.init_from=... and dsx generate --checkpoint.");
  from_hf->add_option("HF_DIR", from_args->hf_dir, "Hugging Face model directory")->required();
  from_hf->add_option("OUT_ROOT", from_args->out, "checkpoint root to create (must hold no checkpoint)")->required();
  from_hf->callback([from_args] { run_from_hf(*from_args); });
});

}  // namespace
}  // namespace dsx::cli
