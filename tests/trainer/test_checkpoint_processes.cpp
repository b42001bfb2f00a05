// The checkpoint store across processes: a save killed with SIGKILL (while the HDF5 file is being
// written, and after the files but before the manifest) never damages the previous checkpoint,
// and several writer processes synchronised by a pipe barrier produce one checkpoint.
#include <poll.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>
#include <catch2/catch.hpp>

#include <array>
#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "trainer/checkpoint/checkpoint.h"
#include "tests/support/temp_dir.h"

using namespace dsx;
using namespace dsx::ckpt;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

using TempDir = dsx::test::TempDir;

// A pipe whose ends close on destruction.
struct Pipe {
  std::array<int, 2> fd{-1, -1};
  Pipe() { REQUIRE(::pipe(fd.data()) == 0); }
  ~Pipe() {
    for (int f : fd) {
      if (f >= 0) ::close(f);
    }
  }
  Pipe(const Pipe&) = delete;
  Pipe& operator=(const Pipe&) = delete;
  int read_end() const { return fd[0]; }
  int write_end() const { return fd[1]; }
};

void send_byte(int fd, char c) {
  while (::write(fd, &c, 1) != 1) {
    if (errno != EINTR) ::_exit(90);
  }
}

// The next byte from fd, or 0 when nothing arrives within timeout_ms or the writer closed the pipe.
char receive_byte(int fd, int timeout_ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, timeout_ms) != 1) return 0;
  char c = 0;
  return ::read(fd, &c, 1) == 1 ? c : 0;
}

Tensor pattern(const Shape& shape, float base) {
  Tensor t = Tensor::empty(shape, DType::f32);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = base + static_cast<float>(i % 1009) * 0.25f;
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.shape() == b.shape() && a.dtype() == b.dtype() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

// A small complete checkpoint at step 100: what must survive every killed save below.
std::vector<TensorSlice> previous_checkpoint(const fs::path& root) {
  std::vector<TensorSlice> slices = {{"model.embed_tokens.weight", {64, 32}, {}, pattern({64, 32}, 1.0f)},
                                     {"model.norm.weight", {32}, {}, pattern({32}, 2.0f)}};
  save(root, CheckpointState{100, json{{"data_loader", {{"position", 4096}}}}, "train: {}\n"}, slices);
  return slices;
}

void require_previous_is_latest(const fs::path& root, const std::vector<TensorSlice>& previous) {
  const auto newest = latest(root);
  REQUIRE(newest == root / "step-000100");
  CheckpointReader reader(*newest);
  REQUIRE(reader.metadata()["data_loader"]["position"] == 4096);
  for (const TensorSlice& s : previous) REQUIRE(same_bytes(reader.read_whole(s.name), s.data));
}

// The child's exit status after SIGKILL; the child must not have finished on its own.
void kill_and_reap(pid_t child) {
  REQUIRE(::kill(child, SIGKILL) == 0);
  int status = 0;
  REQUIRE(::waitpid(child, &status, 0) == child);
  REQUIRE(WIFSIGNALED(status));
  REQUIRE(WTERMSIG(status) == SIGKILL);
}

uint64_t size_or_zero(const fs::path& file) {
  struct stat st {};
  return ::stat(file.c_str(), &st) == 0 ? static_cast<uint64_t>(st.st_size) : 0;
}

}  // namespace

TEST_CASE("checkpoint: SIGKILL while the data file is being written keeps the previous checkpoint",
          "[checkpoint][kill]") {
  TempDir tmp;
  const fs::path root = tmp.path();
  const auto previous = previous_checkpoint(root);
  // 48 MiB in 12 tensors: long enough to write that the parent catches the file half-written.
  std::vector<TensorSlice> big;
  for (int i = 0; i < 12; ++i) {
    big.push_back({"model.layers." + std::to_string(i) + ".mlp.down_proj.weight",
                   {1024, 1024},
                   {},
                   pattern({1024, 1024}, static_cast<float>(i))});
  }
  Pipe started;
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // Lowest priority, so on a busy machine the parent still gets to watch the file grow.
    ::setpriority(PRIO_PROCESS, 0, 19);
    send_byte(started.write_end(), 'S');
    try {
      save(root, CheckpointState{200, json::object(), ""}, big);
    } catch (...) {
      ::_exit(92);  // never return into the test runner from a child
    }
    ::_exit(0);
  }
  REQUIRE(receive_byte(started.read_end(), 30000) == 'S');
  // Kill once at least 1 MiB of the 48 MiB file exists: the save is in the middle of its HDF5 writes.
  const fs::path partial = root / ("step-000200.tmp-" + std::to_string(child)) / "rank-00000.h5";
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  while (size_or_zero(partial) < (uint64_t{1} << 20) && std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  kill_and_reap(child);
  REQUIRE(size_or_zero(partial) < uint64_t{48} << 20);

  REQUIRE_FALSE(fs::exists(root / "step-000200"));
  require_previous_is_latest(root, previous);
  // The killed attempt shows as temporary, and is removed when asked.
  const auto entries = list_checkpoints(root);
  REQUIRE(entries.size() == 2);
  REQUIRE(entries[1].kind == EntryKind::temporary);
  REQUIRE(latest(root, {.remove_stale = true}) == root / "step-000100");
  REQUIRE(list_checkpoints(root).size() == 1);
  // Saving step 200 again afterwards works and becomes the newest.
  save(root, CheckpointState{200, json::object(), ""}, std::span(big).subspan(0, 1));
  REQUIRE(latest(root) == root / "step-000200");
}

