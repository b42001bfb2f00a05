// The recipe schema: one table row per key (full path, type, default, doc, rule). The table
// drives reading YAML into a Recipe, writing it back, comparing recipes, checking each value
// and `dsx recipe explain`. Cross-field rules live in validate.cpp.
#pragma once
#include <initializer_list>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "trainer/recipe/recipe.h"

namespace YAML {
class Node;
}

namespace dsx::schema {

// Where each key's value came from ("recipes/tiny.yaml:12:5", "--set optim.lr=3e-4"), by full
// path; messages about a key start with it.
using Locations = std::map<std::string, std::string>;

// Raises the dsx::UserError for a key, prefixed with the key's location when one is known.
class Reporter {
 public:
  explicit Reporter(const Locations* locations = nullptr) : locations_(locations) {}
  [[noreturn]] void fail(std::string_view key, const std::string& message) const;
  // A rule between several keys: located at the one set on the command line, if any (that is
  // what the user just changed), else at the first that has a location.
  [[noreturn]] void fail(std::initializer_list<std::string_view> keys, const std::string& message) const;
  std::string location_of(std::string_view key) const;

 private:
  const Locations* locations_;
};

struct KeyInfo {
  std::string path;           // "optim.lr"; record fields as "data.sources[].path"
  std::string type;           // "number", "integer", "one of: a | b", ...
  std::string default_value;  // YAML text
  std::string doc;
};
struct SectionInfo {
  std::string name;
  std::string doc;
};

const std::vector<SectionInfo>& sections();
std::vector<KeyInfo> keys();
// Every key of `section` ("" = all) with its type, default and doc; throws UserError for an
// unknown section, with the closest name.
std::string explain(const std::string& section);

// True for a key (`optim.lr`, `data.sources`) or a map of keys (`optim.schedule`, `model`).
bool is_known_path(const std::string& path);
// "did you mean `x`?" for an unknown path, or an empty string.
std::string suggestion_for(const std::string& path);

// Reads the keys present in `root` over the values already in `recipe`. Unknown keys, wrong
// types and duplicates throw UserError. Records each key's location in `where`.
// `overridden` maps paths set on the command line to their --set text.
void read(const YAML::Node& root, const std::string& source_name, const Locations& overridden, Recipe& recipe,
          Locations& where);
// Every key, in schema order.
YAML::Node write(const Recipe& recipe);
bool equal(const Recipe& a, const Recipe& b);
// Each key's own rule (ranges, non-empty...), in schema order.
void check_values(const Recipe& recipe, const Reporter& report);

}  // namespace dsx::schema
