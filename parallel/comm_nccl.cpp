// NCCL backend of Communicator. See parallel/comm.h for the contract and parallel/comm_nccl.h for
// how it maps onto streams and events.
//
// Every NCCL communicator here is non-blocking (ncclConfig_t::blocking = 0): a call may return
// ncclInProgress, and its work is on the stream only once ncclCommGetAsyncError reports
// ncclSuccess (settle()). That is what lets creation, enqueueing and destruction honour the
// timeout instead of blocking inside NCCL, and it is why stream work that must follow a
// transfer (the bf16 rounding, the done event) is enqueued only after settle().
#include "parallel/comm_nccl.h"

#include <mpi.h>
#include <nccl.h>
#include <sched.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#include "kernels/cuda/runtime.h"
#include "parallel/comm_mpi.h"

namespace dsx {
namespace {

using Clock = std::chrono::steady_clock;
using Describe = std::function<std::string()>;  // builds an operation's name only for messages

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

std::string format_seconds(double s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

std::string rank_list(const std::vector<int>& ranks) {
  std::string s = "[";
  for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
  return s + "]";
}

// One write, so the lines of several ranks do not interleave.
void print_line(const std::string& message) {
  const std::string line = message + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

// Ends the whole job like the MPI backend does (MPI_Abort on the world when MPI is up).
[[noreturn]] void end_job() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, kCommAbortExitCode);
  std::_Exit(kCommAbortExitCode);
}

// Short waits only yield (latency); long ones sleep so that other ranks sharing cores run.
void backoff(double elapsed) {
  if (elapsed > 0.05) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
  } else {
    sched_yield();
  }
}

// The device's communication stream, shared by every NCCL communicator on it and released with
// the last of them. High priority: when compute fills the GPU, the SMs that free up go to the
// transfer first, so communication is not starved by the kernels it overlaps.
class CommStream {
 public:
  CommStream() {
    int least = 0, greatest = 0;
    DSX_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    DSX_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
  }
  ~CommStream() {
    if (stream_) cudaStreamDestroy(stream_);  // pending work still completes; no throw here
  }
  CommStream(const CommStream&) = delete;
  CommStream& operator=(const CommStream&) = delete;
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

// The NCCL type a sum runs in (bf16 is widened to f32 first; FP8 is never summed).
ncclDataType_t sum_type(DType d) {
  switch (d) {
    case DType::f32:
    case DType::bf16:
      return ncclFloat32;
    case DType::f64:
      return ncclFloat64;
    case DType::i32:
      return ncclInt32;
    case DType::i64:
      return ncclInt64;
    default:
      break;
  }
  throw std::logic_error("comm: no NCCL sum for dtype " + std::string(dtype_name(d)));
}

// Runs the calls between ncclGroupStart and ncclGroupEnd (always closing the group); returns
// the first failure.
template <class Calls>
ncclResult_t grouped(Calls&& calls) {
  const ncclResult_t start = ncclGroupStart();
  if (start != ncclSuccess) return start;
  const ncclResult_t inner = calls();
  const ncclResult_t end = ncclGroupEnd();
  return inner != ncclSuccess ? inner : end;
}

bool is_failure(ncclResult_t r) {
  return r != ncclSuccess && r != ncclInProgress;
}

const char* bytes_at(const Tensor& t, size_t offset) {
  return static_cast<const char*>(t.raw()) + offset;
}
char* mutable_bytes_at(const Tensor& t, size_t offset) {
  return static_cast<char*>(t.raw()) + offset;
}

// True when the byte ranges of a and b intersect.
bool overlap(const Tensor& a, const Tensor& b) {
  if (a.nbytes() == 0 || b.nbytes() == 0) return false;
  const char* a0 = bytes_at(a, 0);
  const char* b0 = bytes_at(b, 0);
  return a0 < b0 + b.nbytes() && b0 < a0 + a.nbytes();
}

// ---- one started operation --------------------------------------------------------------------

struct OpState {
  const char* op = "";
  uint64_t seq = 0;
  int peer_world = -1;                // point to point only
  bool host_visible = false;          // wait() blocks the host until completion (barrier)
  std::vector<Tensor> keep_alive;     // every buffer the transfer reads or writes
  std::shared_ptr<cuda::Event> done;  // recorded after the transfer; null while a p2p op is queued
  Clock::time_point launched;
};

// A send or recv posted but not launched yet (see "Point to point" in comm_nccl.h).
struct QueuedP2p {
  std::shared_ptr<NcclGroup> group;  // kept alive until launched
  std::shared_ptr<OpState> op;
  bool is_send = true;
  void* data = nullptr;
  size_t bytes = 0;
  int peer = 0;                        // group rank
  std::unique_ptr<cuda::Event> ready;  // the caller's stream at the send()/recv() call
};

// What the NCCL communicators of one device share: the communication stream and the sends and
// receives posted on any of them but not launched yet. The queue is per device, not per group,
// so that whatever is issued next on any group launches them first: operations reach the stream
// in issue order, and a queued send never waits behind a transfer of another group that may
// depend on it.
struct CommLane {
  CommStream stream;
  std::vector<QueuedP2p> queued;
};

std::shared_ptr<CommLane> shared_lane(int device) {
  static std::mutex mutex;
  static std::map<int, std::weak_ptr<CommLane>> lanes;
  std::lock_guard lock(mutex);
  std::weak_ptr<CommLane>& slot = lanes[device];
  std::shared_ptr<CommLane> lane = slot.lock();
  if (!lane) {
    lane = std::make_shared<CommLane>();  // on the current device, which is `device`
    slot = lane;
  }
  return lane;
}

void flush_queued(CommLane& lane);  // after NcclGroup

}  // namespace

// ---- the group --------------------------------------------------------------------------------

struct NcclGroup {
  std::string name;
  std::vector<int> world_ranks;  // group rank -> world rank
  int rank = 0;
  double timeout_s = 600;
  int device = 0;
  ncclComm_t comm = nullptr;
  std::shared_ptr<CommLane> lane;
  cuda::Event ready;         // re-recorded per operation; a stream wait captures the record it follows
  uint64_t collectives = 0;  // sequence numbers in messages; equal across ranks for collectives
  uint64_t p2p = 0;

