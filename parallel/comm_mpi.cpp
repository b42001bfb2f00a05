// MPI backend of Communicator. See parallel/comm.h and parallel/comm_mpi.h.
//
// Failure handling: the group communicators use MPI_ERRORS_RETURN so an MPI error becomes
// one dsx message naming the operation and group before the job is aborted. A wait() that
// outlives the timeout asks the other ranks of the operation, over a side-channel
// communicator, what they are waiting on (every rank inside wait() answers such questions),
// so the message can name the ranks that never arrived: those that did not answer (dead,
// hung, or computing) and those waiting on a different operation.
#include "parallel/comm_mpi.h"

#include <mpi.h>
#include <sched.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <list>
#include <optional>
#include <sstream>
#include <thread>

#include "kernels/error.h"

namespace dsx {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

bool mpi_finalized() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  return finalized != 0;
}

int world_rank() {
  int r = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s + "]";
}

std::string format_seconds(double s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

// Prints the message as one write (ranks' lines do not interleave) and ends the whole job.
[[noreturn]] void abort_job(const std::string& message) {
  const std::string line = message + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, kCommAbortExitCode);
  std::_Exit(kCommAbortExitCode);
}

std::string mpi_error_string(int rc) {
  std::array<char, MPI_MAX_ERROR_STRING> buf{};
  int len = 0;
  MPI_Error_string(rc, buf.data(), &len);
  return std::string(buf.data(), static_cast<size_t>(len));
}

// ---- side channel: "what are you waiting on?" ----

constexpr int kQueryTag = 7001;
constexpr int kReplyTag = 7002;
constexpr int kReplyChars = 200;
using ReplyText = std::array<char, kReplyChars>;

class SideChannel {
 public:
  static SideChannel& get() {
    static SideChannel channel;
    return channel;
  }

  void open() {  // collective over the world the first time
    if (comm_ != MPI_COMM_NULL) return;
    MPI_Comm_dup(MPI_COMM_WORLD, &comm_);
  }

  void close() {
    if (comm_ == MPI_COMM_NULL) return;
    for (auto& out : outgoing_) MPI_Request_free(&out.request);
    outgoing_.clear();
    MPI_Comm_free(&comm_);
  }

  void set_waiting(const std::string& what) {
    waiting_on_ = what;
    since_ = Clock::now();
  }
  void clear_waiting() { waiting_on_.clear(); }

  // Answers every pending question with what this rank is waiting on.
  void service() {
    if (comm_ == MPI_COMM_NULL) return;
    for (;;) {
      int flag = 0;
      MPI_Status status;
      MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, comm_, &flag, &status);
      if (!flag) break;
      int question = 0;
      MPI_Recv(&question, 1, MPI_INT, status.MPI_SOURCE, kQueryTag, comm_, MPI_STATUS_IGNORE);
      Outgoing& out = outgoing_.emplace_back();
      const std::string text =
          waiting_on_.empty() ? std::string("not waiting on communication")
                              : "waiting on " + waiting_on_ + " for " + format_seconds(seconds_since(since_)) + " s";
      std::snprintf(out.text.data(), out.text.size(), "%s", text.c_str());
      MPI_Isend(out.text.data(), kReplyChars, MPI_CHAR, status.MPI_SOURCE, kReplyTag, comm_, &out.request);
    }
    outgoing_.remove_if([](Outgoing& out) {
      int done = 0;
      MPI_Test(&out.request, &done, MPI_STATUS_IGNORE);
      return done != 0;
    });
  }

  // Asks each world rank in `peers` what it waits on; nullopt for those silent for grace_s.
  std::vector<std::optional<std::string>> ask(const std::vector<int>& peers, double grace_s) {
    std::vector<std::optional<std::string>> answers(peers.size());
    if (comm_ == MPI_COMM_NULL) return answers;
    const int question = 1;
    std::vector<ReplyText> replies(peers.size());
    std::vector<MPI_Request> sends(peers.size()), recvs(peers.size());
    for (size_t i = 0; i < peers.size(); ++i) {
      MPI_Isend(&question, 1, MPI_INT, peers[i], kQueryTag, comm_, &sends[i]);
      MPI_Irecv(replies[i].data(), kReplyChars, MPI_CHAR, peers[i], kReplyTag, comm_, &recvs[i]);
    }
    const auto start = Clock::now();
    size_t pending = peers.size();
    while (pending > 0 && seconds_since(start) < grace_s) {
      for (size_t i = 0; i < peers.size(); ++i) {
        if (answers[i] || recvs[i] == MPI_REQUEST_NULL) continue;
        int done = 0;
        MPI_Test(&recvs[i], &done, MPI_STATUS_IGNORE);
        if (done) {
          replies[i].back() = '\0';
          answers[i] = std::string(replies[i].data());
          --pending;
        }
      }
      service();
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    // The job is aborted next; requests still open are left to MPI_Abort.
    return answers;
  }

 private:
  struct Outgoing {
    ReplyText text{};
    MPI_Request request = MPI_REQUEST_NULL;
  };
  MPI_Comm comm_ = MPI_COMM_NULL;
  std::string waiting_on_;
  Clock::time_point since_;
  std::list<Outgoing> outgoing_;
};

