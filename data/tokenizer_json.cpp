// Reading and writing Hugging Face tokenizer.json (BPE model, ByteLevel pre-tokenizer and
// decoder, optional Split steps before the ByteLevel one, added tokens).
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>

#include "data/tokenizer.h"
#include "data/tokenizer_impl.h"
#include "kernels/error.h"

namespace dsx::data {
namespace {

// Reading uses nlohmann::json (std::map objects, keys sorted): ordered_json's objects are flat
// vectors whose construction is quadratic, far too slow for a 128K-token vocabulary. Sections
// dsx keeps verbatim (decoder, post_processor...) are therefore written back with sorted keys,
// which HF does not mind. Writing uses ordered_json for a conventional layout.
using json = nlohmann::json;
using ordered_json = nlohmann::ordered_json;
using detail::AddedToken;
using detail::PreTokenizerStage;
using detail::TokenizerSpec;

// Field access that names the file and the JSON path of whatever is wrong.
class Reader {
 public:
  explicit Reader(std::string source) : source_(std::move(source)) {}
  const std::string& source() const { return source_; }

  [[noreturn]] void fail(const std::string& path, const std::string& what) const {
    throw UserError(source_ + ": " + path + ": " + what);
  }
  const json& required(const json& object, const std::string& path, const char* key) const {
    auto it = object.find(key);
    if (it == object.end()) fail(join(path, key), "required key is missing");
    return *it;
  }
  const json& object(const json& value, const std::string& path) const {
    if (!value.is_object()) fail(path, std::string("expected an object, found ") + value.type_name());
    return value;
  }
  std::string string(const json& value, const std::string& path) const {
    if (!value.is_string()) fail(path, std::string("expected a string, found ") + value.type_name());
    return value.get<std::string>();
  }
  bool flag(const json& object, const std::string& path, const char* key, bool fallback) const {
    auto it = object.find(key);
    if (it == object.end() || it->is_null()) return fallback;
    if (!it->is_boolean()) fail(join(path, key), std::string("expected true or false, found ") + it->type_name());
    return it->get<bool>();
  }
  TokenId id(const json& value, const std::string& path) const {
    if (!value.is_number_integer() || value.get<int64_t>() < 0 ||
        value.get<int64_t>() > int64_t{std::numeric_limits<TokenId>::max()})
      fail(path, "expected a token id (an integer from 0 to 4294967295), found " + value.dump());
    return static_cast<TokenId>(value.get<int64_t>());
  }
  static std::string join(const std::string& path, const std::string& key) {
    return path.empty() ? key : path + "." + key;
  }