  NcclGroup(std::string name_, std::vector<int> world_ranks_, int rank_, double timeout, int device_,
            std::shared_ptr<CommLane> lane_)
      : name(std::move(name_)),
        world_ranks(std::move(world_ranks_)),
        rank(rank_),
        timeout_s(timeout),
        device(device_),
        lane(std::move(lane_)) {}
  NcclGroup(const NcclGroup&) = delete;
  NcclGroup& operator=(const NcclGroup&) = delete;
  ~NcclGroup();

  int size() const { return static_cast<int>(world_ranks.size()); }
  int world_rank() const { return world_ranks[static_cast<size_t>(rank)]; }
  cudaStream_t s() const { return lane->stream.get(); }

  // "all_reduce #5 of group 'dp'", "send to world rank 3 (#2 of group 'pp')" — as the MPI backend.
  std::string what(const OpState& op) const {
    const std::string group = "group '" + name + "'";
    if (op.peer_world < 0) return std::string(op.op) + " #" + std::to_string(op.seq) + " of " + group;
    return std::string(op.op) + (std::string_view(op.op) == "send" ? " to" : " from") + " world rank " +
           std::to_string(op.peer_world) + " (#" + std::to_string(op.seq) + " of " + group + ")";
  }

  // ---- failures: one message, then the communicator and the job are aborted ----

  [[noreturn]] void abort_with(const std::string& message) {
    print_line(message);  // first: ncclCommAbort may take a while
    if (comm) {
      ncclCommAbort(comm);
      comm = nullptr;
    }
    end_job();
  }

  [[noreturn]] void fail(ncclResult_t r, const std::string& what_failed) {
    std::string detail = ncclGetErrorString(r);
    const char* last = ncclGetLastError(comm);
    if (last && *last) detail += " (" + std::string(last) + ")";
    abort_with("dsx: NCCL error in " + what_failed + " on world rank " + std::to_string(world_rank()) + ": " + detail +
               ". Aborting the job.");
  }

  [[noreturn]] void timed_out(const std::string& what_failed, double waited) {
    abort_with("dsx: communication timeout: " + what_failed + " (NCCL, world ranks " + rank_list(world_ranks) +
               ") did not complete within " + format_seconds(timeout_s) + " s on world rank " +
               std::to_string(world_rank()) + " (waited " + format_seconds(waited) +
               " s). NCCL cannot say which ranks never arrived: look for the rank whose log stops before this "
               "operation. Aborting the NCCL communicator and the job (parallel.comm_timeout_s).");
  }

