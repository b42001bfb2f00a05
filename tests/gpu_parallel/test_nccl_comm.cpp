// The NCCL communicator (parallel/comm_nccl.h) against the MPI communicator on the same data,
// and against host computations where the expected values are known exactly.
//
// Tolerances: with one or two ranks every sum is a single IEEE addition (a + b == b + a) and
// bf16 sums are the f32 sum rounded once in both backends, so results must match the MPI ones
// bit for bit. With more ranks NCCL and MPI may sum in different orders: f32 within 1e-5
// relative to the largest value times the rank count, f64 within 1e-12, bf16 within one ulp
// (2^-7 relative). Integers and moved data (gathers, broadcasts, all-to-all, send/recv, FP8)
// are always exact.
//
// Every rank runs the same cases in the same order; comparisons use CHECK so that a failing
// rank still issues the collectives that follow.
#include <catch2/catch.hpp>

#include <chrono>
#include <cmath>
#include <cstring>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "kernels/cuda/runtime.h"
#include "nccl_env.h"
#include "parallel/mesh.h"
#include "sleep_kernel.h"
#include "support/gradcheck.h"

namespace dsx::test {
namespace {

using Catch::Matchers::Contains;
using Clock = std::chrono::steady_clock;

Communicator& mpi() {
  return *nccl_env().mpi;
}
NcclCommunicator& nccl() {
  return *nccl_env().nccl;
}

double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
}

const std::vector<DType> kSummable = {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64};
const std::vector<DType> kAll = {DType::f32, DType::f64,      DType::bf16,    DType::i32,
                                 DType::i64, DType::fp8_e4m3, DType::fp8_e5m2};

bool is_integer(DType d) {
  return d == DType::i32 || d == DType::i64;
}

// Random host data of world rank `rank` (any rank can rebuild any other's): integers in
// [-1000, 1000], floats in [-1, 1).
Tensor rank_data(const Shape& shape, DType d, uint64_t seed, int rank) {
  const uint64_t s = seed * 7919 + static_cast<uint64_t>(rank) + 1;
  if (is_integer(d)) return random_tensor(shape, DType::f64, s, -1000, 1000).to(d);
  return random_tensor(shape, d, s);
}
Tensor my_data(const Shape& shape, DType d, uint64_t seed) {
  return rank_data(shape, d, seed, mpi().rank());
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const Tensor x = a.to(Device::cpu), y = b.to(Device::cpu);
  return x.nbytes() == 0 || std::memcmp(x.raw(), y.raw(), x.nbytes()) == 0;
}

// A sum computed by NCCL vs the same sum by MPI (see the tolerances at the top).
bool same_sum(const Tensor& got, const Tensor& want) {
  if (mpi().size() <= 2 || is_integer(want.dtype())) return same_bytes(got, want);
  if (got.shape() != want.shape() || got.dtype() != want.dtype()) return false;
  const auto a = got.to_vector(), b = want.to_vector();
  double scale = 1, err = 0;
  for (double v : b) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < a.size(); ++i) err = std::max(err, std::abs(a[i] - b[i]));
  const double tol = want.dtype() == DType::f64 ? 1e-12 : want.dtype() == DType::f32 ? 1e-5 * mpi().size() : 1.0 / 128;
  return err <= tol * scale;
}

std::string label(const char* op, DType d, const Shape& shape) {
  return std::string(op) + " " + std::string(dtype_name(d)) + shape_str(shape) + " on rank " +
         std::to_string(mpi().rank()) + " of " + std::to_string(mpi().size());
}

TEST_CASE("nccl: the communicator mirrors its MPI parent", "[gpu][nccl]") {
  CHECK(nccl().rank() == mpi().rank());
  CHECK(nccl().size() == mpi().size());
  CHECK(nccl().name() == mpi().name());
  CHECK(nccl().world_ranks() == mpi().world_ranks());
  CHECK(nccl().timeout_s() == mpi().timeout_s());
  CHECK(nccl().device() == cuda::current_device());
  CHECK(nccl().stream() != nullptr);
  CHECK(nccl().stream() != cuda::current_stream());  // transfers have their own stream
}

