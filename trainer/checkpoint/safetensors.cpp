#include "trainer/checkpoint/safetensors.h"

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <utility>

#include "kernels/error.h"

namespace dsx::safetensors {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr std::array<std::pair<DType, const char*>, 7> kCodes = {{{DType::f64, "F64"},
                                                                  {DType::f32, "F32"},
                                                                  {DType::bf16, "BF16"},
                                                                  {DType::fp8_e4m3, "F8_E4M3"},
                                                                  {DType::fp8_e5m2, "F8_E5M2"},
                                                                  {DType::i32, "I32"},
                                                                  {DType::i64, "I64"}}};

// The header's length field and the JSON are what a reader trusts first: bound them.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

void write_u64_le(std::ostream& out, uint64_t v) {
  std::array<char, 8> bytes{};
  for (size_t i = 0; i < 8; ++i) bytes[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out.write(bytes.data(), 8);
}

}  // namespace

std::string dtype_code(DType dtype) {
  for (const auto& [d, code] : kCodes) {
    if (d == dtype) return code;
  }
  throw std::invalid_argument("safetensors: no code for dtype " + std::string(dtype_name(dtype)));
}

DType dtype_from_code(const std::string& code, const std::string& where) {
  for (const auto& [d, c] : kCodes) {
    if (code == c) return d;
  }
  throw UserError(
      fmt::format("{}: dtype \"{}\" is not one dsx reads (F64, F32, BF16, F8_E4M3, F8_E5M2, I32, I64)", where, code));
}

int64_t data_bytes(const std::vector<NamedTensor>& tensors) {
  int64_t n = 0;
  for (const NamedTensor& t : tensors) n += static_cast<int64_t>(t.tensor.nbytes());
  return n;
}

void write(const fs::path& path, const std::vector<NamedTensor>& tensors,
           const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  int64_t offset = 0;
  for (const NamedTensor& t : tensors) {
    if (t.tensor.device() != Device::cpu) {
      throw std::invalid_argument("safetensors::write: " + t.name + " is not on the CPU");
    }
    if (t.name == "__metadata__" || header.contains(t.name)) {
      throw std::invalid_argument("safetensors::write: tensor name " + t.name + " is reserved or repeated");
    }
    const auto bytes = static_cast<int64_t>(t.tensor.nbytes());
    header[t.name] = {{"dtype", dtype_code(t.tensor.dtype())},
                      {"shape", t.tensor.shape()},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned

  const fs::path tmp = fs::path(path.string() + ".tmp");
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw UserError(fmt::format("safetensors: cannot create {}", tmp.string()));
    write_u64_le(out, text.size());
    out.write(text.data(), static_cast<std::streamsize>(text.size()));
    for (const NamedTensor& t : tensors) {
      out.write(static_cast<const char*>(t.tensor.raw()), static_cast<std::streamsize>(t.tensor.nbytes()));
    }
    out.flush();
    if (!out) throw UserError(fmt::format("safetensors: writing {} failed (disk full?)", tmp.string()));
  }
  fs::rename(tmp, path);
}

Reader::Reader(const fs::path& path) : path_(path), file_(path, std::ios::binary) {
  const std::string where = path.string();
  if (!file_) throw UserError(fmt::format("safetensors: cannot open {}", where));
  const auto file_bytes = static_cast<int64_t>(fs::file_size(path));
  std::array<unsigned char, 8> length_bytes{};
  if (!file_.read(reinterpret_cast<char*>(length_bytes.data()), 8)) {
    throw UserError(fmt::format("{}: shorter than the 8-byte header length: not a safetensors file", where));
  }
  uint64_t header_bytes = 0;
  for (size_t i = 0; i < 8; ++i) header_bytes |= static_cast<uint64_t>(length_bytes[i]) << (8 * i);
  if (header_bytes > kMaxHeaderBytes || static_cast<int64_t>(8 + header_bytes) > file_bytes) {
    throw UserError(fmt::format("{}: header length {} does not fit the file's {} bytes: not a safetensors file", where,
                                header_bytes, file_bytes));
  }
  std::string text(header_bytes, '\0');
  file_.read(text.data(), static_cast<std::streamsize>(header_bytes));
  data_start_ = static_cast<int64_t>(8 + header_bytes);
  json header;
  try {
    header = json::parse(text);
  } catch (const json::parse_error& e) {
    throw UserError(fmt::format("{}: the header is not JSON ({})", where, e.what()));
  }
  if (!header.is_object()) throw UserError(fmt::format("{}: the header is not a JSON object", where));
  try {
    for (const auto& [name, value] : header.items()) {
      if (name == "__metadata__") {
        for (const auto& [k, v] : value.items()) metadata_[k] = v.get<std::string>();
        continue;
      }
      const std::string at = where + ": tensor " + name;
      Entry e;
      e.name = name;
      e.dtype = dtype_from_code(value.at("dtype").get<std::string>(), at);
      e.shape = value.at("shape").get<Shape>();
      const auto offsets = value.at("data_offsets").get<std::vector<int64_t>>();
      if (offsets.size() != 2) throw UserError(at + ": data_offsets must be [begin, end]");
      e.begin = offsets[0];
      e.end = offsets[1];
      const int64_t want = shape_numel(e.shape) * static_cast<int64_t>(dtype_size(e.dtype));
      if (e.begin < 0 || e.end - e.begin != want || data_start_ + e.end > file_bytes) {
        throw UserError(fmt::format("{}: data_offsets [{}, {}] do not hold {} bytes inside the file's data ({})", at,
                                    e.begin, e.end, want, file_bytes - data_start_));
      }
      index_[name] = entries_.size();
      entries_.push_back(std::move(e));
    }
  } catch (const json::exception& e) {
    throw UserError(fmt::format("{}: malformed header ({})", where, e.what()));
  }
  std::sort(entries_.begin(), entries_.end(), [](const Entry& a, const Entry& b) { return a.begin < b.begin; });
  int64_t next = 0;
  for (size_t i = 0; i < entries_.size(); ++i) {
    index_[entries_[i].name] = i;
    if (entries_[i].begin != next) {
      throw UserError(fmt::format("{}: tensor {} starts at byte {} of the data, expected {} (overlap or gap)", where,
                                  entries_[i].name, entries_[i].begin, next));
    }
    next = entries_[i].end;
  }
  if (data_start_ + next != file_bytes) {
    throw UserError(
        fmt::format("{}: the tensors hold {} bytes, the file's data is {}", where, next, file_bytes - data_start_));
  }
}

bool Reader::contains(const std::string& name) const {
  return index_.count(name) > 0;
}

Tensor Reader::read(const std::string& name) {
  const auto it = index_.find(name);
  if (it == index_.end()) throw UserError(fmt::format("{}: no tensor {}", path_.string(), name));
  const Entry& e = entries_[it->second];
  Tensor out = Tensor::empty(e.shape, e.dtype);
  file_.clear();
  file_.seekg(data_start_ + e.begin);
  if (!file_.read(static_cast<char*>(out.raw()), e.end - e.begin)) {
    throw UserError(fmt::format("{}: cannot read tensor {}", path_.string(), name));
  }
  return out;
}

}  // namespace dsx::safetensors
