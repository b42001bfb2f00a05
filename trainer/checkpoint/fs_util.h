// File-system helpers for the checkpoint store: durable writes (fsync of files and directories)
// and whole-file CRC-32. Internal to trainer/checkpoint.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

namespace dsx::ckpt::detail {

// fsync a file or a directory (so a rename or a new entry in it survives a power cut).
// Throws std::runtime_error naming the path on failure.
void fsync_path(const std::filesystem::path& path);

// Writes text to path (truncating) and fsyncs it.
void write_file_synced(const std::filesystem::path& path, std::string_view text);

// The whole file as a string; throws std::runtime_error if it cannot be read.
std::string read_file(const std::filesystem::path& path);

struct FileDigest {
  uint64_t bytes = 0;
  uint32_t crc32 = 0;
};
// Size and zlib CRC-32 of the whole file, read sequentially in large blocks.
FileDigest digest_file(const std::filesystem::path& path);

// "0x1a2b3c4d" and back; parse throws std::invalid_argument on anything else.
std::string crc_to_string(uint32_t crc);
uint32_t crc_from_string(std::string_view text);

}  // namespace dsx::ckpt::detail