TEST_CASE("nccl: all_reduce matches the MPI communicator", "[gpu][nccl]") {
  uint64_t seed = 100;
  for (DType d : kSummable) {
    for (const Shape& shape : std::vector<Shape>{{1}, {7, 3}, {1000}, {4099, 33}, {0, 5}}) {
      const Tensor host = my_data(shape, d, ++seed);
      Tensor want = host.clone();
      mpi().all_reduce(want).wait();
      Tensor dev = host.to(Device::cuda);
      nccl().all_reduce(dev).wait();
      INFO(label("all_reduce", d, shape));
      CHECK(same_sum(dev, want));
    }
  }
}

TEST_CASE("nccl: reduce_scatter matches the MPI communicator", "[gpu][nccl]") {
  const int n = mpi().size(), me = mpi().rank();
  uint64_t seed = 200;
  for (DType d : kSummable) {
    for (int64_t rows : {1, 5}) {
      for (int64_t width : {3, 129}) {
        const Shape in_shape{n * rows, width};
        const Tensor host = my_data(in_shape, d, ++seed);
        Tensor want = Tensor::zeros({rows, width}, d);
        mpi().reduce_scatter(host, want).wait();

        const Tensor dev_in = host.to(Device::cuda);
        Tensor dev_out = Tensor::zeros({rows, width}, d, Device::cuda);
        nccl().reduce_scatter(dev_in, dev_out).wait();
        INFO(label("reduce_scatter", d, in_shape));
        CHECK(same_sum(dev_out, want));

        // In place: out is this rank's chunk of in (NCCL's in-place form).
        Tensor dev_inout = host.to(Device::cuda);
        Tensor chunk = dev_inout.slice(me * rows, (me + 1) * rows);
        nccl().reduce_scatter(dev_inout, chunk).wait();
        INFO("in place");
        CHECK(same_sum(chunk, want));
      }
    }
  }
}

TEST_CASE("nccl: all_gather matches the MPI communicator", "[gpu][nccl]") {
  const int n = mpi().size(), me = mpi().rank();
  uint64_t seed = 300;
  for (DType d : kAll) {
    for (int64_t rows : {1, 3}) {
      for (int64_t width : {5, 130}) {
        const Tensor host = my_data({rows, width}, d, ++seed);
        Tensor want = Tensor::zeros({n * rows, width}, d);
        mpi().all_gather(host, want).wait();

        Tensor dev_out = Tensor::zeros({n * rows, width}, d, Device::cuda);
        nccl().all_gather(host.to(Device::cuda), dev_out).wait();
        INFO(label("all_gather", d, host.shape()));
        CHECK(same_bytes(dev_out, want));

        // In place: in is already this rank's chunk of out (how ZeRO keeps its shard).
        Tensor dev_inplace = Tensor::zeros({n * rows, width}, d, Device::cuda);
        Tensor mine = dev_inplace.slice(me * rows, (me + 1) * rows);
        mine.copy_from(host);
        nccl().all_gather(mine, dev_inplace).wait();
        INFO("in place");
        CHECK(same_bytes(dev_inplace, want));
      }
    }
  }
}

TEST_CASE("nccl: broadcast matches the MPI communicator", "[gpu][nccl]") {
  uint64_t seed = 400;
  for (int root = 0; root < mpi().size(); ++root) {
    for (DType d : kAll) {
      const Tensor host = my_data({257, 3}, d, ++seed);
      Tensor want = host.clone();
      mpi().broadcast(want, root).wait();
      Tensor dev = host.to(Device::cuda);
      nccl().broadcast(dev, root).wait();
      INFO(label("broadcast", d, host.shape()) << " from root " << root);
      CHECK(same_bytes(dev, want));
      CHECK(same_bytes(dev, rank_data({257, 3}, d, seed, root)));
    }
  }
}

