// Byte-level BPE tokenizer: round trips (mixed text and fuzzed bytes), special tokens, training,
// save/load, content hash, batch encoding.
#include <catch2/catch.hpp>
#include <random>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "kernels/error.h"
#include "tests/data/test_tokenizer_support.h"

using dsx::data::BpeTrainerOptions;
using dsx::data::TokenId;
using dsx::data::Tokenizer;
using dsx::data::test::deepseek_style_tokenizer;
using dsx::data::test::gpt2_style_tokenizer;
using dsx::data::test::mixed_documents;
using dsx::data::test::ScratchDir;
using dsx::data::test::training_corpus;

namespace {

std::string concatenated_documents() {
  std::string all;
  for (const std::string& doc : mixed_documents()) all += doc + "\n";
  return all;
}

// Random byte strings that stress every path: arbitrary bytes (mostly invalid UTF-8), valid
// characters of 1-4 bytes, whitespace runs, special tokens and prefixes of them.
std::string random_bytes(std::mt19937& rng) {
  static const std::vector<std::string> fragments = {
      "<think>",  "</think>",    "<|pad|>", "<thi", "<|end_of_sentence|>",
      " ",        "  ",          "\n",      "\r\n", "\t",
      "123",      "ü",           "中",      "😀",    "e\u0301",
      "'s",       "The",         " world",  "\xff", "\xc3",
      "\xe4\xb8", "\xf0\x9f\x98"};
  std::string s;
  const size_t parts = rng() % 24;
  for (size_t i = 0; i < parts; ++i) {
    switch (rng() % 4) {
      case 0:
        s += static_cast<char>(rng() % 256);
        break;
      case 1: {
        std::string bytes;
        const size_t n = 1 + rng() % 6;
        for (size_t k = 0; k < n; ++k) bytes += static_cast<char>(rng() % 256);
        s += bytes;
        break;
      }
      case 2:
        s += fragments[rng() % fragments.size()];
        break;
      default:
        s += static_cast<char>('a' + rng() % 26);
    }
  }
  return s;
}

size_t count_of(const std::vector<TokenId>& ids, TokenId id) {
  return static_cast<size_t>(std::count(ids.begin(), ids.end(), id));
}

}  // namespace

TEST_CASE("tokenizer: decode(encode(s)) == s on mixed text", "[tokenizer]") {
  for (const Tokenizer* tok : {&deepseek_style_tokenizer(), &gpt2_style_tokenizer()}) {
    for (const std::string& doc : mixed_documents()) {
      const auto ids = tok->encode(doc);
      CHECK(tok->decode(ids) == doc);
    }
    const std::string all = concatenated_documents();
    CHECK(tok->decode(tok->encode(all)) == all);
    CHECK(tok->encode("").empty());
  }
}

TEST_CASE("tokenizer: decode(encode(s)) == s on fuzzed byte strings", "[tokenizer]") {
  std::mt19937 rng(12345);  // fixed seed: failures reproduce
  size_t invalid_utf8 = 0;
  for (int i = 0; i < 3000; ++i) {
    const std::string s = random_bytes(rng);
    for (const Tokenizer* tok : {&deepseek_style_tokenizer(), &gpt2_style_tokenizer()}) {
      const auto ids = tok->encode(s);
      REQUIRE(tok->decode(ids) == s);
    }
    invalid_utf8 += s.find('\xff') != std::string::npos;
  }
  CHECK(invalid_utf8 > 100);  // the generator really produced invalid UTF-8
}