// ---- groups and operations ----

struct GroupState {
  std::string name;
  std::vector<int> world_ranks;  // group rank -> world rank
  int rank = 0;
  double timeout_s = 600;
  MPI_Comm comm = MPI_COMM_NULL;
  MPI_Comm blocks_comm = MPI_COMM_NULL;  // all_to_all_blocks' messages only: they match any tag
  uint64_t collectives = 0;              // sequence numbers in messages; equal across ranks for collectives
  uint64_t p2p = 0;

  GroupState() = default;
  GroupState(const GroupState&) = delete;
  GroupState& operator=(const GroupState&) = delete;
  ~GroupState() {
    if (mpi_finalized()) return;
    if (blocks_comm != MPI_COMM_NULL) MPI_Comm_free(&blocks_comm);
    if (comm != MPI_COMM_NULL) MPI_Comm_free(&comm);
  }
};

MPI_Datatype mpi_type(DType d) {
  switch (d) {
    case DType::f32:
      return MPI_FLOAT;
    case DType::f64:
      return MPI_DOUBLE;
    case DType::bf16:
      return MPI_UINT16_T;  // moved as bits; sums go through f32
    case DType::fp8_e4m3:
    case DType::fp8_e5m2:
      return MPI_UINT8_T;  // moved as bits; never summed
    case DType::i32:
      return MPI_INT32_T;
    case DType::i64:
      return MPI_INT64_T;
    default:
      break;
  }
  throw std::invalid_argument("comm: dtype " + std::string(dtype_name(d)) + " cannot be communicated");
}

int to_count(int64_t n, std::string_view op) {
  check(n >= 0 && n <= INT_MAX, "comm " + std::string(op),
        [&] { return "count " + std::to_string(n) + " does not fit an MPI int count; split the tensor"; });
  return static_cast<int>(n);
}

// One datatype per peer for MPI_Ialltoallw, owning (and freeing) those it built; a peer with no
// rows gets MPI_BYTE with count 0.
class PeerDatatypes {
 public:
  PeerDatatypes() = default;
  PeerDatatypes(const PeerDatatypes&) = delete;
  PeerDatatypes& operator=(const PeerDatatypes&) = delete;
  ~PeerDatatypes() { free(); }

  std::vector<MPI_Datatype> types;  // [peers], read by MPI until the operation completes
  std::vector<int> counts;          // [peers]: 1, or 0 for a peer with no rows
  std::vector<int> displs;          // [peers]: 0 (the datatypes carry byte displacements)

  // Appends the datatype of `blocks` of rows of `row_type` (`row_bytes` each) in a buffer.
  void add_peer(std::span<const RowBlock> blocks, MPI_Datatype row_type, int64_t row_bytes) {
    lengths_.clear();
    offsets_.clear();
    for (const RowBlock& block : blocks) {
      if (block.rows == 0) continue;
      lengths_.push_back(to_count(block.rows, "all_to_all_blocks"));
      offsets_.push_back(static_cast<MPI_Aint>(block.offset * row_bytes));
    }
    displs.push_back(0);
    if (lengths_.empty()) {
      types.push_back(MPI_BYTE);
      counts.push_back(0);
      return;
    }
    MPI_Datatype t = MPI_DATATYPE_NULL;
    MPI_Type_create_hindexed(to_count(static_cast<int64_t>(lengths_.size()), "all_to_all_blocks"), lengths_.data(),
                             offsets_.data(), row_type, &t);
    owned_.push_back(t);  // owned before the commit, so it is freed whatever follows
    MPI_Type_commit(&t);
    types.push_back(t);
    counts.push_back(1);
  }

  void free() {
    if (!mpi_finalized()) {
      for (MPI_Datatype& t : owned_) MPI_Type_free(&t);
    }
    owned_.clear();
  }

 private:
  std::vector<MPI_Datatype> owned_;
  std::vector<int> lengths_;  // scratch for add_peer
  std::vector<MPI_Aint> offsets_;
};

// all_to_all_blocks with BlockMatch::blocks: one contiguous message per non-empty block, on the
// group's communicator for these messages, where a pair's messages match in the order they
// were posted. A receive takes any tag and checks what arrived against its block: the sender
// tags each message with the call's sequence number and whether it is the pair's last block,
// so blocks that disagree (a different size, count or call) are named instead of landing in
// the wrong rows. A message larger than its block fails inside MPI (MPI_ERR_TRUNCATE).
class BlockMessages {
 public:
  BlockMessages(uint64_t seq, DType dtype, int64_t row_elements, MPI_Comm comm)
      : seq_(seq),
        element_(mpi_type(dtype)),
        row_(row_elements),
        row_bytes_(row_elements * static_cast<int64_t>(dtype_size(dtype))),
        comm_(comm) {}
  BlockMessages(const BlockMessages&) = delete;
  BlockMessages& operator=(const BlockMessages&) = delete;
  ~BlockMessages() {
    if (row_type_ != MPI_DATATYPE_NULL && !mpi_finalized()) MPI_Type_free(&row_type_);
  }