// Rows rank `src` sends to rank `dst` in each pattern: uneven, with zeros, including to itself.
int64_t rows_sent(int pattern, int src, int dst) {
  switch (pattern) {
    case 0:
      return (3 * src + 5 * dst + 1) % 4;  // 0..3, zeros among them for two ranks or more
    case 1:
      return 0;  // nothing at all
    case 2:
      return src == dst ? 0 : 37 + src;  // nothing to itself, many rows to the others
    default:
      return src == dst ? 5 : 0;  // only to itself
  }
}

// Element j of row i of the chunk src sends to dst: exact in f32 (< 2^24) and i64.
double a2a_value(int src, int dst, int64_t i, int64_t j) {
  return static_cast<double>(((src * 8 + dst) * 64 + i) * 256 + j);
}

TEST_CASE("nccl: all_to_all_v with uneven per-peer counts and zeros", "[gpu][nccl]") {
  const int n = mpi().size(), me = mpi().rank();
  for (int pattern = 0; pattern < 4; ++pattern) {
    for (DType d : {DType::f32, DType::bf16, DType::fp8_e4m3, DType::i64, DType::f64}) {
      for (int64_t width : {1, 129}) {
        std::vector<int64_t> send_counts(n), recv_counts(n);
        for (int p = 0; p < n; ++p) {
          send_counts[p] = rows_sent(pattern, me, p);
          recv_counts[p] = rows_sent(pattern, p, me);
        }
        const int64_t send_rows = std::accumulate(send_counts.begin(), send_counts.end(), int64_t{0});
        const int64_t recv_rows = std::accumulate(recv_counts.begin(), recv_counts.end(), int64_t{0});
        // Spare rows at the end of both: never sent, never written.
        std::vector<double> values;
        for (int p = 0; p < n; ++p)
          for (int64_t i = 0; i < send_counts[p]; ++i)
            for (int64_t j = 0; j < width; ++j) values.push_back(a2a_value(me, p, i, j));
        values.resize(static_cast<size_t>((send_rows + 2) * width), -3.0);
        const Tensor send = Tensor::from<double>(values, {send_rows + 2, width}).to(d);
        const Tensor sentinel = Tensor::full({recv_rows + 3, width}, -7.0, d);

        Tensor want = sentinel.clone();
        mpi().all_to_all_v(send, send_counts, want, recv_counts).wait();
        Tensor dev_recv = sentinel.to(Device::cuda);
        nccl().all_to_all_v(send.to(Device::cuda), send_counts, dev_recv, recv_counts).wait();
        INFO(label("all_to_all_v", d, send.shape()) << " pattern " << pattern);
        CHECK(same_bytes(dev_recv, want));

        if (d == DType::f32 || d == DType::i64 || d == DType::f64) {  // exact values: check the layout itself
          std::vector<double> expect;
          for (int q = 0; q < n; ++q)
            for (int64_t i = 0; i < recv_counts[q]; ++i)
              for (int64_t j = 0; j < width; ++j) expect.push_back(a2a_value(q, me, i, j));
          expect.resize(static_cast<size_t>((recv_rows + 3) * width), -7.0);
          CHECK(dev_recv.to_vector() == expect);
        }
      }
    }
  }
}