 private:
  std::string source_;
};

std::string type_of(const Reader& r, const json& object, const std::string& path) {
  return r.string(r.required(object, path, "type"), Reader::join(path, "type"));
}

void read_pre_tokenizer(const Reader& r, const json& value, const std::string& path,
                        std::vector<PreTokenizerStage>& stages) {
  r.object(value, path);
  const std::string type = type_of(r, value, path);
  if (type == "Sequence") {
    const json& list = r.required(value, path, "pretokenizers");
    if (!list.is_array()) r.fail(path + ".pretokenizers", "expected an array");
    for (size_t i = 0; i < list.size(); ++i)
      read_pre_tokenizer(r, list[i], path + ".pretokenizers[" + std::to_string(i) + "]", stages);
    return;
  }
  PreTokenizerStage stage;
  if (type == "ByteLevel") {
    // HF's defaults for keys that are absent.
    stage.kind = PreTokenizerStage::Kind::kByteLevel;
    stage.add_prefix_space = r.flag(value, path, "add_prefix_space", true);
    stage.trim_offsets = r.flag(value, path, "trim_offsets", true);
    stage.use_regex = r.flag(value, path, "use_regex", true);
  } else if (type == "Split") {
    stage.kind = PreTokenizerStage::Kind::kSplit;
    const json& pattern = r.object(r.required(value, path, "pattern"), path + ".pattern");
    if (pattern.contains("Regex")) {
      stage.pattern = r.string(pattern["Regex"], path + ".pattern.Regex");
    } else if (pattern.contains("String")) {
      stage.pattern = r.string(pattern["String"], path + ".pattern.String");
      stage.pattern_is_regex = false;
    } else {
      r.fail(path + ".pattern", "expected {\"Regex\": ...} or {\"String\": ...}");
    }
    stage.behavior = r.string(r.required(value, path, "behavior"), path + ".behavior");
    stage.invert = r.flag(value, path, "invert", false);
  } else {
    r.fail(path + ".type", "pre-tokenizer '" + type + "' is not supported (dsx supports Sequence, Split, ByteLevel)");
  }
  stages.push_back(std::move(stage));
}

void read_model(const Reader& r, const json& root, TokenizerSpec& spec) {
  const json& model = r.object(r.required(root, "", "model"), "model");
  if (auto it = model.find("type"); it != model.end() && r.string(*it, "model.type") != "BPE")
    r.fail("model.type", "model '" + it->get<std::string>() + "' is not supported (dsx supports BPE)");
  if (auto it = model.find("dropout"); it != model.end() && !it->is_null() && it->get<double>() != 0.0)
    r.fail("model.dropout", "BPE dropout is not supported (it makes encoding random)");
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (auto it = model.find(key);
        it != model.end() && !it->is_null() && !r.string(*it, std::string("model.") + key).empty())
      r.fail(std::string("model.") + key, "is not supported by byte-level BPE in dsx");
  }
  if (auto it = model.find("unk_token"); it != model.end() && !it->is_null())
    spec.unk_token = r.string(*it, "model.unk_token");
  spec.fuse_unk = r.flag(model, "model", "fuse_unk", false);
  spec.byte_fallback = r.flag(model, "model", "byte_fallback", false);
  spec.ignore_merges = r.flag(model, "model", "ignore_merges", false);

  const json& vocab = r.object(r.required(model, "model", "vocab"), "model.vocab");
  spec.vocab.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it)
    spec.vocab.emplace_back(it.key(), r.id(it.value(), "model.vocab[\"" + it.key() + "\"]"));

  const json& merges = r.required(model, "model", "merges");
  if (!merges.is_array()) r.fail("model.merges", std::string("expected an array, found ") + merges.type_name());
  spec.merges.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const std::string path = "model.merges[" + std::to_string(i) + "]";
    const json& m = merges[i];
    if (m.is_string()) {  // "left right": exactly one space, as HF requires
      const std::string text = m.get<std::string>();
      const size_t space = text.find(' ');
      if (space == std::string::npos || text.find(' ', space + 1) != std::string::npos)
        r.fail(path, "expected \"left right\" (two tokens separated by one space), found \"" + text + "\"");
      spec.merges.emplace_back(text.substr(0, space), text.substr(space + 1));
    } else if (m.is_array() && m.size() == 2) {
      spec.merges.emplace_back(r.string(m[0], path + "[0]"), r.string(m[1], path + "[1]"));
    } else {
      r.fail(path, "expected \"left right\" or [\"left\", \"right\"], found " + m.dump());
    }
  }
}

void read_added_tokens(const Reader& r, const json& root, TokenizerSpec& spec) {
  auto it = root.find("added_tokens");
  if (it == root.end() || it->is_null()) return;
  if (!it->is_array()) r.fail("added_tokens", "expected an array");
  for (size_t i = 0; i < it->size(); ++i) {
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    const json& entry = r.object((*it)[i], path);
    AddedToken t;
    t.id = r.id(r.required(entry, path, "id"), path + ".id");
    t.content = r.string(r.required(entry, path, "content"), path + ".content");
    t.special = r.flag(entry, path, "special", false);
    t.single_word = r.flag(entry, path, "single_word", false);
    t.lstrip = r.flag(entry, path, "lstrip", false);
    t.rstrip = r.flag(entry, path, "rstrip", false);
    t.normalized = r.flag(entry, path, "normalized", !t.special);
    spec.added_tokens.push_back(std::move(t));
  }
}

