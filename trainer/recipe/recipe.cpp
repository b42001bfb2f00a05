#include "trainer/recipe/recipe.h"

#include <fmt/core.h>
#include <fnmatch.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "kernels/error.h"
#include "trainer/optim/lr_schedule.h"
#include "trainer/recipe/schema.h"
#include "trainer/recipe/validate.h"

namespace dsx {
namespace {

YAML::Node parse_yaml(const std::string& text, const std::string& source_name) {
  try {
    return YAML::Load(text);
  } catch (const YAML::ParserException& error) {
    throw UserError(fmt::format("{}:{}:{}: YAML syntax error: {}", source_name, error.mark.line + 1,
                                error.mark.column + 1, error.msg));
  }
}

// Puts `value` at the dotted `path` of `root`, creating (or replacing) maps on the way.
void set_path(YAML::Node& root, const std::string& path, const YAML::Node& value) {
  YAML::Node parent = root;
  std::string rest = path;
  for (size_t dot = rest.find('.'); dot != std::string::npos; dot = rest.find('.')) {
    const std::string name = rest.substr(0, dot);
    if (!parent[name] || !parent[name].IsMap()) parent[name] = YAML::Node(YAML::NodeType::Map);
    parent.reset(parent[name]);
    rest = rest.substr(dot + 1);
  }
  parent[rest] = value;
}

// Records that `path` now comes from the command line (a later --set of a path inside an
// earlier one keeps its own location; one of an enclosing path takes them over).
void mark_overridden(schema::Locations& overridden, const std::string& path, const std::string& shown) {
  for (auto it = overridden.begin(); it != overridden.end();)
    it = it->first.starts_with(path + ".") ? overridden.erase(it) : std::next(it);
  overridden[path] = shown;
}

// Sets `path` to `value`; a map value sets its keys one by one, so
// `--set model.rope_scaling={type: yarn, factor: 40}` changes those two keys and keeps the rest.
void apply_override(YAML::Node& root, const std::string& path, const YAML::Node& value, const std::string& shown,
                    schema::Locations& overridden) {
  if (!schema::is_known_path(path))
    throw UserError(fmt::format("{}: unknown key `{}`{}", shown, path, schema::suggestion_for(path)));
  if (value.IsMap()) {
    for (const auto& entry : value) {
      if (!entry.first.IsScalar()) throw UserError(fmt::format("{}: keys must be plain names", shown));
      apply_override(root, path + "." + entry.first.Scalar(), entry.second, shown, overridden);
    }
    return;
  }
  if (value.IsNull())
    throw UserError(fmt::format("{}: no value for `{}` (write \"\" for an empty string)", shown, path));
  set_path(root, path, value);
  mark_overridden(overridden, path, shown);
}

// Applies `--set path=value` texts to the tree; records each path's --set text as its location.
void apply_overrides(YAML::Node& root, const std::vector<std::string>& overrides, schema::Locations& overridden) {
  if (overrides.empty()) return;
  if (root.IsNull()) root.reset(YAML::Node(YAML::NodeType::Map));
  if (!root.IsMap()) return;  // schema::read reports a recipe that is not a map
  for (const auto& text : overrides) {
    const std::string shown = "--set " + text;
    const size_t equals = text.find('=');
    if (equals == std::string::npos || equals == 0)
      throw UserError(fmt::format("{}: expected KEY=VALUE, e.g. --set optim.lr=3e-4", shown));
    const std::string path = text.substr(0, equals);
    YAML::Node value;
    try {
      value = YAML::Load(text.substr(equals + 1));
    } catch (const YAML::ParserException& error) {
      throw UserError(fmt::format("{}: the value is not valid YAML: {}", shown, error.msg));
    }
    apply_override(root, path, value, shown, overridden);
  }
}

// Values left empty in the recipe that follow from others; written out resolved, so the run
// directory's copy of the recipe says exactly where everything went.
void resolve_defaults(Recipe& recipe, const std::string& source_name) {
  if (recipe.logging.run_dir.empty()) {
    const std::string stem = std::filesystem::path(source_name).stem().string();
    recipe.logging.run_dir = "runs/" + (stem.empty() ? std::string("dsx") : stem);
  }
  if (recipe.checkpoint.dir.empty())
    recipe.checkpoint.dir = (std::filesystem::path(recipe.logging.run_dir) / "checkpoints").string();
  // Data files are found from the working directory at load time, and recorded absolute.
  for (auto& source : recipe.data.sources)
    if (!source.path.empty()) source.path = std::filesystem::absolute(source.path).lexically_normal().string();
  if (!recipe.data.tokenizer.empty())
    recipe.data.tokenizer = std::filesystem::absolute(recipe.data.tokenizer).lexically_normal().string();
}

}  // namespace

Recipe parse_recipe(const std::string& yaml_text, const std::string& source_name,
                    const std::vector<std::string>& overrides) {
  YAML::Node root = parse_yaml(yaml_text, source_name);
  schema::Locations overridden;
  apply_overrides(root, overrides, overridden);
  Recipe recipe;
  schema::Locations where;
  schema::read(root, source_name, overridden, recipe, where);
  resolve_defaults(recipe, source_name);
  validate(recipe, &where);
  return recipe;
}

Recipe load_recipe(const std::string& path, const std::vector<std::string>& overrides) {
  if (std::filesystem::is_directory(path)) throw UserError(fmt::format("recipe `{}` is a directory", path));
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError(fmt::format("cannot read recipe `{}`: {}", path, std::strerror(errno)));
  std::stringstream text;
  text << in.rdbuf();
  return parse_recipe(text.str(), path, overrides);
}

std::string to_yaml(const Recipe& recipe) {
  YAML::Emitter out;
  out << YAML::Comment("dsx recipe, fully resolved (`dsx recipe explain` documents every key)") << YAML::Newline;
  out << schema::write(recipe);
  return std::string(out.c_str()) + "\n";
}

bool Recipe::operator==(const Recipe& other) const {
  return schema::equal(*this, other);
}

bool TrainSection::recomputes(RecomputeKind kind) const {
  return std::any_of(recompute.begin(), recompute.end(),
                     [kind](RecomputeKind k) { return k == kind || k == RecomputeKind::full; });
}

bool OptimSection::decays(std::string_view parameter_name) const {
  const std::string name(parameter_name);
  return std::none_of(no_decay.begin(), no_decay.end(),
                      [&name](const std::string& pattern) { return fnmatch(pattern.c_str(), name.c_str(), 0) == 0; });
}

int64_t total_steps(const Recipe& recipe) {
  if (recipe.train.steps > 0) return recipe.train.steps;
  return BatchSchedule(recipe).steps_to_reach(std::llround(recipe.train.tokens));
}

int64_t total_tokens(const Recipe& recipe) {
  return BatchSchedule(recipe).tokens_before_step(total_steps(recipe));
}

}  // namespace dsx
