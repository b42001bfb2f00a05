#include "trainer/grpo/rewards.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstring>
#include <nlohmann/json.hpp>
#include <thread>
#include <utility>

#include "kernels/error.h"

extern char** environ;

namespace dsx::grpo {

namespace {

constexpr std::string_view kThinkOpen = "<think>";
constexpr std::string_view kThinkClose = "</think>";
constexpr std::string_view kAnswerOpen = "<answer>";
constexpr std::string_view kAnswerClose = "</answer>";

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v';
}

std::string_view trim(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

size_t count_occurrences(std::string_view text, std::string_view needle) {
  size_t n = 0;
  for (size_t pos = text.find(needle); pos != std::string_view::npos; pos = text.find(needle, pos + needle.size())) ++n;
  return n;
}

bool contains_any_tag(std::string_view text) {
  for (std::string_view tag : {kThinkOpen, kThinkClose, kAnswerOpen, kAnswerClose}) {
    if (text.find(tag) != std::string_view::npos) return true;
  }
  return false;
}

// Strips one layer of $...$ and of \boxed{...} (in that order), trimming around each.
std::string_view unwrap_answer(std::string_view s) {
  s = trim(s);
  if (s.size() >= 2 && s.front() == '$' && s.back() == '$') s = trim(s.substr(1, s.size() - 2));
  constexpr std::string_view kBoxed = "\\boxed{";
  if (s.starts_with(kBoxed) && s.ends_with('}')) s = trim(s.substr(kBoxed.size(), s.size() - kBoxed.size() - 1));
  return s;
}

// Plain decimal syntax only: [+-]digits[.digits][(e|E)[+-]digits], at least one digit in the
// mantissa. from_chars alone would also take "inf", "nan" and hex forms.
bool is_decimal_number(std::string_view s, bool* is_integer) {
  size_t i = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  size_t digits = 0;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++digits;
  *is_integer = true;
  if (i < s.size() && s[i] == '.') {
    *is_integer = false;
    ++i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++digits;
  }
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    *is_integer = false;
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    size_t exp_digits = 0;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++exp_digits;
    if (exp_digits == 0) return false;
  }
  return i == s.size();
}

std::optional<double> parse_decimal(std::string_view s) {
  if (!s.empty() && s.front() == '+') s.remove_prefix(1);
  double value = 0;
  const auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), value);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(value)) return std::nullopt;
  return value;
}

// Integer text without sign and leading zeros, with "-" kept for nonzero negatives.
std::string canonical_integer(std::string_view s) {
  bool negative = false;
  if (!s.empty() && (s.front() == '+' || s.front() == '-')) {
    negative = s.front() == '-';
    s.remove_prefix(1);
  }
  while (s.size() > 1 && s.front() == '0') s.remove_prefix(1);
  if (s == "0") negative = false;
  std::string out(negative ? 1 : 0, '-');
  out.append(s);
  return out;
}

}  // namespace

std::optional<std::string> extract_answer(std::string_view completion) {
  if (count_occurrences(completion, kAnswerOpen) != 1 || count_occurrences(completion, kAnswerClose) != 1) {
    return std::nullopt;
  }
  const size_t open = completion.find(kAnswerOpen);
  const size_t close = completion.find(kAnswerClose);
  if (close < open) return std::nullopt;
  const size_t begin = open + kAnswerOpen.size();
  return std::string(completion.substr(begin, close - begin));
}

std::optional<double> parse_numeric_answer(std::string_view text) {
  const std::string_view s = unwrap_answer(text);
  bool is_integer = false;
  if (!is_decimal_number(s, &is_integer)) return std::nullopt;
  return parse_decimal(s);
}

bool answers_match(std::string_view given, std::string_view expected) {
  const std::string_view g = unwrap_answer(given);
  const std::string_view e = unwrap_answer(expected);
  bool g_int = false, e_int = false;
  if (is_decimal_number(g, &g_int) && is_decimal_number(e, &e_int)) {
    if (g_int && e_int) return canonical_integer(g) == canonical_integer(e);
    const auto gv = parse_decimal(g);
    const auto ev = parse_decimal(e);
    if (!gv || !ev) return false;
    // 1e-9 relative: a value printed with ~10 significant digits still matches, while any
    // genuinely different short answer (e.g. 0.33 vs 1/3) does not.
    return std::abs(*gv - *ev) <= 1e-9 * std::max(1.0, std::abs(*ev));
  }
  return g == e;
}

