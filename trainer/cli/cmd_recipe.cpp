// `dsx recipe check RECIPE` and `dsx recipe explain [SECTION]`.
#include <fmt/core.h>

#include <memory>
#include <string>
#include <vector>

#include "trainer/cli/registry.h"
#include "trainer/recipe/recipe.h"
#include "trainer/recipe/schema.h"
#include "trainer/recipe/summary.h"

namespace dsx::cli {
namespace {

struct CheckArgs {
  std::string recipe;
  std::vector<std::string> overrides;
  bool print_resolved = false;
};

void run_check(const CheckArgs& args) {
  const Recipe recipe = load_recipe(args.recipe, args.overrides);
  if (args.print_resolved) {
    fmt::print("{}", to_yaml(recipe));
    return;
  }
  fmt::print("{}: valid\n{}", args.recipe, summarize(recipe));
}

const Register kRegister("recipe", 15, [](CLI::App& app) {
  CLI::App* recipe = app.add_subcommand("recipe", "Validate recipes and document their keys");
  recipe->require_subcommand(1);

  auto check_args = std::make_shared<CheckArgs>();
  CLI::App* check = recipe->add_subcommand(
      "check",
      "Validate a recipe (with any --set overrides) and print the model shape, parameter counts, tokens per step, "
      "layout and schedule. Exit code 0 when valid; 2 with one message naming the key otherwise.");
  check->add_option("RECIPE", check_args->recipe, "recipe YAML file")->required();
  check
      ->add_option("--set", check_args->overrides,
                   "override a key before validation: --set optim.lr=3e-4, --set train.recompute=[rmsnorm] "
                   "(values are YAML; repeatable)")
      ->take_all()
      ->allow_extra_args(false);
  check->add_flag("--resolved", check_args->print_resolved,
                  "print the fully resolved recipe (every key, as written into the run directory) instead");
  check->callback([check_args] { run_check(*check_args); });

  auto section = std::make_shared<std::string>();
  CLI::App* explain = recipe->add_subcommand(
      "explain", "Print every recipe key with its type, default and meaning (optionally of one section).");
  explain->add_option("SECTION", *section, "model, data, parallel, train, optim, precision, checkpoint or logging");
  explain->callback([section] { fmt::print("{}", schema::explain(*section)); });
});

}  // namespace
}  // namespace dsx::cli
