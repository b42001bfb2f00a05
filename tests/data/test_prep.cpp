// `data prep` / `data inspect` with a real (freshly trained) tokenizer: document splitting,
// JSONL fields, invalid UTF-8, shards, determinism, prep -> inspect -> load, bad inputs.
#include <catch2/catch.hpp>
#include <filesystem>

#include "data/dataset.h"
#include "data/loader.h"
#include "data/prep.h"
#include "data/tokenizer.h"
#include "kernels/error.h"
#include "tests/data/dataset_fixtures.h"
#include "tests/support/user_error.h"

using namespace dsx::data;
using namespace dsx::data::testing;
using dsx::test::user_error;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

const std::string kInvalidUtf8 = std::string("broken \xff\xfe bytes \xc3 and \xe2\x82 here");

std::string mixed_text(int i) {
  static const char* parts[] = {
      "The quick brown fox jumps over the lazy dog. ",
      "Größere Bäume überragen schöne Häuser. ",
      "机器学习是人工智能的一个分支。",
      "for (int i = 0; i < n; ++i) { sum += x[i]; }\n",
      "Emoji time 🙂🚀 ok. ",
      "    indented   with   runs\tof\twhitespace\n",
  };
  std::string s;
  for (int k = 0; k < 3 + i % 4; ++k) s += parts[(i + k) % 6];
  return s + "#" + std::to_string(i);
}

// One tokenizer for the whole file, trained on a small mixed corpus (fast: ~400 tokens).
const Tokenizer& test_tokenizer() {
  static TempDir dir;
  static const Tokenizer tokenizer = [] {
    std::string corpus;
    for (int i = 0; i < 300; ++i) corpus += mixed_text(i) + "\n";
    write_file(dir / "corpus.txt", corpus);
    BpeTrainerOptions options;
    options.vocab_size = 400;
    options.show_progress = false;
    options.threads = 1;
    const std::vector<std::string> files{dir / "corpus.txt"};
    return train_bpe(files, options);
  }();
  return tokenizer;
}

// Every document of a dataset, decoded, with its trailing EOS checked and removed.
std::vector<std::string> decoded_documents(const TokenDataset& ds, const Tokenizer& tok) {
  std::vector<std::string> docs;
  int64_t shard_start = 0;
  for (size_t s = 0; s < ds.num_shards(); ++s) {
    const auto offsets = ds.document_offsets(s);
    for (size_t d = 0; d + 1 < offsets.size(); ++d) {
      std::vector<TokenId> ids(static_cast<size_t>(offsets[d + 1] - offsets[d]));
      ds.read(shard_start + offsets[d], ids);
      REQUIRE(static_cast<int64_t>(ids.back()) == tok.eos_id());
      ids.pop_back();
      docs.push_back(tok.decode(ids));
    }
    shard_start += offsets.back();
  }
  return docs;
}

// mixed_text holds newlines and tabs, which a JSON string must escape.
std::string json_escaped(const std::string& text) {
  std::string out;
  for (char c : text) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\t')
      out += "\\t";
    else if (c == '"' || c == '\\')
      out += std::string("\\") + c;
    else
      out += c;
  }
  return out;
}

std::vector<std::string> documents_of(const std::string& file, const DocumentOptions& options) {
  std::vector<std::string> docs;
  for_each_document(file, options, [&](std::string&& d) { docs.push_back(std::move(d)); });
  return docs;
}

PrepOptions quiet_options(const std::string& output, std::vector<std::string> inputs) {
  PrepOptions o;
  o.output_dir = output;
  o.inputs = std::move(inputs);
  o.show_progress = false;
  o.threads = 2;
  return o;
}

}  // namespace

TEST_CASE("prep: text files are one document each, or one per blank-line block", "[prep]") {
  TempDir tmp;
  const std::string f = tmp / "a.txt";
  write_file(f, "first line\nsecond line\n\n\n  \t \nthird\r\n\r\nfourth " + kInvalidUtf8 + "\n");
  DocumentOptions whole;
  CHECK(documents_of(f, whole) == std::vector<std::string>{read_file(f)});
  DocumentOptions blocks;
  blocks.split_blank_lines = true;
  CHECK(documents_of(f, blocks) ==
        std::vector<std::string>{"first line\nsecond line", "third\r", "fourth " + kInvalidUtf8});
  write_file(tmp / "empty.txt", "");
  CHECK(documents_of(tmp / "empty.txt", whole).empty());
}

