#include "trainer/checkpoint/fs_util.h"

#include <fcntl.h>
#include <fmt/core.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace dsx::ckpt::detail {
namespace {

[[noreturn]] void throw_errno(std::string_view what, const std::filesystem::path& path) {
  throw std::runtime_error(fmt::format("{} {}: {}", what, path.string(), std::strerror(errno)));
}

// An owned POSIX file descriptor.
class Fd {
 public:
  Fd(const std::filesystem::path& path, int flags, mode_t mode = 0644) : fd_(::open(path.c_str(), flags, mode)) {
    if (fd_ < 0) throw_errno("cannot open", path);
  }
  ~Fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }

 private:
  int fd_;
};

}  // namespace

void fsync_path(const std::filesystem::path& path) {
  Fd fd(path, O_RDONLY | O_CLOEXEC);
  if (::fsync(fd.get()) != 0) throw_errno("cannot fsync", path);
}

void write_file_synced(const std::filesystem::path& path, std::string_view text) {
  Fd fd(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd.get(), text.data() + done, text.size() - done);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot write", path);
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd.get()) != 0) throw_errno("cannot fsync", path);
}

std::string read_file(const std::filesystem::path& path) {
  Fd fd(path, O_RDONLY | O_CLOEXEC);
  std::string text;
  char buffer[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd.get(), buffer, sizeof buffer);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot read", path);
    }
    if (n == 0) break;
    text.append(buffer, static_cast<size_t>(n));
  }
  return text;
}

FileDigest digest_file(const std::filesystem::path& path) {
  Fd fd(path, O_RDONLY | O_CLOEXEC);
  // 4 MiB blocks: large enough that syscalls cost nothing next to the CRC, small enough to stay in L2/L3.
  std::vector<unsigned char> block(size_t{4} << 20);
  FileDigest digest;
  uLong crc = crc32_z(0L, Z_NULL, 0);
  for (;;) {
    const ssize_t n = ::read(fd.get(), block.data(), block.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      throw_errno("cannot read", path);
    }
    if (n == 0) break;
    crc = crc32_z(crc, block.data(), static_cast<size_t>(n));
    digest.bytes += static_cast<uint64_t>(n);
  }
  digest.crc32 = static_cast<uint32_t>(crc);
  return digest;
}

std::string crc_to_string(uint32_t crc) {
  return fmt::format("0x{:08x}", crc);
}

uint32_t crc_from_string(std::string_view text) {
  const bool well_formed = text.size() == 10 && text.substr(0, 2) == "0x" &&
                           text.substr(2).find_first_not_of("0123456789abcdef") == std::string_view::npos;
  if (!well_formed) throw std::invalid_argument(fmt::format("'{}' is not a CRC-32 written as 0x + 8 hex digits", text));
  return static_cast<uint32_t>(std::stoul(std::string(text.substr(2)), nullptr, 16));
}

}  // namespace dsx::ckpt::detail