bool follows_think_answer_format(std::string_view completion) {
  std::string_view rest = trim(completion);
  if (!rest.starts_with(kThinkOpen)) return false;
  rest.remove_prefix(kThinkOpen.size());
  const size_t think_end = rest.find(kThinkClose);
  if (think_end == std::string_view::npos || contains_any_tag(rest.substr(0, think_end))) return false;
  rest = trim(rest.substr(think_end + kThinkClose.size()));
  if (rest.size() < kAnswerOpen.size() + kAnswerClose.size()) return false;
  if (!rest.starts_with(kAnswerOpen) || !rest.ends_with(kAnswerClose)) return false;
  return !contains_any_tag(rest.substr(kAnswerOpen.size(), rest.size() - kAnswerOpen.size() - kAnswerClose.size()));
}

double overlong_penalty(int64_t completion_tokens, int64_t max_len, int64_t cache) {
  const int64_t safe = max_len - cache;
  if (completion_tokens <= safe) return 0.0;
  if (completion_tokens >= max_len) return -1.0;
  return static_cast<double>(safe - completion_tokens) / static_cast<double>(cache);
}

std::vector<double> AnswerMatchReward::score(std::span<const RewardSample> batch) const {
  std::vector<double> out;
  out.reserve(batch.size());
  for (const RewardSample& s : batch) {
    const auto given = extract_answer(s.completion);
    out.push_back(given && answers_match(*given, s.answer) ? 1.0 : 0.0);
  }
  return out;
}

std::vector<double> FormatReward::score(std::span<const RewardSample> batch) const {
  std::vector<double> out;
  out.reserve(batch.size());
  for (const RewardSample& s : batch) out.push_back(follows_think_answer_format(s.completion) ? 1.0 : 0.0);
  return out;
}

OverlongPenaltyReward::OverlongPenaltyReward(int64_t max_len, int64_t cache) : max_len_(max_len), cache_(cache) {
  if (max_len <= 0 || cache < 0 || cache > max_len) {
    throw UserError(fmt::format("overlong penalty: need 0 <= cache <= max_len and max_len > 0, got max_len={} cache={}",
                                max_len, cache));
  }
}

std::vector<double> OverlongPenaltyReward::score(std::span<const RewardSample> batch) const {
  std::vector<double> out;
  out.reserve(batch.size());
  for (const RewardSample& s : batch) out.push_back(overlong_penalty(s.completion_tokens, max_len_, cache_));
  return out;
}

// ------------------------------- external reward programs -------------------------------

namespace {

// Closes a file descriptor when it goes out of scope.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  Fd(Fd&& o) noexcept : fd_(std::exchange(o.fd_, -1)) {}
  Fd& operator=(Fd&& o) noexcept {
    reset();
    fd_ = std::exchange(o.fd_, -1);
    return *this;
  }
  ~Fd() { reset(); }
  int get() const { return fd_; }
  void reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// posix_spawn attributes and file actions, destroyed on scope exit.
struct SpawnSetup {
  posix_spawnattr_t attr;
  posix_spawn_file_actions_t actions;
  SpawnSetup() {
    posix_spawnattr_init(&attr);
    posix_spawn_file_actions_init(&actions);
  }
  ~SpawnSetup() {
    posix_spawn_file_actions_destroy(&actions);
    posix_spawnattr_destroy(&attr);
  }
  SpawnSetup(const SpawnSetup&) = delete;
  SpawnSetup& operator=(const SpawnSetup&) = delete;
};

// A spawned child in its own process group. If it is still unreaped when this goes out of
// scope (an exception on the way), the group is killed and the child reaped, so no error path
// leaves a zombie or a running orphan behind.
class ChildGroup {
 public:
  explicit ChildGroup(pid_t pid) : pid_(pid) {}
  ChildGroup(const ChildGroup&) = delete;
  ChildGroup& operator=(const ChildGroup&) = delete;
  ~ChildGroup() {
    if (pid_ > 0) {
      kill_group();
      wait();
    }
  }
  void kill_group() const { ::kill(-pid_, SIGKILL); }
  // Waits for the child to exit without reaping it (so its pid, and with it the process group
  // id, cannot be reused yet); false if the deadline passes first.
  bool exited_by(std::chrono::steady_clock::time_point deadline) const {
    for (;;) {
      siginfo_t info{};
      if (::waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOHANG | WNOWAIT) == 0 && info.si_pid == pid_) {
        return true;
      }
      if (std::chrono::steady_clock::now() >= deadline) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }
  int wait() {
    int status = 0;
    while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
    }
    pid_ = -1;
    return status;
  }

 private:
  pid_t pid_;
};

struct ProgramOutput {
  std::string out;
  std::string err;
  int status = 0;
  bool timed_out = false;
};

void set_nonblocking(int fd) {
  ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
}