TEST_CASE("prep: JSONL documents come from the named field, invalid UTF-8 kept as bytes", "[prep]") {
  TempDir tmp;
  const std::string f = tmp / "a.jsonl";
  // The third line holds raw invalid bytes inside the JSON string (not allowed by JSON, common
  // in crawls): the bytes must come out unchanged.
  write_file(f,
             "{\"text\": \"hello\\nworld\", \"id\": 1}\n"
             "\n"
             "{\"text\": \"" +
                 kInvalidUtf8 +
                 "\", \"body\": \"x\"}\n"
                 "{\"text\": \"\\u00e4 \\ud83d\\ude42\", \"body\": \"other field\"}\n");
  DocumentOptions options;
  CHECK(documents_of(f, options) == std::vector<std::string>{"hello\nworld", kInvalidUtf8, "ä 🙂"});
  options.text_field = "body";
  write_file(tmp / "b.jsonl", "{\"body\": \"x\"}\n{\"body\": \"other field\"}\n");
  CHECK(documents_of(tmp / "b.jsonl", options) == std::vector<std::string>{"x", "other field"});
  // --format overrides the extension.
  write_file(tmp / "c.data", "{\"text\": \"from c\"}\n");
  options = DocumentOptions{InputFormat::jsonl};
  CHECK(documents_of(tmp / "c.data", options) == std::vector<std::string>{"from c"});
}

TEST_CASE("prep: bad JSONL lines and inputs name the file and line", "[prep]") {
  TempDir tmp;
  const std::string f = tmp / "a.jsonl";
  DocumentOptions options;
  const auto run = [&] { documents_of(f, options); };
  write_file(f, "{\"text\": \"a\"}\n\n{\"txt\": \"b\"}\n");
  CHECK_THAT(user_error(run), Contains(f + ":3") && Contains("'text' is missing"));
  write_file(f, "{\"text\": \"a\"}\n{\"text\": \"b\"\n");
  CHECK_THAT(user_error(run), Contains(f + ":2") && Contains("invalid JSON"));
  write_file(f, "{\"text\": 17}\n");
  CHECK_THAT(user_error(run), Contains(f + ":1") && Contains("must be a string"));
  write_file(f, "[\"text\"]\n");
  CHECK_THAT(user_error(run), Contains(f + ":1") && Contains("JSON object"));
  CHECK_THAT(user_error([&] { expand_inputs({tmp / "missing.txt"}); }),
             Contains("missing.txt") && Contains("no such file"));
  fs::create_directory(tmp / "emptydir");
  CHECK_THAT(user_error([&] { expand_inputs({tmp / "emptydir"}); }), Contains("emptydir") && Contains("no .txt"));
}

TEST_CASE("prep: directories are walked in sorted order, hidden and other files skipped", "[prep]") {
  TempDir tmp;
  fs::create_directories(tmp / "corpus/sub");
  fs::create_directories(tmp / "corpus/.git");
  write_file(tmp / "corpus/b.txt", "b");
  write_file(tmp / "corpus/a.jsonl", "{}");
  write_file(tmp / "corpus/sub/c.txt", "c");
  write_file(tmp / "corpus/.hidden.txt", "h");
  write_file(tmp / "corpus/.git/x.txt", "g");
  write_file(tmp / "corpus/notes.md", "m");
  const auto files = expand_inputs({tmp / "corpus", tmp / "corpus/notes.md"});
  CHECK(files == std::vector<std::string>{tmp / "corpus/a.jsonl", tmp / "corpus/b.txt", tmp / "corpus/sub/c.txt",
                                          tmp / "corpus/notes.md"});
}

