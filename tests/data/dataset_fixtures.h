// Shared helpers for the data tests: temporary directories and small generated datasets.
#pragma once
#include <stdlib.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "tests/support/temp_dir.h"

namespace dsx::data::testing {

using TempDir = dsx::test::TempDir;

inline void write_file(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
  if (!out) throw std::runtime_error("cannot write " + path);
}

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// Documents whose tokens number their own stream positions: token at position p is
// first_token + p. Every token is then unique and tells where it came from.
inline std::vector<std::vector<TokenId>> numbered_documents(int64_t n_docs, int64_t max_len, uint64_t seed,
                                                            TokenId first_token = 0) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> len(1, max_len);
  std::vector<std::vector<TokenId>> docs;
  TokenId next = first_token;
  for (int64_t d = 0; d < n_docs; ++d) {
    std::vector<TokenId> doc(static_cast<size_t>(len(rng)));
    for (auto& t : doc) t = next++;
    docs.push_back(std::move(doc));
  }
  return docs;
}

inline TokenizerIdentity test_identity(int64_t vocab = 1 << 20, std::string hash = "test-hash") {
  return {vocab, std::move(hash), 0};
}

inline DatasetIndex write_dataset(const std::string& dir, const std::vector<std::vector<TokenId>>& docs,
                                  const TokenizerIdentity& identity, int64_t shard_tokens = 1000,
                                  int64_t chunk_tokens = 64) {
  DatasetWriter writer(dir, identity, {shard_tokens, chunk_tokens});
  for (const auto& d : docs) writer.add_document(d);
  return writer.finish();
}

inline int64_t total_tokens(const std::vector<std::vector<TokenId>>& docs) {
  int64_t n = 0;
  for (const auto& d : docs) n += static_cast<int64_t>(d.size());
  return n;
}

}  // namespace dsx::data::testing