TEST_CASE("checkpoint: SIGKILL after the data files but before the manifest keeps the previous checkpoint",
          "[checkpoint][kill]") {
  TempDir tmp;
  const fs::path root = tmp.path();
  const auto previous = previous_checkpoint(root);
  Pipe at_barrier;
  const pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    // The barrier is the first point after this writer's file is complete: stop there for good.
    const auto stop_at_barrier = [&] {
      send_byte(at_barrier.write_end(), 'B');
      for (;;) ::pause();
    };
    std::vector<TensorSlice> next = {{"model.embed_tokens.weight", {64, 32}, {}, pattern({64, 32}, 9.0f)}};
    try {
      save(root, CheckpointState{200, json::object(), ""}, next, {.barrier = stop_at_barrier});
    } catch (...) {
      ::_exit(92);
    }
    ::_exit(0);
  }
  REQUIRE(receive_byte(at_barrier.read_end(), 30000) == 'B');
  kill_and_reap(child);
  const fs::path attempt = root / ("step-000200.tmp-" + std::to_string(child));
  REQUIRE(fs::exists(attempt / "rank-00000.h5"));
  REQUIRE_FALSE(fs::exists(attempt / kManifestFile));
  require_previous_is_latest(root, previous);
}

TEST_CASE("checkpoint: writer processes synchronised by a barrier write one checkpoint", "[checkpoint]") {
  // Three processes, as three MPI ranks would be, each writing a third of every tensor's rows.
  // The barrier: each writer sends a byte up and waits for the parent's byte back, which the
  // parent sends once all three have arrived.
  constexpr int kWriters = 3;
  TempDir tmp;
  const fs::path root = tmp.path();
  const Tensor whole = pattern({9, 40}, 5.0f);
  std::vector<Pipe> up(kWriters), down(kWriters);
  std::vector<pid_t> children;
  for (int w = 0; w < kWriters; ++w) {
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
      const auto barrier = [&] {
        send_byte(up[w].write_end(), 'A');
        if (receive_byte(down[w].read_end(), 30000) != 'G') ::_exit(91);
      };
      const std::vector<TensorSlice> mine = {
          {"model.layers.0.mlp.up_proj.weight", {9, 40}, {3 * w, 0}, whole.slice(3 * w, 3 * w + 3).clone()}};
      try {
        save(root, CheckpointState{7, json{{"writers", kWriters}}, ""}, mine,
             {.writer_index = w, .n_writers = kWriters, .barrier = barrier, .attempt_id = "job-1"});
      } catch (...) {
        ::_exit(92);
      }
      ::_exit(0);
    }
    children.push_back(child);
  }
  for (int round = 0; round < 2; ++round) {
    for (int w = 0; w < kWriters; ++w) REQUIRE(receive_byte(up[w].read_end(), 30000) == 'A');
    for (int w = 0; w < kWriters; ++w) send_byte(down[w].write_end(), 'G');
  }
  for (pid_t child : children) {
    int status = 0;
    REQUIRE(::waitpid(child, &status, 0) == child);
    REQUIRE(WIFEXITED(status));
    REQUIRE(WEXITSTATUS(status) == 0);
  }
  CheckpointReader reader(root / "step-000007");
  REQUIRE(reader.manifest().files.size() == kWriters);
  REQUIRE(reader.metadata()["writers"] == kWriters);
  REQUIRE(same_bytes(reader.read_whole("model.layers.0.mlp.up_proj.weight"), whole));
}
