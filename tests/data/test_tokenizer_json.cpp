// tokenizer.json details: HF semantics on hand-written files (merge formats, ignore_merges,
// added-token rules, missing bytes), DeepSeek-V3's split rules, the long-word merge path, and
// the error for every kind of bad file.
#include <catch2/catch.hpp>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/tokenizer.h"
#include "data/tokenizer_impl.h"
#include "kernels/error.h"
#include "tests/data/test_tokenizer_support.h"

using dsx::data::TokenId;
using dsx::data::Tokenizer;
using dsx::data::test::ScratchDir;
using json = nlohmann::json;
namespace detail = dsx::data::detail;

namespace {

std::string token_text(const std::string& bytes) {
  return detail::bytes_to_token_text(bytes);
}

// A minimal byte-level tokenizer.json: the 256 byte tokens (id = byte) plus `extra` tokens.
json minimal_tokenizer(const std::vector<std::string>& extra_token_bytes, const json& merges) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[token_text(std::string(1, static_cast<char>(b)))] = b;
  int next = 256;
  for (const std::string& t : extra_token_bytes) vocab[token_text(t)] = next++;
  return json{{"version", "1.0"},
              {"added_tokens", json::array()},
              {"normalizer", nullptr},
              {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"use_regex", true}}},
              {"decoder", {{"type", "ByteLevel"}}},
              {"model", {{"type", "BPE"}, {"vocab", vocab}, {"merges", merges}}}};
}

json added(int id, const std::string& content, bool lstrip = false, bool rstrip = false, bool single_word = false,
           bool special = true) {
  return json{{"id", id},         {"content", content},  {"single_word", single_word}, {"lstrip", lstrip},
              {"rstrip", rstrip}, {"normalized", false}, {"special", special}};
}

Tokenizer from(const json& j) {
  return Tokenizer::from_json(j.dump(), "test.json");
}

std::vector<TokenId> bytes_ids(const std::string& s) {
  return std::vector<TokenId>(s.begin(), s.end());
}

std::vector<std::string> deepseek_pieces(const std::string& text) {
  const detail::PreTokenizer pre(detail::deepseek_v3_pre_tokenizer(), "test");
  std::vector<std::string> pieces;
  pre.run(text, [&](std::string_view p) { pieces.emplace_back(p); });
  return pieces;
}

// Reference BPE, written the plain way: merge the lowest-ranked adjacent pair (leftmost among
// equals) until none is left.
std::vector<TokenId> reference_bpe(const json& file, const std::string& word) {
  std::map<std::pair<std::string, std::string>, size_t> rank;
  const json& merges = file["model"]["merges"];
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string m = merges[i];
    rank.emplace(std::make_pair(m.substr(0, m.find(' ')), m.substr(m.find(' ') + 1)), i);
  }
  std::vector<std::string> symbols;
  for (char c : word) symbols.push_back(token_text(std::string(1, c)));
  while (symbols.size() > 1) {
    size_t best = symbols.size(), best_rank = SIZE_MAX;
    for (size_t i = 0; i + 1 < symbols.size(); ++i) {
      auto it = rank.find({symbols[i], symbols[i + 1]});
      if (it != rank.end() && it->second < best_rank) best_rank = it->second, best = i;
    }
    if (best == symbols.size()) break;
    symbols[best] += symbols[best + 1];
    symbols.erase(symbols.begin() + static_cast<long>(best) + 1);
  }
  std::vector<TokenId> ids;
  for (const std::string& s : symbols) ids.push_back(file["model"]["vocab"][s].get<TokenId>());
  return ids;
}