  // Posts a receive per non-empty block from `peer` into `dst`; returns the first MPI error.
  int receive(const Tensor& dst, std::span<const RowBlock> blocks, int peer) {
    return post(dst, blocks, peer, /*sending=*/false);
  }
  int send(const Tensor& src, std::span<const RowBlock> blocks, int peer) {
    return post(src, blocks, peer, /*sending=*/true);
  }

  // nullopt while messages are in flight; then "" when every receive got its block, else what
  // went wrong.
  std::optional<std::string> test() {
    int flag = 0;
    const int rc = MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag, statuses_.data());
    if (rc != MPI_SUCCESS && rc != MPI_ERR_IN_STATUS) return "MPI_Testall failed: " + mpi_error_string(rc);
    if (rc == MPI_SUCCESS && !flag) return std::nullopt;
    return first_problem(/*statuses_carry_errors=*/rc == MPI_ERR_IN_STATUS);
  }

 private:
  struct Message {
    bool receive = false;
    int peer = 0;
    int block = 0;  // index among the pair's non-empty blocks
    int64_t rows = 0;
    bool last = false;
    int count = 0;  // in units of `type`
    MPI_Datatype type = MPI_DATATYPE_NULL;
  };

  // The call's sequence number (mod 2^14, enough to tell calls in flight together apart) and
  // the last-block bit: 15 bits, the tag range every MPI provides.
  static int tag(uint64_t seq, bool last) { return static_cast<int>((seq & 0x3FFF) << 1) | (last ? 1 : 0); }

  int post(const Tensor& t, std::span<const RowBlock> blocks, int peer, bool sending) {
    int n_blocks = 0;
    for (const RowBlock& b : blocks) n_blocks += b.rows > 0 ? 1 : 0;
    int k = 0;
    for (const RowBlock& b : blocks) {
      if (b.rows == 0) continue;
      const auto [count, type] = count_of(b.rows);
      const Message m{!sending, peer, k, b.rows, k + 1 == n_blocks, count, type};
      ++k;
      char* at = static_cast<char*>(t.raw()) + b.offset * row_bytes_;
      MPI_Request& request = requests_.emplace_back(MPI_REQUEST_NULL);
      const int rc = sending ? MPI_Isend(at, count, type, peer, tag(seq_, m.last), comm_, &request)
                             : MPI_Irecv(at, count, type, peer, MPI_ANY_TAG, comm_, &request);
      expected_.push_back(m);
      statuses_.emplace_back();
      if (rc != MPI_SUCCESS) return rc;
    }
    return MPI_SUCCESS;
  }

  // Elements of the base type while they fit an int, else rows of a contiguous row type (the
  // type signature is the same, so the two sides may choose differently).
  std::pair<int, MPI_Datatype> count_of(int64_t rows) {
    if (rows * row_ <= INT_MAX) return {static_cast<int>(rows * row_), element_};
    if (row_type_ == MPI_DATATYPE_NULL) {
      MPI_Type_contiguous(static_cast<int>(row_), element_, &row_type_);
      MPI_Type_commit(&row_type_);
    }
    return {static_cast<int>(rows), row_type_};
  }

  std::string describe(const Message& m) const {
    return "block " + std::to_string(m.block) + " (" + std::to_string(m.rows) + " rows" + (m.last ? ", the last" : "") +
           ") of the rows from group rank " + std::to_string(m.peer);
  }

  static std::string disagree() {
    return ": the two sides' blocks disagree (BlockMatch::blocks needs the sender and the receiver to cut each "
           "pair's rows into blocks of the same sizes)";
  }

  std::string check_arrival(const Message& m, const MPI_Status& status) const {
    int got = 0;
    MPI_Get_count(&status, m.type, &got);
    const bool same_call = (status.MPI_TAG >> 1) == (tag(seq_, false) >> 1);
    const bool last = (status.MPI_TAG & 1) != 0;
    if (got == m.count && same_call && last == m.last) return "";
    const int64_t unit = m.type == element_ ? row_ : 1;
    std::string got_text = got == MPI_UNDEFINED || got % unit != 0
                               ? std::string("a message of a partial row")
                               : "a message of " + std::to_string(got / unit) + " rows";
    if (!same_call) {
      got_text += " sent by another all_to_all_blocks call";
    } else if (last != m.last) {
      got_text += last ? " that is the sender's last block" : " that is not the sender's last block";
    }
    return describe(m) + " received " + got_text + disagree();
  }

  // The first message, in posting order, that failed or did not match its block ("" if none).
  // The statuses' error fields are only set when MPI_Testall reported MPI_ERR_IN_STATUS.
  std::string first_problem(bool statuses_carry_errors) const {
    for (size_t i = 0; i < expected_.size(); ++i) {
      const Message& m = expected_[i];
      const int err = statuses_carry_errors ? statuses_[i].MPI_ERROR : MPI_SUCCESS;
      if (err == MPI_ERR_PENDING) continue;
      if (err != MPI_SUCCESS) {
        int err_class = 0;
        MPI_Error_class(err, &err_class);
        if (m.receive && err_class == MPI_ERR_TRUNCATE) return describe(m) + " received a larger message" + disagree();
        return std::string(m.receive ? "receiving " : "sending ") + "block " + std::to_string(m.block) +
               (m.receive ? " from" : " to") + " group rank " + std::to_string(m.peer) + ": " + mpi_error_string(err);
      }
      if (!m.receive) continue;
      std::string problem = check_arrival(m, statuses_[i]);
      if (!problem.empty()) return problem;
    }
    return statuses_carry_errors ? "MPI_Testall reported an error in a status but none carries one" : "";
  }

  uint64_t seq_;
  MPI_Datatype element_;
  int64_t row_, row_bytes_;
  MPI_Comm comm_;
  MPI_Datatype row_type_ = MPI_DATATYPE_NULL;  // built for blocks of more elements than an int counts
  std::vector<MPI_Request> requests_;
  std::vector<MPI_Status> statuses_;
  std::vector<Message> expected_;  // per request
};