  // The communicator's state: ncclSuccess or ncclInProgress; an error ends the job.
  ncclResult_t state(const Describe& what_now) {
    ncclResult_t async = ncclSuccess;
    const ncclResult_t r = ncclCommGetAsyncError(comm, &async);
    if (r != ncclSuccess) fail(r, what_now());
    if (is_failure(async)) fail(async, what_now());
    return async;
  }

  // After a call on the communicator: returns once NCCL has carried it out (for operations:
  // put them on the stream), polling within the timeout.
  void settle(ncclResult_t r, const Describe& what_now) {
    if (is_failure(r)) fail(r, what_now());
    const auto start = Clock::now();
    while (state(what_now) == ncclInProgress) {
      const double elapsed = seconds_since(start);
      if (elapsed > timeout_s) timed_out(what_now(), elapsed);
      backoff(elapsed);
    }
  }

  // Blocks the host until op's transfer has completed, within the timeout.
  void host_wait(const OpState& op) {
    const auto start = Clock::now();
    const Describe describe = [&] { return what(op); };
    while (!op.done->query()) {
      state(describe);
      const double elapsed = seconds_since(start);
      if (elapsed > timeout_s) timed_out(what(op), elapsed);
      backoff(elapsed);
    }
  }

  // Checks that it has been less than the timeout since op was launched, when it is not done.
  void check_not_overdue(const OpState& op) {
    const double elapsed = seconds_since(op.launched);
    if (elapsed > timeout_s && !op.done->query()) timed_out(what(op), elapsed);
  }

  // Checks the communicator's size and this rank against what the group should be.
  void verify(const std::string& how_made) {
    int count = 0, user_rank = -1;
    const Describe describe = [&] { return how_made; };
    settle(ncclCommCount(comm, &count), describe);
    settle(ncclCommUserRank(comm, &user_rank), describe);
    if (count != size() || user_rank != rank) {
      throw std::logic_error("comm: NCCL group '" + name + "' came out as rank " + std::to_string(user_rank) + " of " +
                             std::to_string(count) + ", expected " + std::to_string(rank) + " of " +
                             std::to_string(size()) + " (ranks disagree on the mesh)");
    }
  }

  // ---- argument checks (std::invalid_argument, before anything is started) ----

  void check_tensor(const Tensor& t, std::string_view op, std::string_view tensor_name) const {
    const std::string where = "comm " + std::string(op);
    check(t.defined(), where, [&] { return std::string(tensor_name) + " is undefined"; });
    check(t.device() == Device::cuda, where, [&] {
      return std::string(tensor_name) + " " + t.describe() + " is in host memory; the NCCL communicator of group '" +
             name + "' moves GPU tensors only (host tensors go through the MPI communicators, make_mpi_mesh_comms)";
    });
    const DType d = t.dtype();
    check(d == DType::f32 || d == DType::f64 || d == DType::bf16 || d == DType::i32 || d == DType::i64 ||
              d == DType::fp8_e4m3 || d == DType::fp8_e5m2,
          where, [&] {
            return std::string(tensor_name) + " has dtype " + std::string(dtype_name(d)) +
                   "; use f32, f64, bf16, fp8_e4m3, fp8_e5m2, i32 or i64";
          });
  }

  void check_current_device(std::string_view op) const {
    const int current = cuda::current_device();
    check(current == device, "comm " + std::string(op), [&] {
      return "the current CUDA device is " + std::to_string(current) + " but group '" + name + "' was made on device " +
             std::to_string(device);
    });
  }

  void check_peer(int peer, int tag, std::string_view op) const {
    check(peer >= 0 && peer < size(), "comm " + std::string(op), [&] {
      return "peer " + std::to_string(peer) + " is outside group '" + name + "' of " + std::to_string(size());
    });
    check(tag >= 0 && tag <= 32767, "comm " + std::string(op),
          [&] { return "tag " + std::to_string(tag) + " is outside [0, 32767]"; });
  }

  // ---- starting operations ----

  std::shared_ptr<OpState> collective(const char* op) {
    auto st = std::make_shared<OpState>();
    st->op = op;
    st->seq = collectives++;
    return st;
  }

