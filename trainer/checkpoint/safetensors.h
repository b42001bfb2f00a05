// Hugging Face safetensors files (https://github.com/huggingface/safetensors, format section):
//
//   8 bytes        N, the header's length (unsigned, little-endian)
//   N bytes        JSON: {"<tensor>": {"dtype": "BF16", "shape": [r, c], "data_offsets": [b, e]}, ...,
//                         "__metadata__": {"<key>": "<string>", ...}}   (padded with spaces)
//   the rest       every tensor's bytes, row-major, little-endian, at [b, e) from the header's end
//
// dtypes: F64, F32, BF16, F8_E4M3, F8_E5M2, I32, I64 (dsx's DTypes). The writer lays tensors out
// in the order given, without gaps, and pads the header to 8 bytes, as the reference writer does;
// the reader accepts any order but checks that the data regions lie inside the file, do not
// overlap and cover it exactly. Failures are dsx::UserError naming the file (and the tensor).
// Bytes are written and read as the host holds them: dsx builds for little-endian hosts only.
#pragma once
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "kernels/tensor.h"

namespace dsx::safetensors {

struct NamedTensor {
  std::string name;
  Tensor tensor;  // CPU, contiguous
};

// Writes `tensors` into `path` (through `path`.tmp, renamed when complete and flushed).
void write(const std::filesystem::path& path, const std::vector<NamedTensor>& tensors,
           const std::map<std::string, std::string>& metadata = {});

// The bytes a file holding tensors of these sizes takes, header excluded.
int64_t data_bytes(const std::vector<NamedTensor>& tensors);

struct Entry {
  std::string name;
  DType dtype = DType::f32;
  Shape shape;
  int64_t begin = 0, end = 0;  // data offsets from the end of the header
};

class Reader {
 public:
  explicit Reader(const std::filesystem::path& path);             // reads and checks the header
  const std::vector<Entry>& entries() const { return entries_; }  // in file order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const;
  Tensor read(const std::string& name);  // a new CPU tensor

 private:
  std::filesystem::path path_;
  std::ifstream file_;
  int64_t data_start_ = 0;
  std::vector<Entry> entries_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// "BF16" for DType::bf16, ...; and back (throws UserError for a dtype dsx does not have).
std::string dtype_code(DType dtype);
DType dtype_from_code(const std::string& code, const std::string& where);

}  // namespace dsx::safetensors
