// `dsx checkpoint inspect DIR`: what a checkpoint (or a root of several) holds.
#include <fmt/core.h>

#include <memory>
#include <string>

#include "kernels/error.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/checkpoint/inspect.h"
#include "trainer/cli/registry.h"

namespace dsx::cli {
namespace {

struct InspectArgs {
  std::string dir;
  bool json = false;
  bool verify = false;
  bool recipe = false;
};

void run_inspect(const InspectArgs& args) {
  const nlohmann::json description = ckpt::describe(args.dir, args.verify);
  if (args.recipe) {
    // The recipe of the checkpoint itself, or of the newest complete one under a root.
    const bool is_root = description.at("kind") == "root";
    if (is_root && description.at("latest").is_null()) {
      throw UserError(fmt::format("checkpoint inspect: {} holds no complete checkpoint", args.dir));
    }
    const std::string dir = is_root ? description["latest"]["dir"].get<std::string>() : args.dir;
    fmt::print("{}", ckpt::read_manifest(dir).recipe_yaml);
    return;
  }
  if (args.json) {
    fmt::print("{}\n", description.dump(2));
  } else {
    fmt::print("{}", ckpt::format_description(description));
  }
}

const Register kRegister("checkpoint", 60, [](CLI::App& app) {
  CLI::App* checkpoint = app.add_subcommand("checkpoint", "Inspect checkpoints");
  checkpoint->require_subcommand(1);
  auto args = std::make_shared<InspectArgs>();
  CLI::App* inspect = checkpoint->add_subcommand(
      "inspect",
      "Show a checkpoint's step, files, tensors (global shape, dtype, slices, bytes) and metadata keys. DIR is "
      "one checkpoint (a step-NNNNNN directory) or a root holding several; for a root every step-* directory "
      "is listed and the newest complete checkpoint is shown.");
  inspect->add_option("DIR", args->dir, "checkpoint directory or checkpoint root")->required();
  inspect->add_flag("--json", args->json, "print machine-readable JSON instead of text");
  inspect->add_flag("--verify", args->verify, "read every file and check its size and CRC-32 against the manifest");
  inspect->add_flag("--recipe", args->recipe, "print the resolved recipe stored in the checkpoint and nothing else");
  inspect->callback([args] { run_inspect(*args); });
});

}  // namespace
}  // namespace dsx::cli