class MpiOp final : public PendingOp {
 public:
  // The description is built only when a message needs it, keeping small operations cheap.
  MpiOp(std::shared_ptr<GroupState> group, const char* op, uint64_t seq, std::optional<int> peer_world_rank)
      : group_(std::move(group)), op_(op), seq_(seq), peer_(peer_world_rank) {}
  ~MpiOp() override {
    if (row_type != MPI_DATATYPE_NULL && !mpi_finalized()) MPI_Type_free(&row_type);
  }

  // Filled by the operation that starts this one.
  MPI_Request request = MPI_REQUEST_NULL;
  std::vector<Tensor> keep_alive;
  std::vector<int> int_args;  // counts and displacements MPI reads until completion
  MPI_Datatype row_type = MPI_DATATYPE_NULL;
  PeerDatatypes send_types, recv_types;     // all_to_all_blocks: freed on completion
  std::unique_ptr<BlockMessages> messages;  // all_to_all_blocks, one message per block: replaces `request`
  std::function<void()> finish;             // runs once on completion (bf16: round the f32 result back)

  void started(int rc) {
    if (rc != MPI_SUCCESS) fail(rc);
  }
  uint64_t seq() const { return seq_; }

  bool test() override {
    if (done_) return true;
    if (!complete()) return false;
    done_ = true;
    if (finish) finish();
    keep_alive.clear();
    send_types.free();
    recv_types.free();
    messages.reset();
    return true;
  }

  void wait() override {
    if (test()) return;
    SideChannel& side = SideChannel::get();
    side.set_waiting(what());
    const auto start = Clock::now();
    while (!test()) {
      const double elapsed = seconds_since(start);
      if (elapsed > group_->timeout_s) report_timeout_and_abort(elapsed);
      if (elapsed > 1e-3) {
        side.service();
        // Long waits sleep briefly between polls so oversubscribed cores go to the ranks
        // that have work; short ones only yield, keeping latency low.
        if (elapsed > 0.05) {
          std::this_thread::sleep_for(std::chrono::microseconds(100));
        } else {
          sched_yield();
        }
      }
    }
    side.clear_waiting();
  }

 private:
  bool complete() {
    if (messages) {
      const std::optional<std::string> outcome = messages->test();
      if (outcome && !outcome->empty()) fail(*outcome);
      return outcome.has_value();
    }
    int flag = 0;
    const int rc = MPI_Test(&request, &flag, MPI_STATUS_IGNORE);
    if (rc != MPI_SUCCESS) fail(rc);
    return flag != 0;
  }

  [[noreturn]] void fail(int rc) { fail(mpi_error_string(rc)); }
  [[noreturn]] void fail(const std::string& problem) {
    abort_job("dsx: communication error in " + what() + " on world rank " + std::to_string(world_rank()) + ": " +
              problem + ". Aborting the job.");
  }

  [[noreturn]] void report_timeout_and_abort(double elapsed) {
    const int me = world_rank();
    std::vector<int> peers;
    if (peer_) {
      peers.push_back(*peer_);
    } else {
      for (int r : group_->world_ranks) {
        if (r != me) peers.push_back(r);
      }
    }
    const double grace = std::clamp(group_->timeout_s * 0.2, 0.5, 3.0);
    const auto answers = SideChannel::get().ask(peers, grace);

    std::vector<int> same, missing;
    std::string details;
    const std::string same_text = "waiting on " + what() + " for";
    for (size_t i = 0; i < peers.size(); ++i) {
      if (!peer_ && answers[i] && answers[i]->starts_with(same_text)) {
        same.push_back(peers[i]);
        continue;
      }
      if (!peer_) missing.push_back(peers[i]);
      details += "; rank " + std::to_string(peers[i]) + ": " +
                 (answers[i] ? *answers[i] : std::string("no answer (dead, hung, or busy outside communication)"));
    }
    std::string msg = "dsx: communication timeout: " + what() + " (world ranks " + rank_list(group_->world_ranks) +
                      ") did not complete within " + format_seconds(group_->timeout_s) + " s on world rank " +
                      std::to_string(me) + " (waited " + format_seconds(elapsed) + " s). ";
    if (peer_) {
      msg += "Peer rank " + std::to_string(*peer_) + " never matched it" + details + ".";
    } else {
      msg += "Never arrived: ranks " + rank_list(missing) + details + ". Waiting on the same operation: ranks " +
             rank_list(same) + ".";
    }
    abort_job(msg + " Aborting the job (parallel.comm_timeout_s).");
  }