TEST_CASE("nccl: send and recv around a ring, all posted before any wait", "[gpu][nccl]") {
  // Every rank sends to the next and receives from the previous (itself with one rank). Posted
  // one by one these would deadlock for large messages; the communicator groups them.
  const int n = mpi().size(), me = mpi().rank();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  struct Message {
    Shape shape;
    DType dtype;
  };
  const std::vector<Message> messages = {
      {{300}, DType::f32}, {{5, 7}, DType::bf16}, {{1 << 22}, DType::f32}, {{33}, DType::fp8_e5m2}, {{0}, DType::i64}};
  std::vector<Tensor> outgoing, incoming;
  std::vector<CommHandle> handles;
  for (size_t k = 0; k < messages.size(); ++k) {
    outgoing.push_back(rank_data(messages[k].shape, messages[k].dtype, 500 + k, me).to(Device::cuda));
    handles.push_back(nccl().send(outgoing.back(), next, 0));
  }
  for (const Message& m : messages) {
    incoming.push_back(Tensor::zeros(m.shape, m.dtype, Device::cuda));
    handles.push_back(nccl().recv(incoming.back(), prev, 0));
  }
  for (CommHandle& h : handles) h.wait();
  for (size_t k = 0; k < messages.size(); ++k) {
    INFO("message " << k << " " << shape_str(messages[k].shape) << " from rank " << prev);
    CHECK(same_bytes(incoming[k], rank_data(messages[k].shape, messages[k].dtype, 500 + k, prev)));
  }

  // A collective issued while sends and receives are still unlaunched goes after them.
  Tensor a = rank_data({64}, DType::f32, 600, me).to(Device::cuda);
  Tensor b = Tensor::zeros({64}, DType::f32, Device::cuda);
  CommHandle hs = nccl().send(a, next);
  CommHandle hr = nccl().recv(b, prev);
  Tensor sum = Tensor::full({4}, 1.0, DType::i64).to(Device::cuda);
  nccl().all_reduce(sum).wait();
  hs.wait();
  hr.wait();
  CHECK(sum.to_vector() == std::vector<double>(4, n));
  CHECK(same_bytes(b, rank_data({64}, DType::f32, 600, prev)));
}

// The value every rank of `members` contributes is world rank + 1; the sum is over the members.
void check_group(Communicator& c, const std::vector<int>& members, const std::string& what) {
  INFO("group " << what << " on world rank " << mpi().rank());
  const int me = mpi().rank();
  CHECK(c.name() == what);
  CHECK(c.size() == static_cast<int>(members.size()));
  CHECK(c.world_ranks() == members);
  const auto it = std::find(members.begin(), members.end(), me);
  CHECK(c.rank() == static_cast<int>(it - members.begin()));
  Tensor t = Tensor::full({3}, me + 1, DType::i64).to(Device::cuda);
  c.all_reduce(t).wait();
  int64_t want = 0;
  for (int m : members) want += m + 1;
  CHECK(t.to_vector() == std::vector<double>(3, static_cast<double>(want)));
}

TEST_CASE("nccl: sub-groups split from the world follow the mesh", "[gpu][nccl]") {
  const int n = mpi().size(), me = mpi().rank();
  std::vector<MeshSizes> layouts = {{.dp = n, .ep = 1}, {.dp = n, .ep = n}};
  if (n % 2 == 0) {
    layouts.push_back({.dp = n / 2, .tp = 2, .ep = 1});
    layouts.push_back({.pp = 2, .dp = n / 2, .ep = n / 2});
  }
  for (const MeshSizes& sizes : layouts) {
    INFO("layout " << describe_mesh(sizes));
    const Mesh mesh = build_mesh(sizes, me);
    MeshComms c = make_nccl_mesh_comms(mesh, mpi());
    check_group(*c.world, mpi().world_ranks(), "world");
    check_group(*c.tp, mesh.tp_group, "tp");
    check_group(*c.dp, mesh.dp_group, "dp");
    check_group(*c.ep, mesh.ep_group, "ep");
    check_group(*c.edp, mesh.edp_group, "edp");
    check_group(*c.pp, mesh.pp_group, "pp");
    check_group(*c.model, mesh.model_group, "model");
  }

  // By hand: ranks of the same parity, listed in reverse (group rank order is the list's).
  std::vector<int> same_parity;
  for (int r = n - 1; r >= 0; --r)
    if (r % 2 == me % 2) same_parity.push_back(r);
  auto parity = nccl().split("parity", same_parity);
  check_group(*parity, same_parity, "parity");
  auto alone = parity->split("alone", {me});  // a split of a split
  check_group(*alone, {me}, "alone");
}

