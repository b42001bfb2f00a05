#include "data/prep.h"

#include <fmt/core.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <nlohmann/json.hpp>
#include <sstream>

#include "kernels/error.h"

namespace dsx::data {
namespace fs = std::filesystem;
using json = nlohmann::json;

InputFormat parse_input_format(const std::string& name) {
  if (name == "txt") return InputFormat::txt;
  if (name == "jsonl") return InputFormat::jsonl;
  if (name == "auto" || name.empty()) return InputFormat::by_extension;
  throw UserError(fmt::format("--format: '{}' is not one of txt, jsonl, auto", name));
}

TokenizerIdentity identity_of(const Tokenizer& tokenizer) {
  return {static_cast<int64_t>(tokenizer.vocab_size()), tokenizer.hash(), tokenizer.eos_id()};
}

// =========================================================================================
// Inputs

namespace {

bool is_corpus_file(const fs::path& p) {
  const std::string ext = p.extension().string();
  return ext == ".txt" || ext == ".text" || ext == ".jsonl" || ext == ".json";
}

bool is_hidden_below(const fs::path& p, const fs::path& root) {
  const fs::path rel = p.lexically_relative(root);
  return std::any_of(rel.begin(), rel.end(), [](const fs::path& part) {
    const std::string s = part.string();
    return s.size() > 1 && s[0] == '.' && s != "..";
  });
}

void check_readable(const std::string& file) {
  if (!std::ifstream(file, std::ios::binary)) throw UserError(fmt::format("'{}': cannot be read", file));
}

std::vector<std::string> corpus_files_below(const std::string& dir) {
  std::vector<std::string> files;
  std::error_code ec;
  for (fs::recursive_directory_iterator it(dir, ec), end; it != end; it.increment(ec)) {
    if (ec) break;
    if (it->is_regular_file(ec) && is_corpus_file(it->path()) && !is_hidden_below(it->path(), dir)) {
      files.push_back(it->path().string());
    }
  }
  if (ec) throw UserError(fmt::format("'{}': cannot be listed: {}", dir, ec.message()));
  if (files.empty()) throw UserError(fmt::format("'{}': holds no .txt, .text, .jsonl or .json files", dir));
  std::sort(files.begin(), files.end());
  return files;
}

bool is_jsonl(const std::string& file, InputFormat format) {
  if (format != InputFormat::by_extension) return format == InputFormat::jsonl;
  const std::string ext = fs::path(file).extension().string();
  return ext == ".jsonl" || ext == ".json";
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r\f\v") == std::string_view::npos;
}

// -----------------------------------------------------------------------------------------
// Invalid UTF-8 inside JSONL. JSON text must be UTF-8 and nlohmann-json rejects anything else,
// but a corpus line with a few broken bytes should be kept, not dropped. Each invalid byte b
// (always >= 0x80) is carried through the parser as the private-use code point U+10FF00 + b
// and turned back into the byte afterwards.

// Length of the valid UTF-8 sequence starting at p[0], or 0 when it is not one.
size_t valid_utf8_length(const unsigned char* p, size_t n) {
  const unsigned char c = p[0];
  if (c < 0x80) return 1;
  auto cont = [&](size_t i, unsigned char lo = 0x80, unsigned char hi = 0xBF) {
    return i < n && p[i] >= lo && p[i] <= hi;
  };
  if (c >= 0xC2 && c <= 0xDF) return cont(1) ? 2 : 0;
  if (c == 0xE0) return cont(1, 0xA0) && cont(2) ? 3 : 0;
  if ((c >= 0xE1 && c <= 0xEC) || c == 0xEE || c == 0xEF) return cont(1) && cont(2) ? 3 : 0;
  if (c == 0xED) return cont(1, 0x80, 0x9F) && cont(2) ? 3 : 0;
  if (c == 0xF0) return cont(1, 0x90) && cont(2) && cont(3) ? 4 : 0;
  if (c >= 0xF1 && c <= 0xF3) return cont(1) && cont(2) && cont(3) ? 4 : 0;
  if (c == 0xF4) return cont(1, 0x80, 0x8F) && cont(2) && cont(3) ? 4 : 0;
  return 0;
}

constexpr uint32_t kCarrierBase = 0x10FF00;

bool is_carrier(const unsigned char* p, size_t len) {
  return len == 4 && p[0] == 0xF4 && p[1] == 0x8F && (p[2] == 0xBE || p[2] == 0xBF);
}

// Replaces invalid bytes by carrier code points; returns false (line untouched) when valid.
bool carry_invalid_bytes(std::string& line, const std::string& where) {
  const auto* p = reinterpret_cast<const unsigned char*>(line.data());
  const size_t n = line.size();
  bool has_invalid = false, has_carrier = false;
  for (size_t i = 0; i < n;) {
    const size_t len = valid_utf8_length(p + i, n - i);
    has_invalid |= len == 0;
    has_carrier |= is_carrier(p + i, len);
    i += len ? len : 1;
  }
  if (!has_invalid) return false;
  std::string lower = line;
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (has_carrier || lower.find("\\udbff") != std::string::npos) {
    throw UserError(
        fmt::format("{}: holds invalid UTF-8 and also code points U+10FC00..U+10FFFF, which dsx uses to "
                    "carry invalid bytes through the JSON parser; fix the encoding of this line",
                    where));
  }
  std::string out;
  out.reserve(n + n / 2);
  for (size_t i = 0; i < n;) {
    const size_t len = valid_utf8_length(p + i, n - i);
    if (len) {
      out.append(line, i, len);
      i += len;
      continue;
    }
    const uint32_t cp = kCarrierBase + p[i];
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
    ++i;
  }
  line = std::move(out);
  return true;
}

void restore_invalid_bytes(std::string& text) {
  std::string out;
  out.reserve(text.size());
  const auto* p = reinterpret_cast<const unsigned char*>(text.data());
  for (size_t i = 0; i < text.size();) {
    if (i + 4 <= text.size() && is_carrier(p + i, 4)) {
      out += static_cast<char>(((p[i + 2] & 0x03) << 6) | (p[i + 3] & 0x3F));
      i += 4;
    } else {
      out += text[i++];
    }
  }
  text = std::move(out);
}

std::string jsonl_text(std::string& line, const std::string& field, const std::string& where) {
  const bool carried = carry_invalid_bytes(line, where);
  json doc;
  try {
    doc = json::parse(line);
  } catch (const json::parse_error& e) {
    throw UserError(fmt::format("{}: invalid JSON: {}", where, e.what()));
  }
  if (!doc.is_object()) throw UserError(fmt::format("{}: expected a JSON object", where));
  auto it = doc.find(field);
  if (it == doc.end()) throw UserError(fmt::format("{}: field '{}' is missing", where, field));
  if (!it->is_string()) throw UserError(fmt::format("{}: field '{}' must be a string", where, field));
  std::string text = it->get<std::string>();
  if (carried) restore_invalid_bytes(text);
  return text;
}

void for_each_jsonl(const std::string& file, std::istream& in, const std::string& field,
                    const std::function<void(std::string&&)>& emit) {
  std::string line;
  for (int64_t line_no = 1; std::getline(in, line); ++line_no) {
    if (is_blank(line)) continue;
    std::string text = jsonl_text(line, field, fmt::format("{}:{}", file, line_no));
    if (!text.empty()) emit(std::move(text));
  }
}

void for_each_block(std::istream& in, const std::function<void(std::string&&)>& emit) {
  std::string line, block;
  bool open = false;
  while (std::getline(in, line)) {
    if (is_blank(line)) {
      if (open) emit(std::move(block));
      block.clear();
      open = false;
      continue;
    }
    if (open) block += '\n';
    block += line;
    open = true;
  }
  if (open) emit(std::move(block));
}

}  // namespace

std::vector<std::string> expand_inputs(const std::vector<std::string>& inputs) {
  if (inputs.empty()) throw UserError("no inputs given");
  std::vector<std::string> files;
  for (const auto& input : inputs) {
    std::error_code ec;
    const auto status = fs::status(input, ec);
    if (!fs::exists(status)) throw UserError(fmt::format("'{}': no such file or directory", input));
    if (fs::is_directory(status)) {
      for (auto& f : corpus_files_below(input)) files.push_back(std::move(f));
    } else {
      files.push_back(input);
    }
  }
  for (const auto& f : files) check_readable(f);
  return files;
}

void for_each_document(const std::string& file, const DocumentOptions& options,
                       const std::function<void(std::string&&)>& emit) {
  std::ifstream in(file, std::ios::binary);
  if (!in) throw UserError(fmt::format("'{}': cannot be read", file));
  if (is_jsonl(file, options.format)) {
    for_each_jsonl(file, in, options.text_field, emit);
  } else if (options.split_blank_lines) {
    for_each_block(in, emit);
  } else {
    std::ostringstream all;
    all << in.rdbuf();
    std::string text = std::move(all).str();
    if (!text.empty()) emit(std::move(text));
  }
  if (in.bad()) throw UserError(fmt::format("'{}': read error", file));
}

// =========================================================================================
// prep

namespace {

using Clock = std::chrono::steady_clock;

// Progress on stderr: an updating line on a terminal, a line every few seconds otherwise.
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled), tty_(::isatty(STDERR_FILENO) != 0) {}