void check_normalizer(const Reader& r, const json& root) {
  auto it = root.find("normalizer");
  if (it == root.end() || it->is_null()) return;
  const std::string type = type_of(r, r.object(*it, "normalizer"), "normalizer");
  const bool empty_sequence = type == "Sequence" && it->contains("normalizers") && (*it)["normalizers"].is_array() &&
                              (*it)["normalizers"].empty();
  if (!empty_sequence)
    r.fail("normalizer.type", "normalizer '" + type + "' is not supported (dsx supports none or an empty Sequence)");
}

void check_decoder(const Reader& r, const json& root) {
  const json& decoder = r.required(root, "", "decoder");
  if (decoder.is_null()) r.fail("decoder", "a ByteLevel decoder is required, found null");
  const std::string type = type_of(r, r.object(decoder, "decoder"), "decoder");
  if (type != "ByteLevel") r.fail("decoder.type", "decoder '" + type + "' is not supported (dsx needs ByteLevel)");
}

std::string section_json(const json& root, const char* key) {
  auto it = root.find(key);
  return it == root.end() ? "null" : it->dump();
}

TokenizerSpec spec_from_json(std::string_view text, const std::string& source) {
  json root;
  try {
    root = json::parse(text.begin(), text.end());
  } catch (const json::parse_error& e) {
    throw UserError(source + ": not valid JSON (" + e.what() + ")");
  }
  Reader r(source);
  r.object(root, "(top level)");
  TokenizerSpec spec;
  spec.source = source;
  try {
    read_model(r, root, spec);
    read_added_tokens(r, root, spec);
    check_normalizer(r, root);
    const json& pre = r.required(root, "", "pre_tokenizer");
    if (pre.is_null()) r.fail("pre_tokenizer", "a ByteLevel pre-tokenizer is required, found null");
    read_pre_tokenizer(r, pre, "pre_tokenizer", spec.pre_tokenizer);
    check_decoder(r, root);
  } catch (const json::exception& e) {  // a value of an unexpected type deep inside
    throw UserError(source + ": " + e.what());
  }
  spec.normalizer_json = section_json(root, "normalizer");
  spec.decoder_json = section_json(root, "decoder");
  spec.post_processor_json = section_json(root, "post_processor");
  spec.truncation_json = section_json(root, "truncation");
  spec.padding_json = section_json(root, "padding");
  return spec;
}

ordered_json stage_json(const PreTokenizerStage& stage) {
  ordered_json j;
  if (stage.kind == PreTokenizerStage::Kind::kSplit) {
    j["type"] = "Split";
    j["pattern"] = ordered_json{{stage.pattern_is_regex ? "Regex" : "String", stage.pattern}};
    j["behavior"] = stage.behavior;
    j["invert"] = stage.invert;
  } else {
    j["type"] = "ByteLevel";
    j["add_prefix_space"] = stage.add_prefix_space;
    j["trim_offsets"] = stage.trim_offsets;
    j["use_regex"] = stage.use_regex;
  }
  return j;
}

ordered_json pre_tokenizer_json(const std::vector<PreTokenizerStage>& stages) {
  if (stages.size() == 1) return stage_json(stages[0]);
  ordered_json list = ordered_json::array();
  for (const auto& s : stages) list.push_back(stage_json(s));
  return ordered_json{{"type", "Sequence"}, {"pretokenizers", list}};
}

// Indents every line after the first of a JSON dump by `spaces`.
std::string indented(const std::string& text, size_t spaces) {
  std::string out;
  for (char c : text) {
    out += c;
    if (c == '\n') out.append(spaces, ' ');
  }
  return out;
}

std::string json_string(const std::string& s) {
  return json(s).dump();
}

