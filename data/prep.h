// `dsx data prep` and `dsx data inspect`: text / JSONL corpora -> tokenized HDF5 datasets.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/tokenizer.h"

namespace dsx::data {

enum class InputFormat { by_extension, txt, jsonl };
// "txt" / "jsonl" / "auto"; UserError otherwise.
InputFormat parse_input_format(const std::string& name);

struct DocumentOptions {
  InputFormat format = InputFormat::by_extension;  // .jsonl / .json -> JSONL, anything else text
  std::string text_field = "text";                 // JSONL: the field holding the document
  bool split_blank_lines = false;                  // text: one document per blank-line block
};

// Inputs as files to read: directories are walked recursively for .txt/.text/.jsonl/.json
// files (hidden ones skipped), files are taken as given; sorted per directory so the output
// does not depend on directory listing order. UserError for missing or unreadable inputs.
std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs);

// Calls `emit` with every document of one file, in order. Text is kept byte for byte, invalid
// UTF-8 included; empty documents are skipped. JSONL errors name file:line.
void for_each_document(const std::string& file, const DocumentOptions& options,
                       const std::function<void(std::string&&)>& emit);

struct PrepOptions {
  std::string output_dir;
  std::vector<std::string> inputs;
  DocumentOptions documents;
  int64_t shard_tokens = kDefaultShardTokens;
  int64_t chunk_tokens = kDefaultChunkTokens;
  int threads = 0;                       // tokenizer threads; 0 = hardware default
  size_t batch_bytes = size_t{8} << 20;  // text handed to one encode_batch call
  bool show_progress = true;             // progress lines on stderr
};

struct PrepStats {
  int64_t files = 0;
  int64_t documents = 0;
  int64_t tokens = 0;
  int64_t shards = 0;
  int64_t input_bytes = 0;  // document bytes tokenized
  double seconds = 0;
};

TokenizerIdentity identity_of(const Tokenizer& tokenizer);

// Tokenizes every document of `options.inputs`, appends EOS to each, and writes a dataset to
// `options.output_dir` (shards renamed into place when complete, index.json last).
PrepStats prepare_dataset(const Tokenizer& tokenizer, const PrepOptions& options);

// What `dsx data inspect` prints: counts, shards, tokenizer identity and, with a tokenizer,
// the first `sample_tokens` tokens of the first document decoded. UserError if the given
// tokenizer is not the one the dataset was made with.
std::string describe_dataset(const TokenDataset& dataset, const Tokenizer* tokenizer, int64_t sample_tokens = 64);

}  // namespace dsx::data