  std::shared_ptr<GroupState> group_;
  // "all_reduce #5 of group 'dp'", "send to world rank 3 (#2 of group 'pp')"
  std::string what() const {
    const std::string group = "group '" + group_->name + "'";
    if (!peer_) return std::string(op_) + " #" + std::to_string(seq_) + " of " + group;
    return std::string(op_) + (std::string_view(op_) == "send" ? " to" : " from") + " world rank " +
           std::to_string(*peer_) + " (#" + std::to_string(seq_) + " of " + group + ")";
  }

  const char* op_;
  uint64_t seq_;
  std::optional<int> peer_;
  bool done_ = false;
};

// The MPI backend moves host tensors only: this OpenMPI is not used CUDA-aware (and the bf16
// sums widen on the host), so a GPU tensor gets a message pointing at the NCCL backend instead
// of the generic "CPU only" one.
void check_host_tensor(const Tensor& t, std::string_view op, std::string_view name) {
  check(!t.defined() || t.device() == Device::cpu, "comm " + std::string(op), [&] {
    return std::string(name) + " " + t.describe() +
           " is on the GPU; the MPI communicator moves host tensors only (GPU tensors go through the NCCL "
           "communicator, parallel/comm_nccl.h)";
  });
  check_comm_tensor(t, op, name);
}

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(std::shared_ptr<GroupState> g) : g_(std::move(g)) {}

  int rank() const override { return g_->rank; }
  int size() const override { return static_cast<int>(g_->world_ranks.size()); }
  const std::string& name() const override { return g_->name; }
  const std::vector<int>& world_ranks() const override { return g_->world_ranks; }
  double timeout_s() const override { return g_->timeout_s; }

  CommHandle all_reduce(const Tensor& t) override {
    check_host_tensor(t, "all_reduce", "tensor");
    check_reducible(t, "all_reduce");
    auto op = collective("all_reduce");
    if (t.dtype() == DType::bf16) {
      Tensor wide = t.to(DType::f32);
      op->keep_alive = {t, wide};
      op->started(MPI_Iallreduce(MPI_IN_PLACE, wide.raw(), to_count(wide.numel(), "all_reduce"), MPI_FLOAT, MPI_SUM,
                                 g_->comm, &op->request));
      op->finish = [dst = Tensor(t), wide]() mutable { dst.copy_from(wide); };
    } else {
      op->keep_alive = {t};
      op->started(MPI_Iallreduce(MPI_IN_PLACE, t.raw(), to_count(t.numel(), "all_reduce"), mpi_type(t.dtype()), MPI_SUM,
                                 g_->comm, &op->request));
    }
    return CommHandle(std::move(op));
  }

  CommHandle reduce_scatter(const Tensor& in, const Tensor& out) override {
    check_host_tensor(in, "reduce_scatter", "in");
    check_host_tensor(out, "reduce_scatter", "out");
    check_reducible(in, "reduce_scatter");
    check_same_layout(in, out, "reduce_scatter");
    check(in.dim(0) == size() * out.dim(0), "comm reduce_scatter", [&] {
      return "in " + in.describe() + " must have " + std::to_string(size()) + " x the rows of out " + out.describe();
    });
    auto op = collective("reduce_scatter");
    const int count = to_count(out.numel(), "reduce_scatter");
    if (in.dtype() == DType::bf16) {
      Tensor wide_in = in.to(DType::f32);
      Tensor wide_out = Tensor::empty(out.shape(), DType::f32);
      op->keep_alive = {in, out, wide_in, wide_out};
      op->started(
          MPI_Ireduce_scatter_block(wide_in.raw(), wide_out.raw(), count, MPI_FLOAT, MPI_SUM, g_->comm, &op->request));
      op->finish = [dst = Tensor(out), wide_out]() mutable { dst.copy_from(wide_out); };
    } else {
      op->keep_alive = {in, out};
      op->started(
          MPI_Ireduce_scatter_block(in.raw(), out.raw(), count, mpi_type(in.dtype()), MPI_SUM, g_->comm, &op->request));
    }
    return CommHandle(std::move(op));
  }

  CommHandle all_gather(const Tensor& in, const Tensor& out) override {
    check_host_tensor(in, "all_gather", "in");
    check_host_tensor(out, "all_gather", "out");
    check_same_layout(in, out, "all_gather");
    check(out.dim(0) == size() * in.dim(0), "comm all_gather", [&] {
      return "out " + out.describe() + " must have " + std::to_string(size()) + " x the rows of in " + in.describe();
    });
    auto op = collective("all_gather");
    op->keep_alive = {in, out};
    const int count = to_count(in.numel(), "all_gather");
    const MPI_Datatype type = mpi_type(in.dtype());
    // `in` may already be this rank's chunk of `out` (ZeRO keeps its shard there): MPI
    // requires MPI_IN_PLACE for that instead of aliased buffers.
    const bool in_place = static_cast<char*>(out.raw()) + static_cast<size_t>(rank()) * in.nbytes() == in.raw();
    op->started(MPI_Iallgather(in_place ? MPI_IN_PLACE : in.raw(), count, type, out.raw(), count, type, g_->comm,
                               &op->request));
    return CommHandle(std::move(op));
  }

  CommHandle all_to_all_v(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                          std::span<const int64_t> recv_counts) override {
    check_host_tensor(send, "all_to_all_v", "send");
    check_host_tensor(recv, "all_to_all_v", "recv");
    check_same_layout(send, recv, "all_to_all_v");
    const int n = size();
    auto op = collective("all_to_all_v");
    // Counts in elements of the base type while they fit an int; beyond that a row becomes
    // one element of a contiguous datatype, so counts are rows and stay small (building the
    // datatype costs a few microseconds, which small dispatches should not pay).
    const int64_t row = row_elements(send);
    const bool element_counts = std::max(send.dim(0), recv.dim(0)) * row <= INT_MAX;
    MPI_Datatype type = mpi_type(send.dtype());
    if (!element_counts) {
      MPI_Type_contiguous(to_count(row, "all_to_all_v"), type, &op->row_type);
      MPI_Type_commit(&op->row_type);
      type = op->row_type;
    }
    const int64_t unit = element_counts ? row : 1;
    // int_args = send counts, send displacements, recv counts, recv displacements.
    op->int_args.resize(4 * static_cast<size_t>(n));
    fill_counts(send_counts, send, unit, "send", op->int_args.data(), op->int_args.data() + n);
    fill_counts(recv_counts, recv, unit, "recv", op->int_args.data() + 2 * n, op->int_args.data() + 3 * n);
    op->keep_alive = {send, recv};
    const int* a = op->int_args.data();
    op->started(
        MPI_Ialltoallv(send.raw(), a, a + n, type, recv.raw(), a + 2 * n, a + 3 * n, type, g_->comm, &op->request));
    return CommHandle(std::move(op));
  }

  // One committed hindexed datatype per peer over the peer's blocks (byte displacements from
  // the tensor's first row), so MPI reads and writes the rows in place. This rank's own rows
  // are copied here, block to block, once the transfer has started: OpenMPI's non-blocking
  // collectives (libnbc) copy a self-message of derived datatypes by packing it into a buffer
  // malloc'ed for the purpose and unpacking it from there: two copies instead of one.
  CommHandle all_to_all_blocks(const Tensor& send, const PeerRowBlocks& send_blocks, const Tensor& recv,
                               const PeerRowBlocks& recv_blocks, BlockMatch match = BlockMatch::rows) override {
    check_host_tensor(send, "all_to_all_blocks", "send");
    check_host_tensor(recv, "all_to_all_blocks", "recv");
    check_same_layout(send, recv, "all_to_all_blocks");
    const std::vector<int64_t> send_rows = check_row_blocks(send_blocks, send, size(), "send");
    const std::vector<int64_t> recv_rows = check_row_blocks(recv_blocks, recv, size(), "recv");
    const int me = rank();
    check(send_rows[me] == recv_rows[me], "comm all_to_all_blocks", [&] {
      return "rank " + std::to_string(me) + " of group '" + name() + "' sends " + std::to_string(send_rows[me]) +
             " rows to itself but expects to receive " + std::to_string(recv_rows[me]);
    });
    check_int_counts(send_blocks);
    check_int_counts(recv_blocks);
    const int row = to_count(row_elements(send), "all_to_all_blocks");
    const int64_t row_bytes = row * static_cast<int64_t>(dtype_size(send.dtype()));
    auto op = collective("all_to_all_blocks");
    if (match == BlockMatch::blocks) {
      // One contiguous message per block, receives posted first; then this rank's own rows.
      op->messages = std::make_unique<BlockMessages>(op->seq(), send.dtype(), row, g_->blocks_comm);
      op->keep_alive = {send, recv};
      for (int p = 0; p < size(); ++p) {
        if (p != me) op->started(op->messages->receive(recv, recv_blocks.of(p), p));
      }
      for (int p = 0; p < size(); ++p) {
        if (p != me) op->started(op->messages->send(send, send_blocks.of(p), p));
      }
      copy_blocks(send, send_blocks.of(me), recv, recv_blocks.of(me), row_bytes);
      return CommHandle(std::move(op));
    }
    MPI_Type_contiguous(row, mpi_type(send.dtype()), &op->row_type);
    for (int p = 0; p < size(); ++p) {
      const bool self = p == me;  // copied below; MPI sees an empty message
      op->send_types.add_peer(self ? std::span<const RowBlock>() : send_blocks.of(p), op->row_type, row_bytes);
      op->recv_types.add_peer(self ? std::span<const RowBlock>() : recv_blocks.of(p), op->row_type, row_bytes);
    }
    op->keep_alive = {send, recv};
    PeerDatatypes& s = op->send_types;
    PeerDatatypes& r = op->recv_types;
    op->started(MPI_Ialltoallw(send.raw(), s.counts.data(), s.displs.data(), s.types.data(), recv.raw(),
                               r.counts.data(), r.displs.data(), r.types.data(), g_->comm, &op->request));
    copy_blocks(send, send_blocks.of(me), recv, recv_blocks.of(me), row_bytes);
    return CommHandle(std::move(op));
  }

  CommHandle send(const Tensor& t, int peer, int tag) override {
    check_host_tensor(t, "send", "tensor");
    check_peer(peer, tag, "send");
    auto op = point_to_point("send", peer);
    op->keep_alive = {t};
    op->started(
        MPI_Isend(t.raw(), to_count(t.numel(), "send"), mpi_type(t.dtype()), peer, tag, g_->comm, &op->request));
    return CommHandle(std::move(op));
  }

  CommHandle recv(const Tensor& t, int peer, int tag) override {
    check_host_tensor(t, "recv", "tensor");
    check_peer(peer, tag, "recv");
    auto op = point_to_point("recv", peer);
    op->keep_alive = {t};
    op->started(
        MPI_Irecv(t.raw(), to_count(t.numel(), "recv"), mpi_type(t.dtype()), peer, tag, g_->comm, &op->request));
    return CommHandle(std::move(op));
  }

  CommHandle broadcast(const Tensor& t, int root) override {
    check_host_tensor(t, "broadcast", "tensor");
    check(root >= 0 && root < size(), "comm broadcast", [&] {
      return "root " + std::to_string(root) + " is outside group '" + name() + "' of " + std::to_string(size());
    });
    auto op = collective("broadcast");
    op->keep_alive = {t};
    op->started(
        MPI_Ibcast(t.raw(), to_count(t.numel(), "broadcast"), mpi_type(t.dtype()), root, g_->comm, &op->request));
    return CommHandle(std::move(op));
  }

  CommHandle barrier() override {
    auto op = collective("barrier");
    op->started(MPI_Ibarrier(g_->comm, &op->request));
    return CommHandle(std::move(op));
  }

 private:
  std::unique_ptr<MpiOp> collective(const char* op) {
    return std::make_unique<MpiOp>(g_, op, g_->collectives++, std::nullopt);
  }

  std::unique_ptr<MpiOp> point_to_point(const char* op, int peer) {
    const int peer_world = g_->world_ranks[static_cast<size_t>(peer)];
    return std::make_unique<MpiOp>(g_, op, g_->p2p++, peer_world);
  }

  void check_peer(int peer, int tag, std::string_view op) const {
    check(peer >= 0 && peer < size(), "comm " + std::string(op), [&] {
      return "peer " + std::to_string(peer) + " is outside group '" + name() + "' of " + std::to_string(size());
    });
    check(tag >= 0 && tag <= 32767, "comm " + std::string(op),
          [&] { return "tag " + std::to_string(tag) + " is outside [0, 32767]"; });
  }

  // The rows of `from` blocks, in order, into the `to` blocks, in order (as many rows): each
  // row is copied once, in runs as long as both sides' blocks allow.
  static void copy_blocks(const Tensor& src, std::span<const RowBlock> from, const Tensor& dst,
                          std::span<const RowBlock> to, int64_t row_bytes) {
    const auto* s = static_cast<const char*>(src.raw());
    auto* d = static_cast<char*>(dst.raw());
    size_t i = 0, j = 0;
    int64_t done_i = 0, done_j = 0;  // rows already copied of from[i] and to[j]
    while (i < from.size() && j < to.size()) {
      const int64_t n = std::min(from[i].rows - done_i, to[j].rows - done_j);
      if (n > 0) {
        std::memcpy(d + (to[j].offset + done_j) * row_bytes, s + (from[i].offset + done_i) * row_bytes,
                    static_cast<size_t>(n * row_bytes));
      }
      done_i += n;
      done_j += n;
      if (done_i == from[i].rows) {
        ++i;
        done_i = 0;
      }
      if (done_j == to[j].rows) {
        ++j;
        done_j = 0;
      }
    }
  }

  // MPI's datatypes count a peer's blocks and each block's rows in int.
  static void check_int_counts(const PeerRowBlocks& b) {
    for (int p = 0; p < b.peers(); ++p) {
      to_count(b.peer_start[p + 1] - b.peer_start[p], "all_to_all_blocks");
      for (const RowBlock& block : b.of(p)) to_count(block.rows, "all_to_all_blocks");
    }
  }

  // Writes per-peer counts and prefix-sum displacements in units of `unit` elements per row;
  // the rows must fit the tensor.
  void fill_counts(std::span<const int64_t> counts, const Tensor& t, int64_t unit, std::string_view side,
                   int* out_counts, int* out_displs) const {
    check(static_cast<int>(counts.size()) == size(), "comm all_to_all_v", [&] {
      return std::string(side) + " counts have " + std::to_string(counts.size()) + " entries for group '" + name() +
             "' of " + std::to_string(size());
    });
    int64_t total = 0;
    for (int p = 0; p < size(); ++p) {
      check(counts[p] >= 0, "comm all_to_all_v",
            [&] { return std::string(side) + " count for peer " + std::to_string(p) + " is negative"; });
      total += counts[p];
    }
    check(total <= t.dim(0), "comm all_to_all_v", [&] {
      return std::string(side) + " counts add up to " + std::to_string(total) + " rows but the tensor is " +
             t.describe();
    });
    int64_t offset = 0;  // within the tensor, so the unit was chosen to fit an int
    for (int p = 0; p < size(); ++p) {
      out_counts[p] = static_cast<int>(counts[p] * unit);
      out_displs[p] = static_cast<int>(offset * unit);
      offset += counts[p];
    }
  }

  std::shared_ptr<GroupState> g_;
};

