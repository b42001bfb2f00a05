// Paths and small helpers shared by the recipe and LR-schedule tests.
#pragma once
#include <stdlib.h>

#include <filesystem>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "kernels/error.h"
#include "tests/support/temp_dir.h"

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

using TempDir = dsx::test::TempDir;

// A one-document token dataset made with `tokenizer_hash` and a vocabulary of `vocab` tokens.
inline std::string write_dataset(const std::string& dir, int64_t vocab, const std::string& tokenizer_hash) {
  data::DatasetWriter writer(dir, data::TokenizerIdentity{vocab, tokenizer_hash, 0});
  const std::vector<data::TokenId> document = {1, 2, 3, 4, 5, 0};
  writer.add_document(document);
  writer.finish();
  return dir;
}

}  // namespace dsx::test