TEST_CASE("tokenizer: special tokens are matched in raw text and never split", "[tokenizer]") {
  const Tokenizer& tok = deepseek_style_tokenizer();
  const int64_t think = tok.token_id("<think>");
  const int64_t end_think = tok.token_id("</think>");
  REQUIRE(think >= 0);
  REQUIRE(end_think >= 0);
  CHECK(tok.encode("<think>") == std::vector<TokenId>{static_cast<TokenId>(think)});

  const auto ids = tok.encode("so<think>reasoning</think>answer<think>");
  CHECK(count_of(ids, static_cast<TokenId>(think)) == 2);
  CHECK(count_of(ids, static_cast<TokenId>(end_think)) == 1);
  CHECK(ids.front() != static_cast<TokenId>(think));
  CHECK(ids.back() == static_cast<TokenId>(think));

  // Fragments are ordinary text.
  const auto partial = tok.encode("<thin k> <think");
  CHECK(count_of(partial, static_cast<TokenId>(think)) == 0);

  // Roles come from the trainer's default special tokens, in order.
  CHECK(tok.bos_id() == 0);
  CHECK(tok.eos_id() == 1);
  CHECK(tok.pad_id() == 2);
  CHECK(tok.token_id("<|begin_of_sentence|>") == 0);
  CHECK(tok.encode("<|end_of_sentence|>") == std::vector<TokenId>{1});
  CHECK(tok.token_id("no such token") == -1);
}

TEST_CASE("tokenizer: train_bpe reaches the requested vocabulary size and compresses", "[tokenizer]") {
  const Tokenizer& tok = deepseek_style_tokenizer();
  CHECK(tok.vocab_size() == 800);
  CHECK(tok.merges_count() >= 800 - 256 - 5);         // one merge per learned token at least
  const std::string text = training_corpus(500, 99);  // unseen lines from the same distribution
  const auto ids = tok.encode(text);
  // 800 tokens over this narrow corpus merge whole words; a byte per token would be 1.0.
  INFO("tokens " << ids.size() << " bytes " << text.size());
  CHECK(static_cast<double>(ids.size()) < 0.35 * static_cast<double>(text.size()));
  for (TokenId id : ids) CHECK(id < tok.vocab_size());
}

TEST_CASE("tokenizer: train_bpe is deterministic and independent of the thread count", "[tokenizer]") {
  ScratchDir dir("tok-det");
  const std::vector<std::string> files = {dir.write("a.txt", training_corpus(3000, 3)),
                                          dir.write("b.txt", training_corpus(1000, 4))};
  BpeTrainerOptions options;
  options.vocab_size = 500;
  options.show_progress = false;
  options.threads = 1;
  const Tokenizer one = train_bpe(files, options);
  options.threads = 3;
  const Tokenizer three = train_bpe(files, options);
  CHECK(one.hash() == three.hash());
  const std::string text = concatenated_documents();
  CHECK(one.encode(text) == three.encode(text));
}

TEST_CASE("tokenizer: save then load gives the same ids and hash", "[tokenizer]") {
  ScratchDir dir("tok-save");
  for (const Tokenizer* tok : {&deepseek_style_tokenizer(), &gpt2_style_tokenizer()}) {
    const std::string path = dir.file("tok.json");
    tok->save(path);
    const Tokenizer loaded = Tokenizer::load(path);
    CHECK(loaded.hash() == tok->hash());
    CHECK(loaded.vocab_size() == tok->vocab_size());
    CHECK(loaded.bos_id() == tok->bos_id());
    for (const std::string& doc : mixed_documents()) CHECK(loaded.encode(doc) == tok->encode(doc));
    // Saving what was loaded reproduces the file byte for byte.
    loaded.save(dir.file("again.json"));
    std::ifstream a(path, std::ios::binary), b(dir.file("again.json"), std::ios::binary);
    const std::string first((std::istreambuf_iterator<char>(a)), {}), second((std::istreambuf_iterator<char>(b)), {});
    CHECK(first == second);
  }
}

TEST_CASE("tokenizer: the content hash is stable and tells vocabularies apart", "[tokenizer]") {
  const Tokenizer& tok = deepseek_style_tokenizer();
  CHECK(tok.hash().size() == 16);
  CHECK(tok.hash() != gpt2_style_tokenizer().hash());

  ScratchDir dir("tok-hash");
  const std::vector<std::string> files = {dir.write("c.txt", training_corpus(4000, 7))};
  BpeTrainerOptions options;
  options.show_progress = false;
  options.vocab_size = 800;
  const std::string same = train_bpe(files, options).hash();
  CHECK(same == tok.hash());  // same corpus, same options: same tokenizer
  options.vocab_size = 799;
  CHECK(train_bpe(files, options).hash() != tok.hash());
  options.vocab_size = 800;
  options.special_tokens.push_back("<|tool|>");
  CHECK(train_bpe(files, options).hash() != tok.hash());
}