  std::shared_ptr<OpState> point_to_point(const char* op, int peer) {
    auto st = std::make_shared<OpState>();
    st->op = op;
    st->seq = p2p++;
    st->peer_world = world_ranks[static_cast<size_t>(peer)];
    return st;
  }

  void mark_launched(OpState& op, std::shared_ptr<cuda::Event> done) {
    op.done = std::move(done);
    op.launched = Clock::now();
  }

  std::shared_ptr<cuda::Event> record_done() {
    auto done = std::make_shared<cuda::Event>();
    done->record(s());
    return done;
  }

  // Runs `enqueue` (NCCL calls on s(), returning the first failure) after the work enqueued so
  // far on the current stream, then `after` (stream work on the transfer's results, with s()
  // current), then records op.done. Sends and receives posted earlier (on any group) go first.
  void launch(OpState& op, const std::function<ncclResult_t()>& enqueue, const std::function<void()>& after) {
    flush_queued(*lane);
    ready.record(cuda::current_stream());
    ready.wait_on(s());
    settle(enqueue(), [&] { return what(op); });
    if (after) {
      cuda::StreamGuard guard(s());
      after();
    }
    mark_launched(op, record_done());
  }

  void queue(std::shared_ptr<NcclGroup> self, std::shared_ptr<OpState> op, bool is_send, void* data, size_t bytes,
             int peer) {
    QueuedP2p q;
    q.group = std::move(self);
    q.op = std::move(op);
    q.is_send = is_send;
    q.data = data;
    q.bytes = bytes;
    q.peer = peer;
    q.ready = std::make_unique<cuda::Event>();
    q.ready->record(cuda::current_stream());
    lane->queued.push_back(std::move(q));
  }

  // Launches queued sends and receives of this group as one NCCL group, so that a rank's send
  // and the receive of the same exchange progress together.
  void launch_p2p(std::span<QueuedP2p> run) {
    for (const QueuedP2p& q : run) q.ready->wait_on(s());
    const ncclResult_t r = grouped([&] {
      for (const QueuedP2p& q : run) {
        if (q.bytes == 0) continue;  // the matching side has 0 bytes too and skips as well
        const ncclResult_t rq = q.is_send ? ncclSend(q.data, q.bytes, ncclUint8, q.peer, comm, s())
                                          : ncclRecv(q.data, q.bytes, ncclUint8, q.peer, comm, s());
        if (is_failure(rq)) return rq;
      }
      return ncclSuccess;
    });
    settle(r, [&] { return what(*run.front().op); });
    const std::shared_ptr<cuda::Event> done = record_done();
    for (QueuedP2p& q : run) mark_launched(*q.op, done);
  }
};

namespace {

// Launches the device's queued sends and receives in posting order, one NCCL group per run of
// consecutive ones on the same communicator.
void flush_queued(CommLane& lane) {
  if (lane.queued.empty()) return;
  std::vector<QueuedP2p> batch = std::move(lane.queued);
  lane.queued.clear();
  size_t begin = 0;
  while (begin < batch.size()) {
    size_t end = begin + 1;
    while (end < batch.size() && batch[end].group == batch[begin].group) ++end;
    batch[begin].group->launch_p2p(std::span<QueuedP2p>(batch).subspan(begin, end - begin));
    begin = end;
  }
}

}  // namespace

NcclGroup::~NcclGroup() {
  if (!comm) return;  // (sends and receives still queued hold their group: none are left here)
  // Finalize flushes the communicator's outstanding work; polled within the timeout, then the
  // local resources are freed. A communicator in error, or one that does not quiesce, is aborted.
  ncclResult_t async = ncclSuccess;
  bool clean = ncclCommGetAsyncError(comm, &async) == ncclSuccess && !is_failure(async);
  if (clean) clean = !is_failure(ncclCommFinalize(comm));
  const auto start = Clock::now();
  while (clean) {
    if (ncclCommGetAsyncError(comm, &async) != ncclSuccess || is_failure(async)) {
      clean = false;
    } else if (async == ncclSuccess) {
      break;
    } else if (seconds_since(start) > timeout_s) {
      clean = false;
    } else {
      backoff(seconds_since(start));
    }
  }
  if (clean) {
    ncclCommDestroy(comm);
  } else {
    print_line("dsx: NCCL group '" + name + "' on world rank " + std::to_string(world_rank()) +
               " did not shut down cleanly within " + format_seconds(timeout_s) + " s; aborting it");
    ncclCommAbort(comm);
  }
}

// ---- handles ----------------------------------------------------------------------------------

namespace {

class NcclOp final : public PendingOp {
 public:
  NcclOp(std::shared_ptr<NcclGroup> group, std::shared_ptr<OpState> op) : g_(std::move(group)), st_(std::move(op)) {}

