#include "trainer/recipe/schema_codecs.h"

#include <fmt/core.h>

#include <charconv>
#include <cmath>
#include <limits>

#include "kernels/error.h"
#include "trainer/recipe/suggest.h"

namespace dsx::schema {
namespace {

std::string describe(const YAML::Node& node) {
  switch (node.Type()) {
    case YAML::NodeType::Scalar:
      return is_quoted(node) ? "\"" + node.Scalar() + "\"" : "`" + node.Scalar() + "`";
    case YAML::NodeType::Sequence:
      return "a list";
    case YAML::NodeType::Map:
      return "a map";
    default:
      return "no value";
  }
}

// Plain YAML numbers: optional sign, digits, fraction, exponent. No hex, no YAML 1.1 forms.
bool parse_double(std::string_view text, double& value) {
  if (text.starts_with('+')) text.remove_prefix(1);
  if (text.empty()) return false;
  const auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  return error == std::errc{} && end == text.data() + text.size();
}

}  // namespace

bool is_quoted(const YAML::Node& node) {
  return node.IsScalar() && node.Tag() == "!";
}

void wrong_type(const ReadContext& context, std::string_view expected, const YAML::Node& node) {
  throw UserError(fmt::format("{}`{}` must be {}, got {}", context.location, context.path, expected, describe(node)));
}

const std::string& scalar_text(const YAML::Node& node, const ReadContext& context, std::string_view expected) {
  if (!node.IsScalar()) wrong_type(context, expected, node);
  return node.Scalar();
}

std::string format_double(double value) {
  char buffer[64];
  const auto [end, error] = std::to_chars(buffer, buffer + sizeof(buffer), value);
  return std::string(buffer, error == std::errc{} ? end : buffer);
}

std::string join_names(std::span<const std::string_view> names, std::string_view separator) {
  std::string joined;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) joined += separator;
    joined += names[i];
  }
  return joined;
}

size_t find_name(std::span<const std::string_view> names, const YAML::Node& node, const ReadContext& context) {
  const std::string expected = "one of " + join_names(names, ", ");
  const std::string& text = scalar_text(node, context, expected);
  for (size_t i = 0; i < names.size(); ++i)
    if (names[i] == text) return i;
  const auto guess = closest_match(text, std::vector<std::string>(names.begin(), names.end()));
  throw UserError(fmt::format("{}`{}` must be one of {}; got `{}`{}", context.location, context.path,
                              join_names(names, ", "), text,
                              guess ? fmt::format(" (did you mean `{}`?)", *guess) : ""));
}

int64_t Codec<int64_t>::read(const YAML::Node& node, const ReadContext& context) {
  const std::string& text = scalar_text(node, context, "an integer");
  if (is_quoted(node)) wrong_type(context, "an integer", node);
  std::string_view digits = text;
  if (digits.starts_with('+')) digits.remove_prefix(1);
  int64_t value = 0;
  const auto [end, error] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (!digits.empty() && error == std::errc{} && end == digits.data() + digits.size()) return value;
  // Large counts are easier to write as 1.5e12; accept a float literal that is a whole number.
  double real = 0;
  constexpr double kLimit = 9.2e18;  // inside int64's range
  if (parse_double(text, real) && std::isfinite(real) && real == std::floor(real) && std::fabs(real) < kLimit)
    return static_cast<int64_t>(real);
  wrong_type(context, "an integer", node);
}

double Codec<double>::read(const YAML::Node& node, const ReadContext& context) {
  const std::string& text = scalar_text(node, context, "a number");
  double value = 0;
  if (is_quoted(node) || !parse_double(text, value)) wrong_type(context, "a number", node);
  if (!std::isfinite(value)) wrong_type(context, "a finite number", node);
  return value;
}

bool Codec<bool>::read(const YAML::Node& node, const ReadContext& context) {
  const std::string& text = scalar_text(node, context, "true or false");
  if (!is_quoted(node)) {
    if (text == "true" || text == "True" || text == "TRUE") return true;
    if (text == "false" || text == "False" || text == "FALSE") return false;
  }
  wrong_type(context, "true or false", node);
}

std::vector<std::string> Codec<std::vector<std::string>>::read(const YAML::Node& node, const ReadContext& context) {
  if (!node.IsSequence()) wrong_type(context, "a list of strings", node);
  std::vector<std::string> values;
  for (size_t i = 0; i < node.size(); ++i) {
    const ReadContext item{fmt::format("{}[{}]", context.path, i), context.location};
    values.push_back(scalar_text(node[i], item, "a string"));
  }
  return values;
}

YAML::Node Codec<std::vector<std::string>>::write(const std::vector<std::string>& value) {
  YAML::Node list(YAML::NodeType::Sequence);
  for (const auto& item : value) list.push_back(item);
  list.SetStyle(YAML::EmitterStyle::Flow);
  return list;
}

std::vector<RecomputeKind> Codec<std::vector<RecomputeKind>>::read(const YAML::Node& node, const ReadContext& context) {
  if (node.IsScalar() && !is_quoted(node) && node.Scalar() == "full") return {RecomputeKind::full};
  if (!node.IsSequence()) wrong_type(context, "a list of rmsnorm, mla_up_proj, moe_act, or `full`", node);
  const auto names = names_of<RecomputeKind>();
  std::vector<RecomputeKind> kinds;
  for (size_t i = 0; i < node.size(); ++i) {
    const ReadContext item{fmt::format("{}[{}]", context.path, i), context.location};
    kinds.push_back(enum_from_name<RecomputeKind>(names[find_name(names, node[i], item)]));
  }
  return kinds;
}

YAML::Node Codec<std::vector<RecomputeKind>>::write(const std::vector<RecomputeKind>& value) {
  if (std::find(value.begin(), value.end(), RecomputeKind::full) != value.end()) return YAML::Node("full");
  YAML::Node list(YAML::NodeType::Sequence);
  for (const auto kind : value) list.push_back(std::string(enum_name(kind)));
  list.SetStyle(YAML::EmitterStyle::Flow);
  return list;
}

DType ModelDTypeCodec::read(const YAML::Node& node, const ReadContext& context) {
  static constexpr std::string_view kNames[] = {"f32", "f64"};
  return find_name(kNames, node, context) == 0 ? DType::f32 : DType::f64;
}

}  // namespace dsx::schema
