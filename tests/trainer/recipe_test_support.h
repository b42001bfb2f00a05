// Paths and small helpers shared by the recipe and LR-schedule tests.
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "kernels/error.h"

namespace dsx::test {

// The repository root, found from this header's own (absolute) path, so the tests run from any
// working directory.
inline std::filesystem::path repo_root() {
  return std::filesystem::absolute(__FILE__).parent_path().parent_path().parent_path();
}
inline std::string recipe_path(const std::string& name) {
  return (repo_root() / "recipes" / name).string();
}
inline std::filesystem::path bad_recipes_dir() {
  return repo_root() / "tests" / "trainer" / "bad_recipes";
}

// The message of the dsx::UserError `f` throws, or "" when it throws none.
template <class F>
std::string user_error_of(F&& f) {
  try {
    f();
  } catch (const UserError& error) {
    return error.what();
  }
  return "";
}

// A fresh directory under the system temp dir, removed with its contents at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string pattern = (std::filesystem::temp_directory_path() / "dsx-recipe-test-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
    path_ = pattern;
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string operator/(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// A one-document token dataset made with `tokenizer_hash` and a vocabulary of `vocab` tokens.
inline std::string write_dataset(const std::string& dir, int64_t vocab, const std::string& tokenizer_hash) {
  data::DatasetWriter writer(dir, data::TokenizerIdentity{vocab, tokenizer_hash, 0});
  const std::vector<data::TokenId> document = {1, 2, 3, 4, 5, 0};
  writer.add_document(document);
  writer.finish();
  return dir;
}

}  // namespace dsx::test