TEST_CASE("nccl: the transfer sees the compute issued before it", "[gpu][nccl]") {
  // The fill runs on the compute stream after a 200 ms kernel; a transfer that did not wait for
  // the compute stream would sum zeros.
  const int n = mpi().size(), me = mpi().rank();
  Tensor x = Tensor::zeros({1 << 20}, DType::f32, Device::cuda);
  gpu_sleep(cuda::current_stream(), 200);
  x.fill(me + 1);
  nccl().all_reduce(x).wait();
  const auto v = x.to_vector();
  const double want = n * (n + 1) / 2.0;
  CHECK(std::all_of(v.begin(), v.end(), [&](double e) { return e == want; }));
}

// [timing]: left out where two ranks time-slice one GPU (gpu.nccl_comm_np2_one_gpu).
TEST_CASE("nccl: a transfer completes while a kernel occupies the compute stream", "[gpu][nccl][timing]") {
  const Tensor host = my_data({1 << 22}, DType::f32, 700);
  Tensor want = host.clone();
  mpi().all_reduce(want).wait();
  Tensor x = host.to(Device::cuda);
  cuda::synchronize_current_stream();  // x is in place before the clock starts

  CommHandle h = nccl().all_reduce(x);
  gpu_sleep(cuda::current_stream(), 3000);  // compute issued after the call: it must not delay it
  cuda::Event kernel_done;
  kernel_done.record(cuda::current_stream());
  const auto start = Clock::now();
  while (!h.test() && seconds_since(start) < 30) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  const bool finished_early = h.done();
  const bool kernel_still_running = !kernel_done.query();
  INFO("all_reduce completed after " << seconds_since(start) << " s");
  CHECK(finished_early);
  CHECK(kernel_still_running);
  h.wait();
  kernel_done.synchronize();
  CHECK(same_sum(x, want));
}

TEST_CASE("nccl: wait() orders the compute stream without blocking the host", "[gpu][nccl]") {
  const int n = mpi().size();
  const Tensor host = my_data({1000}, DType::f32, 800);
  Tensor want = Tensor::zeros({n * 1000}, DType::f32);
  mpi().all_gather(host, want).wait();
  const Tensor in = host.to(Device::cuda);
  Tensor out = Tensor::zeros({n * 1000}, DType::f32, Device::cuda);
  nccl().all_gather(in, out).wait();  // warm-up: NCCL connects lazily on first use
  out.zero();

  gpu_sleep(nccl().stream(), 500);  // the communication stream is busy for 500 ms
  CommHandle h = nccl().all_gather(in, out);
  CHECK_FALSE(h.test());  // test() is an event query: not done behind the kernel
  const auto start = Clock::now();
  h.wait();
  const double waited = seconds_since(start);
  INFO("wait() took " << waited << " s");
  CHECK(waited < 0.25);
  // The copy to the host runs on the compute stream, which wait() made follow the transfer.
  CHECK(same_bytes(out, want));
}

TEST_CASE("nccl: barrier's wait blocks the host until every rank arrived", "[gpu][nccl]") {
  gpu_sleep(nccl().stream(), 300);
  const auto start = Clock::now();
  nccl().barrier().wait();
  CHECK(seconds_since(start) >= 0.25);
}

