// `dsx tokenizer train|encode|decode|info`: byte-level BPE tokenizers in HF tokenizer.json form.
#include <fmt/core.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "kernels/error.h"
#include "trainer/cli/registry.h"

namespace dsx::cli {
namespace {

struct TrainArgs {
  size_t vocab_size = 0;
  std::string output;
  std::vector<std::string> special_tokens;
  size_t min_frequency = 2;
  int threads = 0;
  std::string pre_tokenizer = "deepseek-v3";
  bool quiet = false;
  std::vector<std::string> files;
};

struct EncodeArgs {
  std::string tokenizer;
  std::string text;
  std::vector<std::string> inputs;
};

struct DecodeArgs {
  std::string tokenizer;
  std::vector<data::TokenId> ids;
};

void run_train(const TrainArgs& args) {
  data::BpeTrainerOptions options;
  options.vocab_size = args.vocab_size;
  if (!args.special_tokens.empty()) options.special_tokens = args.special_tokens;
  options.min_frequency = args.min_frequency;
  options.threads = args.threads;
  options.pre_tokenizer = args.pre_tokenizer;
  options.show_progress = !args.quiet;
  const data::Tokenizer tokenizer = data::train_bpe(args.files, options);
  tokenizer.save(args.output);
  if (!args.quiet)
    fmt::print(stderr, "tokenizer train: wrote {} ({} tokens, hash {})\n", args.output, tokenizer.vocab_size(),
               tokenizer.hash());
}

std::string read_input(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot open input file " + path + ": " + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  return buffer.str();
}

std::string ids_line(const std::vector<data::TokenId>& ids) {
  std::string line;
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) line += ' ';
    line += std::to_string(ids[i]);
  }
  return line;
}

void run_encode(const EncodeArgs& args) {
  if (!args.inputs.empty() && !args.text.empty())
    throw UserError("tokenizer encode: give either TEXT or --input FILE, not both");
  const data::Tokenizer tokenizer = data::Tokenizer::load(args.tokenizer);
  if (args.inputs.empty()) {
    fmt::print("{}\n", ids_line(tokenizer.encode(args.text)));
    return;
  }
  for (const std::string& path : args.inputs) fmt::print("{}\n", ids_line(tokenizer.encode(read_input(path))));
}

void run_decode(const DecodeArgs& args) {
  const data::Tokenizer tokenizer = data::Tokenizer::load(args.tokenizer);
  const std::string text = tokenizer.decode(args.ids);
  std::fwrite(text.data(), 1, text.size(), stdout);
}

void run_info(const std::string& path) {
  const data::Tokenizer tokenizer = data::Tokenizer::load(path);
  fmt::print("tokenizer   {}\n", path);
  fmt::print("vocab size  {}\n", tokenizer.vocab_size());
  fmt::print("merges      {}\n", tokenizer.merges_count());
  fmt::print("hash        {}\n", tokenizer.hash());
  auto role = [](int64_t id) { return id < 0 ? std::string("none") : std::to_string(id); };
  fmt::print("bos/eos/pad {} / {} / {}\n", role(tokenizer.bos_id()), role(tokenizer.eos_id()),
             role(tokenizer.pad_id()));
  const auto added = tokenizer.added_tokens();
  fmt::print("added       {} tokens\n", added.size());
  for (const auto& [content, id] : added) fmt::print("  {:>8}  {}\n", id, content);
}

void add_train(CLI::App& tokenizer) {
  auto args = std::make_shared<TrainArgs>();
  CLI::App* train = tokenizer.add_subcommand(
      "train",
      "Train a byte-level BPE vocabulary on text files (read as raw bytes) and write it as a Hugging Face "
      "tokenizer.json. Ids: special tokens first, then the 256 bytes, then learned merges.");
  train->add_option("--vocab-size", args->vocab_size, "final vocabulary size, bytes and special tokens included")
      ->required();
  train->add_option("--output,-o", args->output, "tokenizer.json to write (atomically)")->required();
  train->add_option("--special-token", args->special_tokens,
                    "a special token (repeatable); when given, replaces the default list "
                    "<|begin_of_sentence|> <|end_of_sentence|> <|pad|> <think> </think>");
  train->add_option("--min-frequency", args->min_frequency, "never merge pairs seen fewer times")
      ->capture_default_str();
  train->add_option("--threads", args->threads, "word-counting threads (0: OMP_NUM_THREADS or all cores)")
      ->capture_default_str();
  train->add_option("--pre-tokenizer", args->pre_tokenizer, "split rules: deepseek-v3 or gpt2")->capture_default_str();
  train->add_flag("--quiet,-q", args->quiet, "no progress on stderr");
  train->add_option("FILES", args->files, "training text files")->required();
  train->callback([args] { run_train(*args); });
}

void add_encode(CLI::App& tokenizer) {
  auto args = std::make_shared<EncodeArgs>();
  CLI::App* encode = tokenizer.add_subcommand(
      "encode",
      "Print the token ids of TEXT on one line, separated by spaces; with --input, one such line per file "
      "(each file's bytes are one text). No BOS/EOS is added.");
  encode->add_option("--tokenizer,-t", args->tokenizer, "tokenizer.json")->required();
  encode->add_option("--input,-i", args->inputs, "encode this file's bytes instead of TEXT (repeatable)");
  encode->add_option("TEXT", args->text, "text to encode");
  encode->callback([args] { run_encode(*args); });
}

void add_decode(CLI::App& tokenizer) {
  auto args = std::make_shared<DecodeArgs>();
  CLI::App* decode =
      tokenizer.add_subcommand("decode", "Write the bytes that token IDS stand for to stdout (no newline added).");
  decode->add_option("--tokenizer,-t", args->tokenizer, "tokenizer.json")->required();
  decode->add_option("IDS", args->ids, "token ids")->required();
  decode->callback([args] { run_decode(*args); });
}

void add_info(CLI::App& tokenizer) {
  auto path = std::make_shared<std::string>();
  CLI::App* info = tokenizer.add_subcommand(
      "info", "Show a tokenizer's vocabulary size, merges, content hash, special-token roles and added tokens.");
  info->add_option("--tokenizer,-t", *path, "tokenizer.json")->required();
  info->callback([path] { run_info(*path); });
}

const Register kRegister("tokenizer", 15, [](CLI::App& app) {
  CLI::App* tokenizer = app.add_subcommand(
      "tokenizer", "Train, inspect and apply byte-level BPE tokenizers (Hugging Face tokenizer.json format)");
  tokenizer->require_subcommand(1);
  add_train(*tokenizer);
  add_encode(*tokenizer);
  add_decode(*tokenizer);
  add_info(*tokenizer);
});

}  // namespace
}  // namespace dsx::cli