  void update(const PrepStats& s, bool final = false) {
    if (!enabled_) return;
    const auto now = Clock::now();
    const double since_print = std::chrono::duration<double>(now - last_).count();
    if (!final && since_print < (tty_ ? 0.5 : 5.0)) return;
    last_ = now;
    const double seconds = std::max(1e-9, std::chrono::duration<double>(now - start_).count());
    const double mb = static_cast<double>(s.input_bytes) / 1e6;
    fmt::print(stderr,
               "{}prep: {} files, {} documents, {} tokens, {} shards, {:.1f} MB, {:.2f} MB/s, {:.0f} tokens/s{}",
               tty_ ? "\r" : "", s.files, s.documents, s.tokens, s.shards, mb, mb / seconds,
               static_cast<double>(s.tokens) / seconds, tty_ && !final ? "" : "\n");
    std::fflush(stderr);
  }

 private:
  bool enabled_;
  bool tty_;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_ = Clock::now();
};

}  // namespace

PrepStats prepare_dataset(const Tokenizer& tokenizer, const PrepOptions& options) {
  const auto start = Clock::now();
  if (tokenizer.eos_id() < 0) {
    throw UserError("the tokenizer has no EOS token (e.g. <|end_of_sentence|>); prep appends one to every document");
  }
  const auto eos = static_cast<TokenId>(tokenizer.eos_id());
  const std::vector<std::string> files = expand_inputs(options.inputs);
  DatasetWriter writer(options.output_dir, identity_of(tokenizer), {options.shard_tokens, options.chunk_tokens});
  PrepStats stats;
  Progress progress(options.show_progress);

  const auto write_encoded = [&](std::vector<std::vector<TokenId>> encoded) {
    for (auto& ids : encoded) {
      ids.push_back(eos);
      writer.add_document(ids);
    }
    stats.documents = writer.documents();
    stats.tokens = writer.tokens();
    stats.shards = writer.shards_written();
    progress.update(stats);
  };

  // Double buffering: one batch is encoded on the tokenizer's threads while this thread reads
  // the next one and writes the previous one.
  std::vector<std::string> batch;
  size_t batch_bytes = 0;
  std::vector<std::string> encoding_docs;
  std::future<std::vector<std::vector<TokenId>>> encoding;
  const auto launch_batch = [&] {
    if (encoding.valid()) write_encoded(encoding.get());
    encoding_docs = std::move(batch);
    batch.clear();
    batch_bytes = 0;
    encoding = std::async(std::launch::async, [&] { return tokenizer.encode_batch(encoding_docs, options.threads); });
  };

  for (const auto& file : files) {
    for_each_document(file, options.documents, [&](std::string&& doc) {
      batch_bytes += doc.size();
      stats.input_bytes += static_cast<int64_t>(doc.size());
      batch.push_back(std::move(doc));
      if (batch_bytes >= options.batch_bytes) launch_batch();
    });
    stats.files += 1;
  }
  if (!batch.empty()) launch_batch();
  if (encoding.valid()) write_encoded(encoding.get());
  if (writer.documents() == 0) {
    throw UserError(fmt::format("no documents found in the {} input file(s); nothing written to '{}'", files.size(),
                                options.output_dir));
  }
  const DatasetIndex index = writer.finish();
  stats.shards = static_cast<int64_t>(index.shards.size());
  stats.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  progress.update(stats, true);
  return stats;
}

