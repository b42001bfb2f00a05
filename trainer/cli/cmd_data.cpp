// `dsx data prep` and `dsx data inspect`.
#include <fmt/core.h>

#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/dataset.h"
#include "data/prep.h"
#include "data/tokenizer.h"
#include "trainer/cli/registry.h"

namespace dsx::cli {
namespace {

struct PrepArgs {
  std::string tokenizer;
  std::string output;
  std::string format = "auto";
  std::string text_field = "text";
  bool split_blank_lines = false;
  int64_t shard_tokens = data::kDefaultShardTokens;
  int threads = 0;
  bool quiet = false;
  std::vector<std::string> inputs;
};

void add_prep(CLI::App& data) {
  auto args = std::make_shared<PrepArgs>();
  CLI::App* cmd = data.add_subcommand(
      "prep", "Tokenize .txt/.jsonl files (or folders of them) into an HDF5 token dataset; EOS ends each document");
  cmd->add_option("--tokenizer", args->tokenizer, "tokenizer.json to encode with")->required();
  cmd->add_option("--output", args->output, "dataset directory to create (must not hold a dataset yet)")->required();
  cmd->add_option("--format", args->format, "input format; auto: .jsonl/.json are JSONL, anything else text")
      ->check(CLI::IsMember({"auto", "txt", "jsonl"}))
      ->capture_default_str();
  cmd->add_option("--text-field", args->text_field, "JSONL field holding the document text")->capture_default_str();
  cmd->add_flag("--split-blank-lines", args->split_blank_lines,
                "text files: one document per blank-line-separated block (default: one per file)");
  cmd->add_option("--shard-tokens", args->shard_tokens, "tokens per shard file (documents are not split)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  cmd->add_option("--threads", args->threads, "tokenizer threads (0: all cores)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->add_flag("--quiet", args->quiet, "no progress on stderr");
  cmd->add_option("inputs", args->inputs, "input files or directories")->required()->expected(1, -1);
  cmd->callback([args] {
    const data::Tokenizer tokenizer = data::Tokenizer::load(args->tokenizer);
    data::PrepOptions options;
    options.output_dir = args->output;
    options.inputs = args->inputs;
    options.documents.format = data::parse_input_format(args->format);
    options.documents.text_field = args->text_field;
    options.documents.split_blank_lines = args->split_blank_lines;
    options.shard_tokens = args->shard_tokens;
    options.threads = args->threads;
    options.show_progress = !args->quiet;
    const data::PrepStats stats = data::prepare_dataset(tokenizer, options);
    fmt::print("wrote {}: {} documents, {} tokens, {} shards from {} files ({:.1f} MB) in {:.1f} s\n", args->output,
               stats.documents, stats.tokens, stats.shards, stats.files, static_cast<double>(stats.input_bytes) / 1e6,
               stats.seconds);
  });
}

struct InspectArgs {
  std::string dir;
  std::string tokenizer;
  int64_t sample_tokens = 64;
};

void add_inspect(CLI::App& data) {
  auto args = std::make_shared<InspectArgs>();
  CLI::App* cmd = data.add_subcommand(
      "inspect", "Check a token dataset and print its documents, tokens, shards, tokenizer and a decoded sample");
  cmd->add_option("dir", args->dir, "dataset directory")->required();
  cmd->add_option("--tokenizer", args->tokenizer, "tokenizer.json: checks it matches and decodes a sample");
  cmd->add_option("--sample-tokens", args->sample_tokens, "tokens of the first document to decode")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  cmd->callback([args] {
    const data::TokenDataset dataset = data::TokenDataset::open(args->dir);
    std::optional<data::Tokenizer> tokenizer;
    if (!args->tokenizer.empty()) tokenizer.emplace(data::Tokenizer::load(args->tokenizer));
    const std::string text = data::describe_dataset(dataset, tokenizer ? &*tokenizer : nullptr, args->sample_tokens);
    std::fputs(text.c_str(), stdout);
  });
}

const Register registration("data", 40, [](CLI::App& app) {
  CLI::App* data = app.add_subcommand("data", "Token datasets: prep (tokenize corpora) and inspect");
  data->require_subcommand(1);
  add_prep(*data);
  add_inspect(*data);
});

}  // namespace
}  // namespace dsx::cli
