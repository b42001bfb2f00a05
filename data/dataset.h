// HDF5 token datasets (format "dsx-tokens", see docs/DATA_FORMAT.md).
//
// A dataset is a directory holding shard files (`shard-00000.h5`, ...) and `index.json`.
// Each shard stores a chunked 1-D uint32 dataset `tokens` (documents back to back, each
// ending with EOS), an int64 `doc_offsets` (n_docs + 1 entries, first 0, last = tokens) and
// root attributes naming the format, its version and the tokenizer that produced the tokens.
// Writers create every file under a temporary name and rename it when complete; index.json
// comes last, so a directory without it is an unfinished dataset and readers refuse it.
#pragma once
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer.h"

namespace dsx::data {

inline constexpr std::string_view kDatasetFormat = "dsx-tokens";
inline constexpr int kDatasetFormatVersion = 1;
inline constexpr std::string_view kIndexFileName = "index.json";
inline constexpr int64_t kDefaultShardTokens = int64_t{1} << 27;  // 128 Mi tokens = 512 MiB
inline constexpr int64_t kDefaultChunkTokens = int64_t{1} << 15;  // 32 Ki tokens = 128 KiB

// The tokenizer a dataset was made with; recorded in every shard and in index.json.
struct TokenizerIdentity {
  int64_t vocab_size = 0;
  std::string tokenizer_hash;
  int64_t eos_id = -1;
  bool operator==(const TokenizerIdentity&) const = default;
};

struct ShardEntry {
  std::string file;  // relative to the dataset directory
  int64_t tokens = 0;
  int64_t documents = 0;
};

// The contents of index.json.
struct DatasetIndex {
  TokenizerIdentity identity;
  std::vector<ShardEntry> shards;
  int64_t tokens = 0;
  int64_t documents = 0;

  // Reads and checks dir/index.json; throws UserError naming the file.
  static DatasetIndex load(const std::string& dir);
  // Writes dir/index.json atomically (temporary file, fsync, rename).
  void save(const std::string& dir) const;
};

// Writes one shard: to `path + ".partial"` while open, renamed to `path` by finish(). A writer
// destroyed without finish() removes its partial file.
class ShardWriter {
 public:
  ShardWriter(std::string path, TokenizerIdentity identity, int64_t chunk_tokens = kDefaultChunkTokens);
  ~ShardWriter();
  ShardWriter(ShardWriter&&) noexcept;
  ShardWriter& operator=(ShardWriter&&) noexcept;

  void append_document(std::span<const TokenId> tokens);  // must not be empty
  int64_t tokens() const;
  int64_t documents() const;
  void finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Writes a dataset directory: documents go into shards of about `shard_tokens` tokens
// (a document is never split; a shard is closed once it reaches the size), index.json last.
// Destroyed without finish(), it removes the shards it wrote.
class DatasetWriter {
 public:
  struct Options {
    int64_t shard_tokens = kDefaultShardTokens;
    int64_t chunk_tokens = kDefaultChunkTokens;
  };
  // Refuses (UserError) a directory that already holds index.json.
  DatasetWriter(std::string dir, TokenizerIdentity identity, Options options);
  DatasetWriter(std::string dir, TokenizerIdentity identity);
  ~DatasetWriter();
  DatasetWriter(const DatasetWriter&) = delete;
  DatasetWriter& operator=(const DatasetWriter&) = delete;

  void add_document(std::span<const TokenId> tokens);
  int64_t tokens() const;
  int64_t documents() const;
  int64_t shards_written() const;
  // Closes the last shard and writes index.json. UserError if no document was added.
  DatasetIndex finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The checked header facts of one shard file.
struct ShardInfo {
  std::string path;
  TokenizerIdentity identity;
  int format_version = 0;
  int64_t tokens = 0;
  int64_t documents = 0;
};
// Opens `path`, checks format, version, attribute types and dataset shapes, and returns what
// it found. Throws UserError naming the file: missing, unreadable, truncated, not HDF5,
// foreign HDF5, version too new, inconsistent shapes.
ShardInfo inspect_shard(const std::string& path);

// A dataset directory opened for reading: index.json checked against every shard's header.
// Reads are thread-safe.
class TokenDataset {
 public:
  static TokenDataset open(const std::string& dir);
  ~TokenDataset();
  TokenDataset(TokenDataset&&) noexcept;
  TokenDataset& operator=(TokenDataset&&) noexcept;

  const std::string& dir() const;
  const DatasetIndex& index() const;
  const TokenizerIdentity& identity() const { return index().identity; }
  int64_t tokens() const { return index().tokens; }
  int64_t documents() const { return index().documents; }
  size_t num_shards() const { return index().shards.size(); }

  // Tokens [begin, begin + out.size()) of the dataset's token stream (all shards in order).
  // When `segment_ids` is given (same size as out), it receives per-token document numbers
  // relative to the first token: 0 for the document holding `begin`, +1 at each document start.
  void read(int64_t begin, std::span<TokenId> out, std::span<int32_t> segment_ids = {}) const;
  // Document offsets of one shard, local to it (documents + 1 entries, first 0, last = tokens).
  std::vector<int64_t> document_offsets(size_t shard) const;

 private:
  struct Impl;
  explicit TokenDataset(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsx::data