TEST_CASE("tokenizer: encode_batch equals encode, in order, on several threads", "[tokenizer]") {
  const Tokenizer& tok = deepseek_style_tokenizer();
  std::vector<std::string> docs = mixed_documents();
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) docs.push_back(random_bytes(rng));
  for (int threads : {1, 2, 4}) {
    const auto batch = tok.encode_batch(docs, threads);
    REQUIRE(batch.size() == docs.size());
    for (size_t i = 0; i < docs.size(); ++i) CHECK(batch[i] == tok.encode(docs[i]));
  }
}

TEST_CASE("tokenizer: train_bpe refuses impossible options and missing files", "[tokenizer]") {
  ScratchDir dir("tok-bad-train");
  const std::vector<std::string> files = {dir.write("c.txt", "some text\n")};
  BpeTrainerOptions options;
  options.show_progress = false;

  options.vocab_size = 260;  // 256 bytes + 5 specials do not fit
  CHECK_THROWS_WITH(train_bpe(files, options), Catch::Contains("too small"));
  options.vocab_size = 300;

  const std::vector<std::string> missing = {dir.file("missing.txt")};
  CHECK_THROWS_AS(train_bpe(missing, options), dsx::UserError);
  CHECK_THROWS_WITH(train_bpe(missing, options), Catch::Contains("missing.txt"));
  CHECK_THROWS_WITH(train_bpe({}, options), Catch::Contains("no training files"));

  options.special_tokens = {"<a>", "<a>"};
  CHECK_THROWS_WITH(train_bpe(files, options), Catch::Contains("twice"));
  options.special_tokens = {"<a>"};
  options.pre_tokenizer = "bert";
  CHECK_THROWS_WITH(train_bpe(files, options), Catch::Contains("bert"));
}

TEST_CASE("tokenizer: a corpus too small for the vocabulary stops early with what it has", "[tokenizer]") {
  ScratchDir dir("tok-small");
  const std::vector<std::string> files = {dir.write("c.txt", "abab abab abab cd\n")};
  BpeTrainerOptions options;
  options.show_progress = false;
  options.vocab_size = 5000;
  const Tokenizer tok = train_bpe(files, options);
  // Pairs seen at least twice: a b -> ab, ab ab -> abab, space+abab; "cd" is seen once.
  CHECK(tok.vocab_size() < 300);
  CHECK(tok.encode("abab").size() == 1);
  CHECK(tok.encode("cd").size() == 2);
  CHECK(tok.decode(tok.encode("abab abab abab cd\n")) == "abab abab abab cd\n");
}

TEST_CASE("tokenizer: decode refuses ids outside the vocabulary", "[tokenizer]") {
  const Tokenizer& tok = deepseek_style_tokenizer();
  const std::vector<TokenId> bad = {static_cast<TokenId>(tok.vocab_size())};
  CHECK_THROWS_AS(tok.decode(bad), dsx::UserError);
}

TEST_CASE("tokenizer: train_bpe never learns a token whose text is a special token's", "[tokenizer]") {
  // "Ġthe" as text is a special token here, and it is also the byte-level text of " the",
  // which this corpus would otherwise merge first.
  ScratchDir dir("tok-forbidden");
  const std::vector<std::string> files = {dir.write("c.txt", "the the the the the the\n")};
  BpeTrainerOptions options;
  options.show_progress = false;
  options.vocab_size = 300;
  options.special_tokens = {"Ġthe"};
  const Tokenizer tok = train_bpe(files, options);
  CHECK(tok.token_id("Ġthe") == 0);
  const auto ids = tok.encode(" the");
  CHECK(ids.size() > 1);
  CHECK(tok.decode(ids) == " the");
  CHECK(tok.encode("Ġthe") == std::vector<TokenId>{0});
}