TEST_CASE("nccl: bad input is refused with a clear message", "[gpu][nccl]") {
  const int n = mpi().size(), me = mpi().rank();
  NcclCommunicator& c = nccl();
  const Tensor host = Tensor::zeros({4}, DType::f32);
  const Tensor gpu = Tensor::zeros({4}, DType::f32, Device::cuda);
  const Tensor gpu_fp8 = Tensor::zeros({2 * n, 4}, DType::fp8_e4m3, Device::cuda);

  CHECK_THROWS_WITH(c.all_reduce(host), Contains("comm all_reduce: tensor f32[4] cpu is in host memory") &&
                                            Contains("moves GPU tensors only"));
  CHECK_THROWS_WITH(c.all_reduce(Tensor()), Contains("tensor is undefined"));
  CHECK_THROWS_WITH(c.all_reduce(gpu_fp8), Contains("cannot sum fp8_e4m3"));
  CHECK_THROWS_WITH(c.reduce_scatter(gpu_fp8, Tensor::zeros({2, 4}, DType::fp8_e4m3, Device::cuda)),
                    Contains("cannot sum"));
  CHECK_THROWS_WITH(c.reduce_scatter(Tensor::zeros({n * 2 + 1, 4}, DType::f32, Device::cuda),
                                     Tensor::zeros({2, 4}, DType::f32, Device::cuda)),
                    Contains("x the rows of out"));
  CHECK_THROWS_WITH(c.reduce_scatter(gpu, host), Contains("out f32[4] cpu is in host memory"));
  CHECK_THROWS_WITH(c.all_gather(gpu, Tensor::zeros({n * 4 + 1}, DType::f32, Device::cuda)),
                    Contains("x the rows of in"));
  CHECK_THROWS_WITH(c.all_gather(gpu, Tensor::zeros({n * 4}, DType::bf16, Device::cuda)), Contains("dtypes differ"));
  CHECK_THROWS_WITH(c.broadcast(gpu, n), Contains("root " + std::to_string(n) + " is outside group 'world'"));
  CHECK_THROWS_WITH(c.send(gpu, -1), Contains("peer -1 is outside group"));
  CHECK_THROWS_WITH(c.recv(gpu, 0, 40000), Contains("tag 40000 is outside [0, 32767]"));
  CHECK_THROWS_WITH(c.send(host, 0), Contains("is in host memory"));

  const Tensor rows = Tensor::zeros({6, 2}, DType::f32, Device::cuda);
  const std::vector<int64_t> ones(n, 1), short_counts(n + 1, 0);
  std::vector<int64_t> negative(n, 0), too_many(n, 0), self_mismatch(n, 0);
  negative[0] = -1;
  too_many[0] = 7;
  self_mismatch[me] = 1;
  CHECK_THROWS_WITH(c.all_to_all_v(rows, short_counts, rows.clone(), ones), Contains("send counts have"));
  CHECK_THROWS_WITH(c.all_to_all_v(rows, ones, rows.clone(), negative), Contains("recv count for peer 0 is negative"));
  CHECK_THROWS_WITH(c.all_to_all_v(rows, too_many, rows.clone(), ones), Contains("send counts add up to 7 rows"));
  CHECK_THROWS_WITH(c.all_to_all_v(rows, self_mismatch, rows.clone(), std::vector<int64_t>(n, 0)),
                    Contains("sends 1 rows to itself but expects to receive 0"));
  CHECK_THROWS_WITH(c.all_to_all_v(rows, ones, rows, ones), Contains("send and recv overlap"));
  CHECK_THROWS_WITH(c.all_to_all_v(rows, ones, Tensor::zeros({6, 3}, DType::f32, Device::cuda), ones),
                    Contains("row shapes differ"));

  CHECK_THROWS_WITH(c.split("g", {me + n}), Contains("is not among the members"));
  CHECK_THROWS_WITH(c.split("g", {me, me}), Contains("lists a rank twice"));
  CHECK_THROWS_WITH(c.split("g", {me, n + 3}),
                    Contains("world rank " + std::to_string(n + 3) + " of group 'g' is not in group 'world'"));
  CHECK_THROWS_WITH(make_nccl_communicator(c), Contains("must be an MPI (host) communicator"));

  // The MPI communicator refuses GPU tensors the same way.
  CHECK_THROWS_WITH(mpi().all_reduce(gpu), Contains("is on the GPU; the MPI communicator moves host tensors only"));
  CHECK_THROWS_WITH(mpi().all_to_all_v(rows, ones, rows.to(Device::cpu), ones),
                    Contains("send f32[6, 2] cuda is on the GPU"));

  // Nothing above started an operation: the communicator still works.
  Tensor t = Tensor::full({2}, 1.0, DType::f32).to(Device::cuda);
  c.all_reduce(t).wait();
  CHECK(t.to_vector() == std::vector<double>(2, n));
}

}  // namespace
}  // namespace dsx::test