// =========================================================================================
// inspect

namespace {

// Control bytes shown as \xNN so a sample cannot garble the terminal; text stays readable.
std::string printable(const std::string& text) {
  std::string out;
  for (unsigned char c : text) {
    if (c < 0x20 && c != '\n' && c != '\t')
      out += fmt::format("\\x{:02x}", c);
    else if (c == 0x7F)
      out += "\\x7f";
    else
      out += static_cast<char>(c);
  }
  return out;
}

}  // namespace

std::string describe_dataset(const TokenDataset& dataset, const Tokenizer* tokenizer, int64_t sample_tokens) {
  const DatasetIndex& index = dataset.index();
  if (tokenizer) {
    const TokenizerIdentity id = identity_of(*tokenizer);
    if (id.tokenizer_hash != index.identity.tokenizer_hash) {
      throw UserError(fmt::format("'{}' was tokenized with tokenizer hash {}, but the given tokenizer has hash {}",
                                  dataset.dir(), index.identity.tokenizer_hash, id.tokenizer_hash));
    }
  }
  std::string out;
  out += fmt::format("dataset      {}\n", dataset.dir());
  out += fmt::format("format       {} version {}\n", kDatasetFormat, kDatasetFormatVersion);
  out += fmt::format("documents    {}\n", index.documents);
  out += fmt::format("tokens       {} ({:.1f} per document)\n", index.tokens,
                     static_cast<double>(index.tokens) / static_cast<double>(index.documents));
  out += fmt::format("shards       {}\n", index.shards.size());
  constexpr size_t kListed = 16;
  for (size_t s = 0; s < index.shards.size() && s < kListed; ++s) {
    const auto& e = index.shards[s];
    out += fmt::format("  {}  {} tokens  {} documents\n", e.file, e.tokens, e.documents);
  }
  if (index.shards.size() > kListed) out += fmt::format("  ... {} more\n", index.shards.size() - kListed);
  out += fmt::format("vocab size   {}\n", index.identity.vocab_size);
  out += fmt::format("eos id       {}\n", index.identity.eos_id);
  out += fmt::format("tokenizer    {}\n", index.identity.tokenizer_hash);
  if (tokenizer && sample_tokens > 0) {
    const std::vector<int64_t> offsets = dataset.document_offsets(0);
    const int64_t n = std::min(sample_tokens, offsets[1]);
    std::vector<TokenId> ids(static_cast<size_t>(n));
    dataset.read(0, ids);
    out += fmt::format("sample       first {} of {} tokens of document 0:\n", n, offsets[1]);
    out += printable(tokenizer->decode(ids));
    out += '\n';
  }
  return out;
}

}  // namespace dsx::data