std::string load_error(const std::string& path) {
  try {
    Tokenizer::load(path);
  } catch (const dsx::UserError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("tokenizer: byte-level map is GPT-2's and inverts", "[tokenizer]") {
  const auto& map = detail::byte_to_codepoint();
  CHECK(map[' '] == 0x120);   // 'Ġ'
  CHECK(map['\n'] == 0x10A);  // 'Ċ'
  CHECK(map['A'] == 'A');
  CHECK(map[0xAD] == 0x143);  // the soft hyphen is not printable: last of the remapped bytes
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  CHECK(detail::token_text_to_bytes(detail::bytes_to_token_text(all)) == all);
  CHECK_FALSE(detail::token_text_to_bytes("<｜begin▁of▁sentence｜>").has_value());
}

TEST_CASE("tokenizer: UTF-8 validation rejects what Python's decoder rejects", "[tokenizer]") {
  CHECK(detail::is_valid_utf8("Grüße 中文 😀"));
  for (const char* bad : {"\x80", "\xc3", "\xc0\xaf", "\xe0\x80\xaf", "\xed\xa0\x80", "\xf4\x90\x80\x80", "\xff"})
    CHECK_FALSE(detail::is_valid_utf8(bad));
}

TEST_CASE("tokenizer: DeepSeek-V3 split rules cut text where HF does", "[tokenizer]") {
  // Expected pieces printed by HF tokenizers 0.23 for DeepSeek-V3's pre_tokenizer.
  using V = std::vector<std::string>;
  CHECK(deepseek_pieces("foo1234567中文ABC中文") == V{"foo", "123", "456", "7", "中文", "ABC", "中文"});
  CHECK(deepseek_pieces(":\n\n") == V{":\n\n"});
  CHECK(deepseek_pieces(" \t\r\n") == V{" \t\r\n"});
  CHECK(deepseek_pieces("Hello, world!") == V{"Hello", ",", " world", "!"});
  CHECK(deepseek_pieces("it's") == V{"it", "'s"});
  CHECK(deepseek_pieces("$1,234") == V{"$", "1", ",", "234"});
  CHECK(deepseek_pieces("a  b   c\n\n  d") == V{"a", " ", " b", "  ", " c", "\n\n", " ", " d"});
  CHECK(deepseek_pieces("x = [1, 2]") == V{"x", " =", " [", "1", ",", " ", "2", "]"});
  CHECK(deepseek_pieces("日本語のテキスト") == V{"日本語のテキスト"});
}

TEST_CASE("tokenizer: merges load from \"a b\" strings and from [a, b] pairs alike", "[tokenizer]") {
  const json strings = minimal_tokenizer(
      {"ab", "abc"}, {token_text("a") + " " + token_text("b"), token_text("ab") + " " + token_text("c")});
  json pairs = strings;
  pairs["model"]["merges"] = json::array({json::array({"a", "b"}), json::array({"ab", "c"})});
  for (const json& j : {strings, pairs}) {
    const Tokenizer tok = from(j);
    CHECK(tok.encode("abc") == std::vector<TokenId>{257});
    CHECK(tok.encode("abd") == std::vector<TokenId>{256, 'd'});
    CHECK(tok.encode("cab") == std::vector<TokenId>{'c', 256});
    CHECK(tok.vocab_size() == 258);
    CHECK(tok.bos_id() == -1);  // no special tokens, no roles
  }
}

TEST_CASE("tokenizer: ignore_merges takes whole words from the vocabulary", "[tokenizer]") {
  json j = minimal_tokenizer({"xyz"}, json::array());
  CHECK(from(j).encode("xyz") == bytes_ids("xyz"));
  j["model"]["ignore_merges"] = true;
  CHECK(from(j).encode("xyz") == std::vector<TokenId>{256});
  CHECK(from(j).encode("xyzx") == bytes_ids("xyzx"));
}

TEST_CASE("tokenizer: added tokens follow HF's lstrip, rstrip, single_word and leftmost-longest rules", "[tokenizer]") {
  json j = minimal_tokenizer({}, json::array());
  j["added_tokens"] = json::array({added(256, "<T>", true, true), added(257, "@@", false, false, true, false),
                                   added(258, "<a>"), added(259, "<a><b>")});
  const Tokenizer tok = from(j);
  CHECK(tok.vocab_size() == 260);
  // lstrip and rstrip swallow the whitespace around the token.
  CHECK(tok.encode("x  <T>\t y") == std::vector<TokenId>{'x', 256, 'y'});
  // single_word: only where no letter or digit touches it.
  CHECK(tok.encode("a @@ b") == std::vector<TokenId>{'a', ' ', 257, ' ', 'b'});
  CHECK(tok.encode("a@@b") == bytes_ids("a@@b"));
  // The longest token at the leftmost position wins.
  CHECK(tok.encode("<a><b><a>") == std::vector<TokenId>{259, 258});
  // Added tokens decode to their content byte for byte.
  CHECK(tok.decode(std::vector<TokenId>{259, 256}) == "<a><b><T>");
}

TEST_CASE("tokenizer: bytes missing from the vocabulary are dropped, or become unk when there is one", "[tokenizer]") {
  json j = minimal_tokenizer({}, json::array());
  j["model"]["vocab"].erase(token_text("z"));
  CHECK(from(j).encode("azb") == bytes_ids("ab"));  // HF drops them when there is no unk_token
  j["model"]["vocab"]["<unk>"] = 300;
  j["model"]["unk_token"] = "<unk>";
  CHECK(from(j).encode("azzb") == std::vector<TokenId>{'a', 300, 300, 'b'});
  j["model"]["fuse_unk"] = true;
  CHECK(from(j).encode("azzb") == std::vector<TokenId>{'a', 300, 'b'});
}

TEST_CASE("tokenizer: long words take the heap merge path and agree with plain BPE", "[tokenizer]") {
  ScratchDir dir("tok-long");
  const Tokenizer& tok = dsx::data::test::deepseek_style_tokenizer();
  tok.save(dir.file("tok.json"));
  std::ifstream in(dir.file("tok.json"));
  const json file = json::parse(in);
  // Each of these is a single pre-token far longer than the linear-scan limit.
  std::string cjk, spaces(150, ' '), junk, letters;
  for (int i = 0; i < 30; ++i) cjk += "中文分词测试深度求索";
  for (int i = 0; i < 90; ++i) junk += static_cast<char>(0x80 + (i * 7) % 64);
  for (int i = 0; i < 60; ++i) letters += "the"[i % 3];
  for (const std::string& word : {cjk, spaces, junk, letters}) {
    REQUIRE(word.size() > 48);
    CHECK(tok.encode(word) == reference_bpe(file, word));
  }
  // And words under the limit, for the linear path.
  for (const std::string& word : {std::string("Grüße"), std::string("深度求索"), std::string("thethe")})
    CHECK(tok.encode(word) == reference_bpe(file, word));
}

TEST_CASE("tokenizer: bad tokenizer.json files give a UserError naming the file and the key", "[tokenizer]") {
  ScratchDir dir("tok-bad-json");
  const json good = minimal_tokenizer({"ab"}, {token_text("a") + " " + token_text("b")});
  CHECK_NOTHROW(Tokenizer::load(dir.write("good.json", good.dump())));

  const std::string missing = dir.file("missing.json");
  CHECK_THAT(load_error(missing), Catch::Contains(missing) && Catch::Contains("cannot open"));
  CHECK_THAT(load_error(dir.file("")), Catch::Contains("directory"));
  const std::string truncated = dir.write("truncated.json", good.dump().substr(0, 100));
  CHECK_THAT(load_error(truncated), Catch::Contains(truncated) && Catch::Contains("not valid JSON"));
  CHECK_THAT(load_error(dir.write("array.json", "[1, 2]")), Catch::Contains("expected an object"));

  struct Case {
    const char* name;
    std::function<void(json&)> edit;
    const char* key;
  };
  const std::vector<Case> cases = {
      {"no model", [](json& j) { j.erase("model"); }, "model"},
      {"wrong model", [](json& j) { j["model"]["type"] = "WordPiece"; }, "model.type"},
      {"no vocab", [](json& j) { j["model"].erase("vocab"); }, "model.vocab"},
      {"no merges", [](json& j) { j["model"].erase("merges"); }, "model.merges"},
      {"merge of three", [](json& j) { j["model"]["merges"][0] = "a b c"; }, "model.merges[0]"},
      {"merge of unknown", [](json& j) { j["model"]["merges"][0] = "a qq"; }, "model.merges[0]"},
      {"negative id", [](json& j) { j["model"]["vocab"]["ab"] = -4; }, "model.vocab"},
      {"sparse ids", [](json& j) { j["model"]["vocab"]["ab"] = 4000000000u; }, "far from dense"},
      {"id used twice", [](json& j) { j["model"]["vocab"]["ab"] = 7; }, "id 7"},
      {"dropout", [](json& j) { j["model"]["dropout"] = 0.1; }, "model.dropout"},
      {"null pre-tokenizer", [](json& j) { j["pre_tokenizer"] = nullptr; }, "pre_tokenizer"},
      {"other pre-tokenizer",
       [](json& j) {
         j["pre_tokenizer"] = {{"type", "Whitespace"}};
       },
       "pre_tokenizer.type"},
      {"no ByteLevel",
       [](json& j) {
         j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "\\s+"}}}, {"behavior", "Isolated"}};
       },
       "ByteLevel"},
      {"bad regex",
       [](json& j) {
         j["pre_tokenizer"] = {{"type", "Sequence"},
                               {"pretokenizers",
                                {{{"type", "Split"}, {"pattern", {{"Regex", "(\\p{L}"}}}, {"behavior", "Isolated"}},
                                 {{"type", "ByteLevel"}, {"use_regex", false}}}}};
       },
       "regular expression"},
      {"Split behavior",
       [](json& j) {
         j["pre_tokenizer"] = {{"type", "Sequence"},
                               {"pretokenizers",
                                {{{"type", "Split"}, {"pattern", {{"String", " "}}}, {"behavior", "MergedWithNext"}},
                                 {{"type", "ByteLevel"}}}}};
       },
       "MergedWithNext"},
      {"normalizer",
       [](json& j) {
         j["normalizer"] = {{"type", "NFC"}};
       },
       "normalizer"},
      {"decoder",
       [](json& j) {
         j["decoder"] = {{"type", "WordPiece"}};
       },
       "decoder.type"},
      {"added token without id",
       [](json& j) {
         j["added_tokens"] = {{{"content", "<x>"}}};
       },
       "added_tokens[0].id"},
  };
  for (const Case& c : cases) {
    json j = good;
    c.edit(j);
    const std::string path = dir.write(std::string(c.name) + ".json", j.dump());
    INFO(c.name);
    CHECK_THAT(load_error(path), Catch::Contains(path) && Catch::Contains(c.key));
  }
}