std::shared_ptr<GroupState> split_group(const std::string& name, const std::vector<int>& members, double timeout_s) {
  const int me = world_rank();
  const auto it = std::find(members.begin(), members.end(), me);
  if (it == members.end()) {
    throw std::logic_error("comm: world rank " + std::to_string(me) + " is not in its own group '" + name + "'");
  }
  auto g = std::make_shared<GroupState>();
  g->name = name;
  g->world_ranks = members;
  g->rank = static_cast<int>(it - members.begin());
  g->timeout_s = timeout_s;
  const int color = *std::min_element(members.begin(), members.end());
  MPI_Comm_split(MPI_COMM_WORLD, color, g->rank, &g->comm);
  MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN);
  MPI_Comm_dup(g->comm, &g->blocks_comm);
  MPI_Comm_set_errhandler(g->blocks_comm, MPI_ERRORS_RETURN);
  int rank = -1, size = -1;
  MPI_Comm_rank(g->comm, &rank);
  MPI_Comm_size(g->comm, &size);
  if (rank != g->rank || size != static_cast<int>(members.size())) {
    throw std::logic_error("comm: group '" + name + "' split into rank " + std::to_string(rank) + " of " +
                           std::to_string(size) + ", expected " + std::to_string(g->rank) + " of " +
                           std::to_string(members.size()) + " (ranks disagree on the mesh)");
  }
  return g;
}