// The vocabulary and merges are streamed by hand: building a 128K-entry ordered_json object is
// quadratic (its map is a flat vector searched on every insert).
void append_model(const TokenizerSpec& spec, std::string& out) {
  ordered_json options;
  options["type"] = "BPE";
  options["dropout"] = nullptr;
  options["unk_token"] = spec.unk_token ? ordered_json(*spec.unk_token) : ordered_json(nullptr);
  options["continuing_subword_prefix"] = nullptr;
  options["end_of_word_suffix"] = nullptr;
  options["fuse_unk"] = spec.fuse_unk;
  options["byte_fallback"] = spec.byte_fallback;
  options["ignore_merges"] = spec.ignore_merges;
  out += "  \"model\": {\n";
  for (auto it = options.begin(); it != options.end(); ++it)
    out += "    " + json_string(it.key()) + ": " + it.value().dump() + ",\n";

  auto vocab = spec.vocab;
  std::sort(vocab.begin(), vocab.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  out += "    \"vocab\": {";
  for (size_t i = 0; i < vocab.size(); ++i)
    out += (i ? ",\n      " : "\n      ") + json_string(vocab[i].first) + ": " + std::to_string(vocab[i].second);
  out += vocab.empty() ? "},\n" : "\n    },\n";

  // "left right" strings (what DeepSeek-V3 ships and every HF version reads) unless a token
  // holds a space, which only the newer [left, right] form can carry.
  bool spaces = false;
  for (const auto& [a, b] : spec.merges)
    spaces = spaces || a.find(' ') != std::string::npos || b.find(' ') != std::string::npos;
  out += "    \"merges\": [";
  for (size_t i = 0; i < spec.merges.size(); ++i) {
    const auto& [a, b] = spec.merges[i];
    out += i ? ",\n      " : "\n      ";
    if (spaces) {
      out += '[';
      out += json_string(a);
      out += ", ";
      out += json_string(b);
      out += ']';
    } else {
      out += json_string(a + ' ' + b);
    }
  }
  out += spec.merges.empty() ? "]\n" : "\n    ]\n";
  out += "  }\n";
}

std::string spec_to_json_text(const TokenizerSpec& spec) {
  ordered_json added = ordered_json::array();
  for (const AddedToken& t : spec.added_tokens) {
    added.push_back(ordered_json{{"id", t.id},
                                 {"content", t.content},
                                 {"single_word", t.single_word},
                                 {"lstrip", t.lstrip},
                                 {"rstrip", t.rstrip},
                                 {"normalized", t.normalized},
                                 {"special", t.special}});
  }
  const std::vector<std::pair<const char*, ordered_json>> sections = {
      {"version", "1.0"},
      {"truncation", ordered_json::parse(spec.truncation_json)},
      {"padding", ordered_json::parse(spec.padding_json)},
      {"added_tokens", std::move(added)},
      {"normalizer", ordered_json::parse(spec.normalizer_json)},
      {"pre_tokenizer", pre_tokenizer_json(spec.pre_tokenizer)},
      {"post_processor", ordered_json::parse(spec.post_processor_json)},
      {"decoder", ordered_json::parse(spec.decoder_json)},
  };
  std::string out = "{\n";
  for (const auto& [key, value] : sections) out += "  " + json_string(key) + ": " + indented(value.dump(2), 2) + ",\n";
  append_model(spec, out);
  out += "}\n";
  return out;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw UserError("cannot open tokenizer file " + path + ": " + std::strerror(errno));
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) throw UserError("cannot read tokenizer file " + path + ": " + std::strerror(errno));
  return buffer.str();
}

}  // namespace

Tokenizer Tokenizer::from_json(std::string_view json_text, const std::string& source_name) {
  return Tokenizer(std::make_unique<Impl>(spec_from_json(json_text, source_name)));
}

Tokenizer Tokenizer::load(const std::string& path) {
  if (std::filesystem::is_directory(path)) throw UserError("tokenizer file " + path + " is a directory");
  return from_json(read_file(path), path);
}

void Tokenizer::save(const std::string& path) const {
  const std::string text = spec_to_json_text(impl_->spec);
  // Written beside the target and renamed, so a reader never sees half a file.
  const std::string temporary = path + ".tmp." + std::to_string(::getpid());
  {
    std::ofstream out(temporary, std::ios::binary | std::ios::trunc);
    if (!out) throw UserError("cannot write tokenizer file " + temporary + ": " + std::strerror(errno));
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    out.flush();
    if (!out) {
      std::remove(temporary.c_str());
      throw UserError("cannot write tokenizer file " + temporary + ": " + std::strerror(errno));
    }
  }
  std::error_code ec;
  std::filesystem::rename(temporary, path, ec);
  if (ec) {
    std::remove(temporary.c_str());
    throw UserError("cannot rename " + temporary + " to " + path + ": " + ec.message());
  }
}

}  // namespace dsx::data