// Reads what is available; false at end of file.
bool drain(int fd, std::string& into) {
  char buf[65536];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n > 0) {
      into.append(buf, static_cast<size_t>(n));
      continue;
    }
    if (n == 0) return false;
    return errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR;
  }
}

// Runs argv with `input` on stdin, collecting stdout and stderr until both close or the
// deadline passes. stdin is a socket so that writing to a program that has exited gives
// EPIPE through MSG_NOSIGNAL instead of a SIGPIPE that would kill the trainer.
ProgramOutput run_program(const std::vector<std::string>& argv, const std::string& input, double timeout_s,
                          const std::string& who) {
  int in_pair[2], out_pipe[2], err_pipe[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in_pair) != 0) {
    throw std::runtime_error(fmt::format("{}: socketpair failed: {}", who, std::strerror(errno)));
  }
  Fd in_parent(in_pair[0]), in_child(in_pair[1]);
  if (::pipe2(out_pipe, O_CLOEXEC) != 0) throw std::runtime_error(fmt::format("{}: pipe failed", who));
  Fd out_parent(out_pipe[0]), out_child(out_pipe[1]);
  if (::pipe2(err_pipe, O_CLOEXEC) != 0) throw std::runtime_error(fmt::format("{}: pipe failed", who));
  Fd err_parent(err_pipe[0]), err_child(err_pipe[1]);

  SpawnSetup setup;
  posix_spawn_file_actions_adddup2(&setup.actions, in_child.get(), STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&setup.actions, out_child.get(), STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&setup.actions, err_child.get(), STDERR_FILENO);
  // Own process group (so a timeout kills helpers it started too), default signal handling
  // and an empty signal mask whatever the trainer has set.
  sigset_t empty, defaults;
  sigemptyset(&empty);
  sigemptyset(&defaults);
  sigaddset(&defaults, SIGPIPE);
  sigaddset(&defaults, SIGINT);
  sigaddset(&defaults, SIGTERM);
  posix_spawnattr_setpgroup(&setup.attr, 0);
  posix_spawnattr_setsigmask(&setup.attr, &empty);
  posix_spawnattr_setsigdefault(&setup.attr, &defaults);
  posix_spawnattr_setflags(&setup.attr, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);

  std::vector<char*> cargv;
  for (const std::string& a : argv) cargv.push_back(const_cast<char*>(a.c_str()));
  cargv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawnp(&pid, cargv[0], &setup.actions, &setup.attr, cargv.data(), environ);
  if (rc != 0) throw UserError(fmt::format("{}: cannot start: {}", who, std::strerror(rc)));
  ChildGroup child(pid);
  in_child.reset();
  out_child.reset();
  err_child.reset();
  set_nonblocking(in_parent.get());
  set_nonblocking(out_parent.get());
  set_nonblocking(err_parent.get());

  ProgramOutput result;
  size_t written = 0;
  if (input.empty()) in_parent.reset();
  const auto deadline =
      std::chrono::steady_clock::now() +
      std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(timeout_s));
  bool out_open = true, err_open = true;
  while (out_open || err_open) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      result.timed_out = true;
      break;
    }
    pollfd fds[3] = {{out_open ? out_parent.get() : -1, POLLIN, 0},
                     {err_open ? err_parent.get() : -1, POLLIN, 0},
                     {in_parent.get(), POLLOUT, 0}};
    const int ready = ::poll(fds, 3, static_cast<int>(std::min<int64_t>(left.count() + 1, 1000)));
    if (ready < 0 && errno != EINTR) throw std::runtime_error(fmt::format("{}: poll failed", who));
    if (ready <= 0) continue;
    if (fds[0].revents) out_open = drain(out_parent.get(), result.out);
    if (fds[1].revents) err_open = drain(err_parent.get(), result.err);
    if (fds[2].revents) {
      const ssize_t n = ::send(in_parent.get(), input.data() + written, input.size() - written, MSG_NOSIGNAL);
      if (n > 0) written += static_cast<size_t>(n);
      // EPIPE: the program stopped reading (or exited); what it printed still decides.
      const bool failed = n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR;
      if (written == input.size() || failed) in_parent.reset();
    }
  }
  if (!result.timed_out && !child.exited_by(deadline)) result.timed_out = true;
  // Also on a clean exit: helpers the program left behind in its group must not outlive the
  // batch. The unreaped leader keeps the group id reserved, so this cannot hit another group.
  child.kill_group();
  result.status = child.wait();
  return result;
}

std::string tail(const std::string& text, size_t max_chars) {
  const std::string_view t = trim(text);
  if (t.size() <= max_chars) return std::string(t);
  return "..." + std::string(t.substr(t.size() - max_chars));
}