void check_timeout(double timeout_s) {
  if (!(timeout_s > 0)) {
    throw UserError("parallel.comm_timeout_s must be > 0 seconds, got " + format_seconds(timeout_s));
  }
}

}  // namespace

MpiSession::MpiSession() {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (initialized) return;
  int provided = 0;
  MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
  owns_ = true;
}

MpiSession::~MpiSession() {
  if (!owns_ || mpi_finalized()) return;
  SideChannel::get().close();
  MPI_Finalize();
}

int MpiSession::world_rank() const {
  return dsx::world_rank();
}

int MpiSession::world_size() const {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  return n;
}

std::unique_ptr<Communicator> make_mpi_world_communicator(double timeout_s) {
  check_timeout(timeout_s);
  SideChannel::get().open();
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  std::vector<int> all(static_cast<size_t>(n));
  for (int r = 0; r < n; ++r) all[static_cast<size_t>(r)] = r;
  return std::make_unique<MpiCommunicator>(split_group("world", all, timeout_s));
}

MeshComms make_mpi_mesh_comms(const Mesh& mesh, double timeout_s) {
  check_timeout(timeout_s);
  if (mesh.rank != world_rank()) {
    throw std::logic_error("comm: mesh built for rank " + std::to_string(mesh.rank) + " used on world rank " +
                           std::to_string(world_rank()));
  }
  MeshComms c;
  c.world = make_mpi_world_communicator(timeout_s);
  auto make = [&](const char* name, const std::vector<int>& members) {
    return std::make_unique<MpiCommunicator>(split_group(name, members, timeout_s));
  };
  c.tp = make("tp", mesh.tp_group);
  c.dp = make("dp", mesh.dp_group);
  c.ep = make("ep", mesh.ep_group);
  c.edp = make("edp", mesh.edp_group);
  c.pp = make("pp", mesh.pp_group);
  c.model = make("model", mesh.model_group);
  return c;
}

void check_world_size(const MeshSizes& sizes, int64_t n_routed_experts) {
  int n = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &n);
  validate_mesh(sizes, n, n_routed_experts);
}

}  // namespace dsx
