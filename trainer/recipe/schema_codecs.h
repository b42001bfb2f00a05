// How each value type of the recipe schema is read from and written to YAML. Internal to
// trainer/recipe (schema.cpp); messages name the key's full path and, when known, its location.
#pragma once
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "trainer/recipe/recipe.h"
#include "trainer/recipe/schema.h"

namespace dsx::schema {

// One reading of a YAML tree: where values come from, and where each key was found.
struct ReadSession {
  std::string source_name;      // the recipe file (or the name given to parse_recipe)
  const Locations& overridden;  // paths set by --set -> the --set text
  Locations& where;             // filled: path -> location of its value
};

// The key being read: its path as shown to the user and the "file:line:col: " prefix.
struct ReadContext {
  std::string path;
  std::string location;
  const ReadSession* session = nullptr;
};

// Throws UserError: "<location>`path` must be <expected>, got <what the node holds>".
[[noreturn]] void wrong_type(const ReadContext& context, std::string_view expected, const YAML::Node& node);
// The node's text when it is a scalar; wrong_type(expected) otherwise.
const std::string& scalar_text(const YAML::Node& node, const ReadContext& context, std::string_view expected);
// True when the scalar was written in quotes ("128"): text, even if it looks like a number.
bool is_quoted(const YAML::Node& node);

std::string format_double(double value);  // shortest text that reads back to the same double

// Names of an enum's values ("a | b | c") and the lookup with a "did you mean" on failure.
std::string join_names(std::span<const std::string_view> names, std::string_view separator);
size_t find_name(std::span<const std::string_view> names, const YAML::Node& node, const ReadContext& context);

template <class T>
struct Codec;

template <>
struct Codec<int64_t> {
  static std::string type() { return "integer"; }
  static int64_t read(const YAML::Node& node, const ReadContext& context);
  static YAML::Node write(int64_t value) { return YAML::Node(std::to_string(value)); }
};

template <>
struct Codec<double> {
  static std::string type() { return "number"; }
  static double read(const YAML::Node& node, const ReadContext& context);
  static YAML::Node write(double value) { return YAML::Node(format_double(value)); }
};

template <>
struct Codec<bool> {
  static std::string type() { return "boolean"; }
  static bool read(const YAML::Node& node, const ReadContext& context);
  static YAML::Node write(bool value) { return YAML::Node(value ? "true" : "false"); }
};

template <>
struct Codec<std::string> {
  static std::string type() { return "string"; }
  static std::string read(const YAML::Node& node, const ReadContext& context) {
    return scalar_text(node, context, "a string");
  }
  static YAML::Node write(const std::string& value) { return YAML::Node(value); }
};

template <>
struct Codec<std::vector<std::string>> {
  static std::string type() { return "list of strings"; }
  static std::vector<std::string> read(const YAML::Node& node, const ReadContext& context);
  static YAML::Node write(const std::vector<std::string>& value);
};

// Enumerations: the names from enum_names(E{}) (recipe.h).
template <class E>
std::vector<std::string_view> names_of() {
  std::vector<std::string_view> names;
  for (const auto& [value, name] : enum_names(E{})) names.push_back(name);
  return names;
}
template <class E>
E enum_from_name(std::string_view name) {
  for (const auto& [value, n] : enum_names(E{}))
    if (n == name) return value;
  return E{};
}

template <class E>
requires std::is_enum_v<E>
struct Codec<E> {
  static std::string type() { return "one of: " + join_names(names_of<E>(), " | "); }
  static E read(const YAML::Node& node, const ReadContext& context) {
    const auto names = names_of<E>();
    return enum_from_name<E>(names[find_name(names, node, context)]);
  }
  static YAML::Node write(E value) { return YAML::Node(std::string(enum_name(value))); }
};

// `train.recompute`: a list of module kinds, or the single word `full`.
template <>
struct Codec<std::vector<RecomputeKind>> {
  static std::string type() { return "list of rmsnorm | mla_up_proj | moe_act, or full"; }
  static std::vector<RecomputeKind> read(const YAML::Node& node, const ReadContext& context);
  static YAML::Node write(const std::vector<RecomputeKind>& value);
};

// A std::string key restricted to a list of names (ModelConfig's scoring_func, rope_scaling.type).
template <const auto& Names>
struct ChoiceCodec {
  static std::string type() { return "one of: " + join_names(Names, " | "); }
  static std::string read(const YAML::Node& node, const ReadContext& context) {
    return std::string(Names[find_name(Names, node, context)]);
  }
  static YAML::Node write(const std::string& value) { return YAML::Node(value); }
};
inline constexpr std::array<std::string_view, 2> kScoringFuncs = {"sigmoid", "softmax"};
inline constexpr std::array<std::string_view, 2> kRopeScalingTypes = {"none", "yarn"};

// `model.dtype`: a dsx::DType restricted to the float types a model can be held in.
struct ModelDTypeCodec {
  static std::string type() { return "one of: f32 | f64"; }
  static DType read(const YAML::Node& node, const ReadContext& context);
  static YAML::Node write(DType value) { return YAML::Node(std::string(dtype_name(value))); }
};

}  // namespace dsx::schema
