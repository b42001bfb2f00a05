#include "trainer/cli/checkpoint_source.h"

#include <fmt/core.h>
#include <yaml-cpp/yaml.h>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/optim/weight_ema.h"

namespace dsx::cli {

std::filesystem::path resolve_checkpoint(const std::string& dir, const std::string& what) {
  if (!std::filesystem::is_directory(dir)) {
    throw UserError(fmt::format("{} `{}`: no such directory", what, dir));
  }
  if (ckpt::is_checkpoint_dir(dir)) return dir;
  const auto latest = ckpt::latest(dir);
  if (!latest) {
    throw UserError(
        fmt::format("{} `{}` is not a checkpoint and holds no complete one (no step-* directory with a "
                    "manifest.json)",
                    what, dir));
  }
  return *latest;
}

ModelSection checkpoint_model(const std::string& recipe_yaml, const std::filesystem::path& dir,
                              const std::string& command) {
  const std::string source = (dir / ckpt::kManifestFile).string();
  if (recipe_yaml.empty()) {
    throw UserError(
        fmt::format("{}: checkpoint `{}` stores no recipe (it was not written by dsx train)", command, dir.string()));
  }
  const YAML::Node stored = YAML::Load(recipe_yaml);
  YAML::Node kept(YAML::NodeType::Map);
  kept["model"] = stored["model"];
  if (stored["train"] && stored["train"]["seq_len"]) kept["train"]["seq_len"] = stored["train"]["seq_len"];
  return parse_recipe(YAML::Dump(kept), source).model;
}

std::string weights_prefix(const ckpt::CheckpointReader& reader, bool ema, const std::string& command) {
  if (!ema) return "";
  const std::string probe = std::string(WeightEma::kPrefix) + "model.embed_tokens.weight";
  if (reader.find(probe) == nullptr) {
    throw UserError(command + ": --ema: " + reader.dir().string() +
                    " holds no weight EMA (it was trained with optim.ema_decay 0)");
  }
  return WeightEma::kPrefix;
}

}  // namespace dsx::cli