std::string sample_line(const RewardSample& s) {
  nlohmann::json line = nlohmann::json::object();
  const nlohmann::json extra = nlohmann::json::parse(s.extra_json.empty() ? "{}" : s.extra_json, nullptr, false);
  if (extra.is_object()) line = extra;
  line["prompt"] = s.prompt;
  line["completion"] = s.completion;
  line["answer"] = s.answer;
  // Invalid UTF-8 in a sampled completion must not abort the batch: replace it.
  return line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace

ExternalReward::ExternalReward(std::string name, std::vector<std::string> argv, double timeout_seconds)
    : name_(std::move(name)), argv_(std::move(argv)), timeout_seconds_(timeout_seconds) {
  if (argv_.empty() || argv_[0].empty()) throw UserError(fmt::format("reward program '{}': empty command", name_));
  if (!(timeout_seconds_ > 0)) {
    throw UserError(fmt::format("{}: timeout must be > 0 seconds, got {}", describe(), timeout_seconds_));
  }
}

std::string ExternalReward::describe() const {
  std::string cmd;
  for (const std::string& a : argv_) cmd += (cmd.empty() ? "" : " ") + a;
  return fmt::format("reward program '{}' ({})", name_, cmd);
}

std::vector<double> ExternalReward::score(std::span<const RewardSample> batch) const {
  if (batch.empty()) return {};
  std::string input;
  for (const RewardSample& s : batch) input += sample_line(s) + "\n";
  const std::string who = describe();
  const ProgramOutput run = run_program(argv_, input, timeout_seconds_, who);
  if (run.timed_out) throw UserError(fmt::format("{}: timed out after {} s and was killed", who, timeout_seconds_));
  if (WIFSIGNALED(run.status)) {
    throw UserError(fmt::format("{}: killed by signal {}; stderr: {}", who, WTERMSIG(run.status), tail(run.err, 500)));
  }
  if (WEXITSTATUS(run.status) != 0) {
    throw UserError(
        fmt::format("{}: exited with status {}; stderr: {}", who, WEXITSTATUS(run.status), tail(run.err, 500)));
  }
  std::vector<std::string_view> lines;
  std::string_view out = run.out;
  while (!out.empty()) {
    const size_t nl = out.find('\n');
    lines.push_back(out.substr(0, nl));
    out = nl == std::string_view::npos ? std::string_view() : out.substr(nl + 1);
  }
  if (lines.size() != batch.size()) {
    throw UserError(fmt::format("{}: printed {} lines for {} samples (one number per line expected)", who, lines.size(),
                                batch.size()));
  }
  std::vector<double> scores;
  scores.reserve(lines.size());
  for (size_t i = 0; i < lines.size(); ++i) {
    const std::string_view text = trim(lines[i]);
    bool is_integer = false;
    const auto value = is_decimal_number(text, &is_integer) ? parse_decimal(text) : std::nullopt;
    if (!value)
      throw UserError(fmt::format("{}: line {} is not a finite number: '{}'", who, i + 1, tail(std::string(text), 80)));
    scores.push_back(*value);
  }
  return scores;
}

// ------------------------------------ combination ------------------------------------

MeanStd mean_std(std::span<const double> values) {
  MeanStd r;
  if (values.empty()) return r;
  for (double v : values) r.mean += v;
  r.mean /= static_cast<double>(values.size());
  double ss = 0;
  for (double v : values) ss += (v - r.mean) * (v - r.mean);
  r.std = std::sqrt(ss / static_cast<double>(values.size()));
  return r;
}

void CombinedReward::add(std::unique_ptr<Reward> reward, double weight) {
  if (!std::isfinite(weight)) throw UserError(fmt::format("reward '{}': weight must be finite", reward->name()));
  rewards_.push_back(std::move(reward));
  weights_.push_back(weight);
}

RewardScores CombinedReward::score(std::span<const RewardSample> batch) const {
  RewardScores out;
  out.total.assign(batch.size(), 0.0);
  for (size_t k = 0; k < rewards_.size(); ++k) {
    std::vector<double> values = rewards_[k]->score(batch);
    if (values.size() != batch.size()) {
      throw UserError(fmt::format("reward '{}' returned {} scores for {} samples", rewards_[k]->name(), values.size(),
                                  batch.size()));
    }
    for (size_t i = 0; i < values.size(); ++i) out.total[i] += weights_[k] * values[i];
    out.names.push_back(rewards_[k]->name());
    out.weights.push_back(weights_[k]);
    out.per_reward.push_back(std::move(values));
  }
  return out;
}

}  // namespace dsx::grpo