  // A handle dropped without wait() still orders the current stream after the transfer before
  // the buffers go back to the stream-ordered pool (CommHandle always waits; this is a backstop).
  ~NcclOp() override {
    if (complete_ || !st_->done) return;
    try {
      st_->done->wait_on(cuda::current_stream());
    } catch (const std::exception& e) {
      print_line(std::string("dsx: NCCL handle of group '") + g_->name + "' released: " + e.what());
    }
  }

  bool test() override {
    ensure_launched();
    if (st_->done->query()) {
      complete_ = true;
      return true;
    }
    g_->state([&] { return g_->what(*st_); });
    g_->check_not_overdue(*st_);
    return false;
  }

  void wait() override {
    ensure_launched();
    if (st_->host_visible) {
      g_->host_wait(*st_);
    } else {
      g_->state([&] { return g_->what(*st_); });
      g_->check_not_overdue(*st_);
      st_->done->wait_on(cuda::current_stream());
    }
    complete_ = true;
  }

 private:
  void ensure_launched() {
    if (!st_->done) flush_queued(*g_->lane);
  }

  std::shared_ptr<NcclGroup> g_;
  std::shared_ptr<OpState> st_;
  bool complete_ = false;
};

CommHandle make_handle(const std::shared_ptr<NcclGroup>& g, std::shared_ptr<OpState> op) {
  return CommHandle(std::make_unique<NcclOp>(g, std::move(op)));
}

// Byte offsets and sizes of the per-peer chunks of an all_to_all_v buffer.
struct Chunks {
  std::vector<size_t> offset, bytes;
};

Chunks make_chunks(const NcclGroup& g, std::span<const int64_t> counts, const Tensor& t, std::string_view side) {
  const int n = g.size();
  check(static_cast<int>(counts.size()) == n, "comm all_to_all_v", [&] {
    return std::string(side) + " counts have " + std::to_string(counts.size()) + " entries for group '" + g.name +
           "' of " + std::to_string(n);
  });
  int64_t total = 0;
  for (int p = 0; p < n; ++p) {
    check(counts[p] >= 0, "comm all_to_all_v",
          [&] { return std::string(side) + " count for peer " + std::to_string(p) + " is negative"; });
    total += counts[p];
  }
  check(total <= t.dim(0), "comm all_to_all_v", [&] {
    return std::string(side) + " counts add up to " + std::to_string(total) + " rows but the tensor is " + t.describe();
  });
  const size_t row_bytes = static_cast<size_t>(row_elements(t)) * dtype_size(t.dtype());
  Chunks c;
  c.offset.resize(static_cast<size_t>(n));
  c.bytes.resize(static_cast<size_t>(n));
  size_t offset = 0;
  for (int p = 0; p < n; ++p) {
    c.offset[p] = offset;
    c.bytes[p] = static_cast<size_t>(counts[p]) * row_bytes;
    offset += c.bytes[p];
  }
  return c;
}

}  // namespace

// ---- the communicator -------------------------------------------------------------------------

NcclCommunicator::NcclCommunicator(std::shared_ptr<NcclGroup> group) : g_(std::move(group)) {}
NcclCommunicator::~NcclCommunicator() = default;

int NcclCommunicator::rank() const {
  return g_->rank;
}
int NcclCommunicator::size() const {
  return g_->size();
}
const std::string& NcclCommunicator::name() const {
  return g_->name;
}
const std::vector<int>& NcclCommunicator::world_ranks() const {
  return g_->world_ranks;
}
double NcclCommunicator::timeout_s() const {
  return g_->timeout_s;
}
cudaStream_t NcclCommunicator::stream() const {
  return g_->s();
}
int NcclCommunicator::device() const {
  return g_->device;
}

CommHandle NcclCommunicator::all_reduce(const Tensor& t) {
  NcclGroup& g = *g_;
  g.check_tensor(t, "all_reduce", "tensor");
  check_reducible(t, "all_reduce");
  g.check_current_device("all_reduce");
  auto op = g.collective("all_reduce");
  const size_t n = static_cast<size_t>(t.numel());
  if (t.dtype() == DType::bf16) {
    Tensor wide = t.to(DType::f32);  // on the compute stream, before the call's event
    op->keep_alive = {t, wide};
    g.launch(
        *op,
        [&] { return n ? ncclAllReduce(wide.raw(), wide.raw(), n, ncclFloat32, ncclSum, g.comm, g.s()) : ncclSuccess; },
        [&] { cuda::convert_elements(wide.raw(), DType::f32, t.raw(), DType::bf16, t.numel()); });
  } else {
    op->keep_alive = {t};
    const ncclDataType_t type = sum_type(t.dtype());
    g.launch(*op, [&] { return n ? ncclAllReduce(t.raw(), t.raw(), n, type, ncclSum, g.comm, g.s()) : ncclSuccess; },
             {});
  }
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::reduce_scatter(const Tensor& in, const Tensor& out) {
  NcclGroup& g = *g_;
  g.check_tensor(in, "reduce_scatter", "in");
  g.check_tensor(out, "reduce_scatter", "out");
  check_reducible(in, "reduce_scatter");
  check_same_layout(in, out, "reduce_scatter");
  check(in.dim(0) == size() * out.dim(0), "comm reduce_scatter", [&] {
    return "in " + in.describe() + " must have " + std::to_string(size()) + " x the rows of out " + out.describe();
  });
  // NCCL allows out to be this rank's chunk of in (in place), no other overlap.
  const bool in_place = bytes_at(out, 0) == bytes_at(in, static_cast<size_t>(rank()) * out.nbytes());
  check(in_place || !overlap(in, out), "comm reduce_scatter",
        [&] { return "out overlaps in other than as this rank's chunk of in"; });
  g.check_current_device("reduce_scatter");
  auto op = g.collective("reduce_scatter");
  const size_t count = static_cast<size_t>(out.numel());
  if (in.dtype() == DType::bf16) {
    Tensor wide_in = in.to(DType::f32);
    Tensor wide_out = Tensor::empty(out.shape(), DType::f32, Device::cuda);
    op->keep_alive = {in, out, wide_in, wide_out};
    g.launch(
        *op,
        [&] {
          return count ? ncclReduceScatter(wide_in.raw(), wide_out.raw(), count, ncclFloat32, ncclSum, g.comm, g.s())
                       : ncclSuccess;
        },
        [&] { cuda::convert_elements(wide_out.raw(), DType::f32, out.raw(), DType::bf16, out.numel()); });
  } else {
    op->keep_alive = {in, out};
    const ncclDataType_t type = sum_type(in.dtype());
    g.launch(*op,
             [&] {
               return count ? ncclReduceScatter(in.raw(), out.raw(), count, type, ncclSum, g.comm, g.s()) : ncclSuccess;
             },
             {});
  }
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::all_gather(const Tensor& in, const Tensor& out) {
  NcclGroup& g = *g_;
  g.check_tensor(in, "all_gather", "in");
  g.check_tensor(out, "all_gather", "out");
  check_same_layout(in, out, "all_gather");
  check(out.dim(0) == size() * in.dim(0), "comm all_gather", [&] {
    return "out " + out.describe() + " must have " + std::to_string(size()) + " x the rows of in " + in.describe();
  });
  // `in` may already be this rank's chunk of `out` (ZeRO keeps its shard there): NCCL's in-place
  // all-gather; any other overlap is refused.
  const bool in_place = bytes_at(in, 0) == bytes_at(out, static_cast<size_t>(rank()) * in.nbytes());
  check(in_place || !overlap(in, out), "comm all_gather",
        [&] { return "in overlaps out other than as this rank's chunk of out"; });
  g.check_current_device("all_gather");
  auto op = g.collective("all_gather");
  op->keep_alive = {in, out};
  const size_t bytes = in.nbytes();
  g.launch(*op,
           [&] { return bytes ? ncclAllGather(in.raw(), out.raw(), bytes, ncclUint8, g.comm, g.s()) : ncclSuccess; },
           {});
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::all_to_all_v(const Tensor& send, std::span<const int64_t> send_counts, const Tensor& recv,
                                          std::span<const int64_t> recv_counts) {
  NcclGroup& g = *g_;
  g.check_tensor(send, "all_to_all_v", "send");
  g.check_tensor(recv, "all_to_all_v", "recv");
  check_same_layout(send, recv, "all_to_all_v");
  const Chunks out = make_chunks(g, send_counts, send, "send");
  const Chunks in = make_chunks(g, recv_counts, recv, "recv");
  const int me = rank();
  // This rank's own rows are copied locally, so the two counts must agree (checked here rather
  // than left to a transfer that would hang or truncate).
  check(send_counts[me] == recv_counts[me], "comm all_to_all_v", [&] {
    return "rank " + std::to_string(me) + " of group '" + name() + "' sends " + std::to_string(send_counts[me]) +
           " rows to itself but expects to receive " + std::to_string(recv_counts[me]);
  });
  check(!overlap(send, recv), "comm all_to_all_v", "send and recv overlap");
  g.check_current_device("all_to_all_v");
  auto op = g.collective("all_to_all_v");
  op->keep_alive = {send, recv};
  g.launch(
      *op,
      [&] {
        return grouped([&] {
          for (int p = 0; p < size(); ++p) {
            if (p == me) continue;
            if (out.bytes[p]) {
              const ncclResult_t r = ncclSend(bytes_at(send, out.offset[p]), out.bytes[p], ncclUint8, p, g.comm, g.s());
              if (is_failure(r)) return r;
            }
            if (in.bytes[p]) {
              const ncclResult_t r =
                  ncclRecv(mutable_bytes_at(recv, in.offset[p]), in.bytes[p], ncclUint8, p, g.comm, g.s());
              if (is_failure(r)) return r;
            }
          }
          return ncclSuccess;
        });
      },
      [&] {
        if (out.bytes[me] == 0) return;
        DSX_CUDA_CHECK(cudaMemcpyAsync(mutable_bytes_at(recv, in.offset[me]), bytes_at(send, out.offset[me]),
                                       out.bytes[me], cudaMemcpyDeviceToDevice, g.s()));
      });
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::send(const Tensor& t, int peer, int tag) {
  NcclGroup& g = *g_;
  g.check_tensor(t, "send", "tensor");
  g.check_peer(peer, tag, "send");
  g.check_current_device("send");
  auto op = g.point_to_point("send", peer);
  op->keep_alive = {t};
  g.queue(g_, op, true, t.raw(), t.nbytes(), peer);
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::recv(const Tensor& t, int peer, int tag) {
  NcclGroup& g = *g_;
  g.check_tensor(t, "recv", "tensor");
  g.check_peer(peer, tag, "recv");
  g.check_current_device("recv");
  auto op = g.point_to_point("recv", peer);
  op->keep_alive = {t};
  g.queue(g_, op, false, t.raw(), t.nbytes(), peer);
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::broadcast(const Tensor& t, int root) {
  NcclGroup& g = *g_;
  g.check_tensor(t, "broadcast", "tensor");
  check(root >= 0 && root < size(), "comm broadcast", [&] {
    return "root " + std::to_string(root) + " is outside group '" + name() + "' of " + std::to_string(size());
  });
  g.check_current_device("broadcast");
  auto op = g.collective("broadcast");
  op->keep_alive = {t};
  const size_t bytes = t.nbytes();
  g.launch(*op,
           [&] { return bytes ? ncclBroadcast(t.raw(), t.raw(), bytes, ncclUint8, root, g.comm, g.s()) : ncclSuccess; },
           {});
  return make_handle(g_, std::move(op));
}

CommHandle NcclCommunicator::barrier() {
  NcclGroup& g = *g_;
  g.check_current_device("barrier");
  auto op = g.collective("barrier");
  op->host_visible = true;  // a barrier is a statement about the host: every rank got here
  Tensor token = Tensor::zeros({1}, DType::f32, Device::cuda);
  op->keep_alive = {token};
  g.launch(*op, [&] { return ncclAllReduce(token.raw(), token.raw(), 1, ncclFloat32, ncclSum, g.comm, g.s()); }, {});
  return make_handle(g_, std::move(op));
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::split(const std::string& new_name,
                                                          const std::vector<int>& members) {
  NcclGroup& g = *g_;
  const int me = g.world_rank();
  const auto it = std::find(members.begin(), members.end(), me);
  check(it != members.end(), "comm split", [&] {
    return "world rank " + std::to_string(me) + " is not among the members " + rank_list(members) +
           " of its own group '" + new_name + "'";
  });
  std::vector<int> sorted = members;
  std::sort(sorted.begin(), sorted.end());
  check(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end(), "comm split",
        [&] { return "group '" + new_name + "' lists a rank twice: " + rank_list(members); });
  for (int m : members) {
    check(std::find(g.world_ranks.begin(), g.world_ranks.end(), m) != g.world_ranks.end(), "comm split", [&] {
      return "world rank " + std::to_string(m) + " of group '" + new_name + "' is not in group '" + g.name + "' " +
             rank_list(g.world_ranks);
    });
  }
  g.check_current_device("split");
  flush_queued(*g.lane);
  const int color = sorted.front();  // the groups partition the parent: their smallest ranks differ
  const int key = static_cast<int>(it - members.begin());
  auto child = std::make_shared<NcclGroup>(new_name, members, key, g.timeout_s, g.device, g.lane);
  const Describe describe = [&] { return "ncclCommSplit of group '" + g.name + "' into '" + new_name + "'"; };
  ncclComm_t comm = nullptr;
  g.settle(ncclCommSplit(g.comm, color, key, &comm, nullptr), describe);  // inherits the non-blocking config
  if (!comm) g.fail(ncclInternalError, describe() + " (no communicator returned)");
  child->comm = comm;
  child->settle(ncclSuccess, describe);
  child->verify(describe());
  return std::make_unique<NcclCommunicator>(std::move(child));
}

std::unique_ptr<NcclCommunicator> make_nccl_communicator(Communicator& parent) {
  check(dynamic_cast<NcclCommunicator*>(&parent) == nullptr, "make_nccl_communicator", [&] {
    return "the parent of group '" + parent.name() +
           "' must be an MPI (host) communicator, which carries the ncclUniqueId; sub-groups of an NCCL "
           "communicator come from NcclCommunicator::split";
  });
  const int device = cuda::current_device();
  auto g = std::make_shared<NcclGroup>(parent.name(), parent.world_ranks(), parent.rank(), parent.timeout_s(), device,
                                       shared_lane(device));
  const Describe describe = [&] { return "creation of the NCCL communicator of group '" + parent.name() + "'"; };
  // The id travels as 128 bytes (an FP8 tensor is moved as bytes, never converted).
  ncclUniqueId id{};
  Tensor wire = Tensor::zeros({static_cast<int64_t>(sizeof id)}, DType::fp8_e4m3);
  if (parent.rank() == 0) {
    const ncclResult_t r = ncclGetUniqueId(&id);
    if (r != ncclSuccess) g->fail(r, describe() + " (ncclGetUniqueId)");
    std::memcpy(wire.raw(), &id, sizeof id);
  }
  parent.broadcast(wire, 0).wait();
  std::memcpy(&id, wire.raw(), sizeof id);

  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, parent.size(), id, parent.rank(), &config);
  g->comm = comm;
  if (!comm) g->fail(is_failure(r) ? r : ncclInternalError, describe());
  g->settle(r, describe);
  g->verify(describe());
  return std::make_unique<NcclCommunicator>(std::move(g));
}

MeshComms make_nccl_mesh_comms(const Mesh& mesh, Communicator& mpi_world) {
  const int world_rank = mpi_world.world_ranks()[static_cast<size_t>(mpi_world.rank())];
  if (mpi_world.size() != mesh.sizes.world() || world_rank != mesh.rank) {
    throw std::logic_error("comm: mesh of " + std::to_string(mesh.sizes.world()) + " ranks built for rank " +
                           std::to_string(mesh.rank) + " used with group '" + mpi_world.name() + "' of " +
                           std::to_string(mpi_world.size()) + " on world rank " + std::to_string(world_rank));
  }
  MeshComms c;
  std::unique_ptr<NcclCommunicator> world = make_nccl_communicator(mpi_world);
  c.tp = world->split("tp", mesh.tp_group);
  c.dp = world->split("dp", mesh.dp_group);
  c.ep = world->split("ep", mesh.ep_group);
  c.edp = world->split("edp", mesh.edp_group);
  c.pp = world->split("pp", mesh.pp_group);
  c.model = world->split("model", mesh.model_group);
  c.world = std::move(world);
  return c;
}

}  // namespace dsx