TEST_CASE("prep: prep -> inspect -> load on a small corpus with a trained tokenizer", "[prep]") {
  const Tokenizer& tok = test_tokenizer();
  TempDir tmp;
  std::vector<std::string> expected;
  std::string jsonl;
  for (int i = 0; i < 40; ++i) {
    expected.push_back(mixed_text(i));
    jsonl += "{\"text\": \"" + std::to_string(i) + " " + std::string(i % 2 ? "odd" : "even") + "\"}\n";
  }
  std::string blocks;
  for (int i = 0; i < 40; ++i) blocks += expected[i] + "\n\n";
  fs::create_directories(tmp / "in");
  write_file(tmp / "in/part1.txt", blocks);
  write_file(tmp / "in/part2.jsonl", jsonl);
  write_file(tmp / "in/part3.txt", kInvalidUtf8);
  for (int i = 0; i < 40; ++i) expected.push_back(std::to_string(i) + " " + (i % 2 ? "odd" : "even"));
  expected.push_back(kInvalidUtf8);
  // part1 is split into blocks by the option; expected mixed_text(i) ends with "#i" and holds
  // no blank line, so each one is one block.

  PrepOptions options = quiet_options(tmp / "ds", {tmp / "in"});
  options.documents.split_blank_lines = true;
  options.shard_tokens = 300;
  options.chunk_tokens = 50;
  const PrepStats stats = prepare_dataset(tok, options);
  CHECK(stats.files == 3);
  CHECK(stats.documents == 81);
  CHECK(stats.shards > 2);

  const TokenDataset ds = TokenDataset::open(tmp / "ds");
  CHECK(ds.documents() == 81);
  CHECK(ds.tokens() == stats.tokens);
  CHECK(ds.identity() == identity_of(tok));
  CHECK(decoded_documents(ds, tok) == expected);
  for (const auto& entry : fs::directory_iterator(tmp / "ds")) CHECK(entry.path().extension() != ".partial");

  // inspect
  const std::string text = describe_dataset(ds, &tok, 8);
  CHECK_THAT(text, Contains("documents    81") && Contains("tokens       " + std::to_string(stats.tokens)) &&
                       Contains("shards       " + std::to_string(stats.shards)) && Contains(tok.hash()));
  std::vector<TokenId> first(8);
  ds.read(0, first);
  CHECK_THAT(text, Contains(tok.decode(first)));
  CHECK_THAT(describe_dataset(ds, nullptr), !Contains("sample"));

  // load, with the checks a training run makes against its tokenizer
  LoaderConfig lc;
  lc.sources = {{tmp / "ds", 1.0}};
  lc.seq_len = 16;
  lc.global_batch = 4;
  lc.micro_batch = 2;
  lc.expected_vocab_size = static_cast<int64_t>(tok.vocab_size());
  lc.expected_tokenizer_hash = tok.hash();
  TokenLoader loader(lc);
  const StepBatch b = loader.next();
  REQUIRE(b.micro_batches.size() == 2);
  const auto& mb = b.micro_batches[0];
  for (int64_t i = 0; i < mb.inputs.numel(); ++i) {
    CHECK(mb.inputs.data<int32_t>()[i] >= 0);
    CHECK(mb.inputs.data<int32_t>()[i] < static_cast<int32_t>(tok.vocab_size()));
  }
  // A segment id grows exactly after an EOS input.
  const int32_t* in = mb.inputs.data<int32_t>();
  const int32_t* seg = mb.segment_ids.data<int32_t>();
  for (int64_t t = 1; t < 16; ++t) CHECK(seg[t] - seg[t - 1] == (in[t - 1] == tok.eos_id() ? 1 : 0));
}

TEST_CASE("prep: the dataset does not depend on the thread count or batch size", "[prep]") {
  const Tokenizer& tok = test_tokenizer();
  TempDir tmp;
  std::string jsonl;
  for (int i = 0; i < 200; ++i) jsonl += "{\"text\": \"" + json_escaped(mixed_text(i * 7)) + "\"}\n";
  write_file(tmp / "c.jsonl", jsonl);
  PrepOptions one = quiet_options(tmp / "one", {tmp / "c.jsonl"});
  one.threads = 1;
  PrepOptions many = quiet_options(tmp / "many", {tmp / "c.jsonl"});
  many.threads = 2;
  many.batch_bytes = 1000;  // many small batches through the double buffer
  prepare_dataset(tok, one);
  prepare_dataset(tok, many);
  const TokenDataset a = TokenDataset::open(tmp / "one"), b = TokenDataset::open(tmp / "many");
  REQUIRE(a.tokens() == b.tokens());
  std::vector<TokenId> ta(static_cast<size_t>(a.tokens())), tb(ta.size());
  a.read(0, ta);
  b.read(0, tb);
  CHECK(ta == tb);
  CHECK(a.documents() == 200);
}

TEST_CASE("prep: bad input stops prep with one message and leaves nothing that looks complete", "[prep]") {
  const Tokenizer& tok = test_tokenizer();
  TempDir tmp;
  std::string lines;
  for (int i = 0; i < 500; ++i) lines += "{\"text\": \"document number " + std::to_string(i) + "\"}\n";
  write_file(tmp / "good.jsonl", lines);
  write_file(tmp / "bad.jsonl", lines + "{\"title\": \"no text here\"}\n");

  SECTION("a JSONL line without the field, after shards were already written") {
    PrepOptions o = quiet_options(tmp / "ds", {tmp / "good.jsonl", tmp / "bad.jsonl"});
    o.shard_tokens = 200;
    o.batch_bytes = 2000;
    CHECK_THAT(user_error([&] { prepare_dataset(tok, o); }),
               Contains(tmp / "bad.jsonl:501") && Contains("'text' is missing"));
    CHECK_FALSE(fs::exists(tmp / "ds/index.json"));
    CHECK((!fs::exists(tmp / "ds") || fs::is_empty(tmp / "ds")));
    CHECK_THAT(user_error([&] { TokenDataset::open(tmp / "ds"); }), Contains("ds"));
  }
  SECTION("missing input") {
    CHECK_THAT(user_error([&] { prepare_dataset(tok, quiet_options(tmp / "ds", {tmp / "gone.txt"})); }),
               Contains("gone.txt"));
  }
  SECTION("output already holds a dataset") {
    prepare_dataset(tok, quiet_options(tmp / "ds", {tmp / "good.jsonl"}));
    CHECK_THAT(user_error([&] { prepare_dataset(tok, quiet_options(tmp / "ds", {tmp / "good.jsonl"})); }),
               Contains("already holds a dataset"));
    CHECK_NOTHROW(TokenDataset::open(tmp / "ds"));
  }
  SECTION("inputs without documents") {
    write_file(tmp / "empty.txt", "");
    CHECK_THAT(user_error([&] { prepare_dataset(tok, quiet_options(tmp / "ds", {tmp / "empty.txt"})); }),
               Contains("no documents"));
    CHECK_FALSE(fs::exists(tmp / "ds/index.json"));
  }
  SECTION("a tokenizer without EOS") {
    BpeTrainerOptions options;
    options.vocab_size = 300;
    options.special_tokens = {};
    options.show_progress = false;
    const std::vector<std::string> files{tmp / "good.jsonl"};
    const Tokenizer no_eos = train_bpe(files, options);
    CHECK_THAT(user_error([&] { prepare_dataset(no_eos, quiet_options(tmp / "ds", {tmp / "good.jsonl"})); }),
               Contains("no EOS"));
  }
  SECTION("inspect with another tokenizer") {
    prepare_dataset(tok, quiet_options(tmp / "ds", {tmp / "good.jsonl"}));
    BpeTrainerOptions options;
    options.vocab_size = 300;
    options.show_progress = false;
    const std::vector<std::string> files{tmp / "good.jsonl"};
    const Tokenizer other = train_bpe(files, options);
    const TokenDataset ds = TokenDataset::open(tmp / "ds");
    CHECK_THAT(user_error([&] { describe_dataset(ds, &other); }), Contains("hash"));
    LoaderConfig lc;
    lc.sources = {{tmp / "ds", 1.0}};
    lc.seq_len = 8;
    lc.global_batch = 2;
    lc.micro_batch = 1;
    lc.expected_tokenizer_hash = other.hash();
    CHECK_THAT(user_error([&] { TokenLoader l(lc); }), Contains(other.hash()) && Contains(tok.hash()));
  }
}
