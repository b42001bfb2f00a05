// Multi-rank checks of the MPI communicator, run under mpirun by ctest (parallel_tests.cmake).
//
//   comm_check collectives            every operation on the world and on mesh groups, against
//                                     values each rank computes itself (it knows what every rank
//                                     contributed: data is a function of (world rank, index))
//   comm_check skip RANK TIMEOUT_S    RANK skips an all_reduce and stays busy; the others must
//                                     time out, name RANK, and end the job
//   comm_check kill RANK TIMEOUT_S    RANK SIGKILLs itself after starting an all_reduce
//   comm_check world-size             a layout that does not match the world is refused on
//                                     every rank with dsx::UserError
//
// Exit status 0 when every check passed on every rank.
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include <mpi.h>

#include "kernels/error.h"
#include "parallel/comm_mpi.h"
#include "parallel/mesh.h"

using namespace dsx;

namespace {

int g_world_rank = 0;
int g_checks = 0;
int g_failures = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "rank %d: FAILED %s\n", g_world_rank, what.c_str());
  }
}

// Compares element by element, exactly: every value below is chosen so sums are exact in the
// dtype the sum is computed in (small integers, or bf16 values whose f32 sum is exact).
void expect_values(const Tensor& got, const std::vector<double>& want, const std::string& what) {
  const std::vector<double> g = got.to_vector();
  if (g.size() != want.size()) {
    expect(false, what + ": " + std::to_string(g.size()) + " elements, expected " + std::to_string(want.size()));
    return;
  }
  for (size_t i = 0; i < g.size(); ++i) {
    if (g[i] != want[i]) {
      expect(false, what + ": element " + std::to_string(i) + " is " + std::to_string(g[i]) + ", expected " +
                        std::to_string(want[i]));
      return;
    }
  }
  expect(true, what);
}

// The value world rank r contributes at flat index i, as stored in dtype d.
double contribution(DType d, int r, int64_t i) {
  switch (d) {
    case DType::bf16: {
      // Fractions with up to 9 significant bits spanning ~17 binades: a per-step bf16 sum
      // would round, the f32 sum of <= 4 of them is exact.
      const float v = 0.37f * static_cast<float>(r + 1) + 0.013f * static_cast<float>(i % 50);
      return static_cast<double>(static_cast<float>(bf16(v)));
    }
    case DType::i64:
      return static_cast<double>((int64_t{1} << 33) * (r + 1) + i);  // needs 64 bits
    default:
      return static_cast<double>((r * 7 + i * 3) % 19) - 9.0;
  }
}

Tensor make_contribution(DType d, int r, const Shape& shape, int64_t offset = 0) {
  Tensor t = Tensor::empty(shape, d);
  Tensor f64 = Tensor::empty(shape, DType::f64);
  double* p = f64.data<double>();
  for (int64_t i = 0; i < f64.numel(); ++i) p[i] = contribution(d, r, offset + i);
  t.copy_from(f64);
  return t;
}

// Expected bf16 result: the exact sum rounded once to bf16.
double as_dtype(DType d, double v) {
  if (d == DType::bf16) return static_cast<double>(static_cast<float>(bf16(static_cast<float>(v))));
  return v;
}

const std::vector<DType> kAllTypes = {DType::f32, DType::f64, DType::bf16, DType::i32, DType::i64};

std::string label(const Communicator& c, const std::string& op, DType d) {
  return "group '" + c.name() + "' " + op + " " + std::string(dtype_name(d));
}

void check_all_reduce(Communicator& c) {
  for (DType d : kAllTypes) {
    const Shape shape{250, 4};
    Tensor t = make_contribution(d, g_world_rank, shape);
    c.all_reduce(t).wait();
    std::vector<double> want(1000, 0.0);
    for (size_t i = 0; i < want.size(); ++i) {
      for (int r : c.world_ranks()) want[i] += contribution(d, r, static_cast<int64_t>(i));
      want[i] = as_dtype(d, want[i]);
    }
    expect_values(t, want, label(c, "all_reduce", d));
  }
}

void check_reduce_scatter(Communicator& c) {
  const int64_t rows = 5, cols = 3;
  for (DType d : kAllTypes) {
    Tensor in = make_contribution(d, g_world_rank, {c.size() * rows, cols});
    Tensor out = Tensor::zeros({rows, cols}, d);
    c.reduce_scatter(in, out).wait();
    std::vector<double> want(rows * cols, 0.0);
    for (int64_t i = 0; i < rows * cols; ++i) {
      for (int r : c.world_ranks()) want[i] += contribution(d, r, c.rank() * rows * cols + i);
      want[i] = as_dtype(d, want[i]);
    }
    expect_values(out, want, label(c, "reduce_scatter", d));
  }
}

void check_all_gather(Communicator& c) {
  const int64_t rows = 3, cols = 2;
  for (DType d : kAllTypes) {
    for (bool in_place : {false, true}) {
      Tensor out = Tensor::zeros({c.size() * rows, cols}, d);
      Tensor mine = make_contribution(d, g_world_rank, {rows, cols});
      Tensor in = mine;
      if (in_place) {  // the local shard already sits in its chunk of the output
        in = out.slice(c.rank() * rows, (c.rank() + 1) * rows);
        in.copy_from(mine);
      }
      c.all_gather(in, out).wait();
      std::vector<double> want;
      for (int r : c.world_ranks()) {
        for (int64_t i = 0; i < rows * cols; ++i) want.push_back(contribution(d, r, i));
      }
      expect_values(out, want, label(c, in_place ? "all_gather in place" : "all_gather", d));
    }
  }
}

// Rows group rank p sends to group rank q in round `round`: uneven, and zero for some pairs
// (all of group rank 0's rows in round 1).
int64_t rows_sent(int p, int q, int round) {
  if (round == 1 && p == 0) return 0;
  return (p * 3 + q * 5 + 1) % 4;
}

// Value of column k of row j that p sends to q: identifies sender, receiver and position.
double row_value(int p, int q, int64_t j, int64_t k) {
  return p * 1000 + q * 100 + j * 10 + k;
}

void check_all_to_all(Communicator& c) {
  const int n = c.size(), me = c.rank();
  const int64_t cols = 3;
  for (int round = 0; round < 2; ++round) {
    for (DType d : {DType::f32, DType::bf16, DType::i64}) {
      std::vector<int64_t> send_counts(n);
      int64_t send_rows = 0;
      for (int q = 0; q < n; ++q) send_rows += send_counts[q] = rows_sent(me, q, round);
      const std::vector<int64_t> recv_counts = exchange_counts(c, send_counts);
      bool counts_ok = true;
      for (int p = 0; p < n; ++p) counts_ok = counts_ok && recv_counts[p] == rows_sent(p, me, round);
      expect(counts_ok, label(c, "exchange_counts round " + std::to_string(round), d));
      int64_t recv_rows = 0;
      for (int64_t k : recv_counts) recv_rows += k;

      // Rows are built in f64 and converted; bf16 holds integers exactly only up to 256, so
      // its rows use the values modulo 256.
      auto value = [&](int p, int q, int64_t j, int64_t k) {
        const double v = row_value(p, q, j, k);
        return d == DType::bf16 ? std::fmod(v, 256.0) : v;
      };
      Tensor send64 = Tensor::empty({send_rows, cols}, DType::f64);
      double* s = send64.data<double>();
      for (int q = 0; q < n; ++q) {
        for (int64_t j = 0; j < send_counts[q]; ++j) {
          for (int64_t k = 0; k < cols; ++k) *s++ = value(me, q, j, k);
        }
      }
      Tensor send = send64.to(d);
      Tensor recv = Tensor::zeros({recv_rows + 2, cols}, d);  // spare rows stay untouched
      c.all_to_all_v(send, send_counts, recv, recv_counts).wait();
      std::vector<double> want;
      for (int p = 0; p < n; ++p) {
        for (int64_t j = 0; j < recv_counts[p]; ++j) {
          for (int64_t k = 0; k < cols; ++k) want.push_back(value(p, me, j, k));
        }
      }
      want.resize(want.size() + 2 * cols, 0.0);
      expect_values(recv, want, label(c, "all_to_all_v dispatch round " + std::to_string(round), d));

      // Combine: the reverse all-to-all returns every row to its sender, in its place.
      Tensor back = Tensor::zeros({send_rows, cols}, d);
      c.all_to_all_v(recv, recv_counts, back, send_counts).wait();
      expect_values(back, send.to_vector(), label(c, "all_to_all_v combine round " + std::to_string(round), d));
    }
  }
}

void check_send_recv(Communicator& c) {
  const int n = c.size(), me = c.rank();
  const int next = (me + 1) % n, prev = (me + n - 1) % n;
  for (DType d : {DType::f32, DType::bf16, DType::i64}) {
    // Two messages on different tags, received in the opposite order from the sends.
    Tensor a = make_contribution(d, g_world_rank, {7}), b = make_contribution(d, g_world_rank, {4}, 100);
    Tensor got_a = Tensor::zeros({7}, d), got_b = Tensor::zeros({4}, d);
    CommHandle sa = c.send(a, next, 5), sb = c.send(b, next, 6);
    CommHandle rb = c.recv(got_b, prev, 6), ra = c.recv(got_a, prev, 5);
    rb.wait();
    ra.wait();
    sa.wait();
    sb.wait();
    const int prev_world = c.world_ranks()[prev];
    expect_values(got_a, make_contribution(d, prev_world, {7}).to_vector(), label(c, "send/recv tag 5", d));
    expect_values(got_b, make_contribution(d, prev_world, {4}, 100).to_vector(), label(c, "send/recv tag 6", d));
  }
}

void check_broadcast(Communicator& c) {
  const int root = c.size() - 1;
  for (DType d : kAllTypes) {
    Tensor t = make_contribution(d, g_world_rank, {6, 2});
    c.broadcast(t, root).wait();
    expect_values(t, make_contribution(d, c.world_ranks()[root], {6, 2}).to_vector(), label(c, "broadcast", d));
  }
}

// A barrier completes only after every rank entered it: rank 0 enters late, and nobody
// leaves before rank 0's entry time. CLOCK_MONOTONIC (steady_clock) is one clock for every
// process of a node; MPI_Wtime is not (it may count from each process's start).
double node_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

void check_barrier(Communicator& c) {
  Tensor entered = Tensor::zeros({1}, DType::f64);
  if (c.rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
  entered.data<double>()[0] = c.rank() == 0 ? node_seconds() : 0.0;
  c.barrier().wait();
  const double left = node_seconds();
  c.broadcast(entered, 0).wait();
  expect(left >= entered.data<double>()[0], "group '" + c.name() + "' barrier waits for the late rank");
}

// Overlap: the all-reduce runs while this rank computes, driven by test() between pieces of
// compute; the result is the same as a blocking one.
void check_overlap(Communicator& c) {
  const int64_t n = 1 << 20;
  Tensor grad = make_contribution(DType::f32, g_world_rank, {n});
  CommHandle h = c.all_reduce(grad);
  Tensor work = Tensor::full({1 << 16}, 1.0, DType::f32);
  double acc = 0;
  int polls = 0;
  for (int piece = 0; piece < 64; ++piece) {
    const float* w = work.data<float>();
    for (int64_t i = 0; i < work.numel(); ++i) acc += w[i] * 1e-6;
    ++polls;
    if (h.test()) break;
  }
  h.wait();
  expect(acc > 0 && polls > 0, "overlap compute ran");
  std::vector<double> want(n, 0.0);
  for (int64_t i = 0; i < n; ++i) {
    for (int r : c.world_ranks()) want[i] += contribution(DType::f32, r, i);
  }
  expect_values(grad, want, label(c, "overlapped all_reduce", DType::f32));
}

void check_group(Communicator& c, const std::vector<int>& expected_members, const std::string& expected_name) {
  expect(c.world_ranks() == expected_members && c.name() == expected_name,
         "group '" + c.name() + "' has the mesh's members");
  expect(c.size() == static_cast<int>(expected_members.size()) && c.world_ranks()[c.rank()] == g_world_rank,
         "group '" + c.name() + "' rank matches the world rank");
  check_all_reduce(c);
  check_reduce_scatter(c);
  check_all_gather(c);
  check_all_to_all(c);
  check_send_recv(c);
  check_broadcast(c);
}

int run_collectives(int world_size) {
  auto world = make_mpi_world_communicator(30.0);
  std::vector<int> all(world_size);
  for (int r = 0; r < world_size; ++r) all[r] = r;
  check_group(*world, all, "world");
  check_barrier(*world);
  check_overlap(*world);
  expect(world->timeout_s() == 30.0, "timeout comes from construction");

  // A split layout: DP = world with EP = 2 (DP2 x EP2 on 4 ranks, EP2 on 2).
  const MeshSizes sizes{.pp = 1, .dp = world_size, .tp = 1, .ep = 2};
  check_world_size(sizes, 8);
  const Mesh mesh = build_mesh(sizes, g_world_rank);
  MeshComms comms = make_mpi_mesh_comms(mesh, 30.0);
  check_group(*comms.dp, mesh.dp_group, "dp");
  check_group(*comms.ep, mesh.ep_group, "ep");
  check_group(*comms.edp, mesh.edp_group, "edp");
  check_barrier(*comms.ep);
  expect(comms.tp->size() == 1 && comms.pp->size() == 1 && comms.model->size() == 1,
         "tp, pp and model groups are single ranks");
  // Operations on different groups in flight at once stay apart.
  Tensor a = make_contribution(DType::f32, g_world_rank, {64}), b = make_contribution(DType::f32, g_world_rank, {64});
  CommHandle ha = comms.ep->all_reduce(a), hb = comms.edp->all_reduce(b);
  hb.wait();
  ha.wait();
  std::vector<double> want_a(64, 0.0), want_b(64, 0.0);
  for (int64_t i = 0; i < 64; ++i) {
    for (int r : mesh.ep_group) want_a[i] += contribution(DType::f32, r, i);
    for (int r : mesh.edp_group) want_b[i] += contribution(DType::f32, r, i);
  }
  expect_values(a, want_a, "concurrent all_reduce on ep");
  expect_values(b, want_b, "concurrent all_reduce on edp");

  int failures = 0;
  MPI_Allreduce(&g_failures, &failures, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  if (g_world_rank == 0) {
    std::printf("comm_check collectives: %d ranks, %d checks per rank, %d failures\n", world_size, g_checks, failures);
  }
  return failures == 0 ? 0 : 1;
}

// RANK does not join all_reduce #1; it keeps "computing" far past the timeout.
int run_skip(int victim, double timeout_s) {
  auto world = make_mpi_world_communicator(timeout_s);
  Tensor t = Tensor::full({16}, 1.0, DType::f32);
  world->all_reduce(t).wait();  // everybody joins #0
  if (g_world_rank == victim) {
    std::fprintf(stderr, "rank %d: skipping all_reduce #1\n", g_world_rank);
    std::this_thread::sleep_for(std::chrono::duration<double>(timeout_s + 30));
    return 0;
  }
  world->all_reduce(t).wait();
  std::fprintf(stderr, "rank %d: all_reduce #1 completed without rank %d\n", g_world_rank, victim);
  return 1;
}

// RANK starts all_reduce #1 with the others, then dies with SIGKILL before it completes.
int run_kill(int victim, double timeout_s) {
  auto world = make_mpi_world_communicator(timeout_s);
  Tensor t = Tensor::full({1 << 18}, 1.0, DType::f32);
  world->all_reduce(t).wait();
  if (g_world_rank == victim) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));  // the others are inside wait()
    std::fprintf(stderr, "rank %d: raising SIGKILL\n", g_world_rank);
    std::fflush(stderr);
    CommHandle h = world->all_reduce(t);
    std::raise(SIGKILL);
  }
  world->all_reduce(t).wait();
  return 1;
}

int run_world_size(int world_size) {
  const MeshSizes wrong{.pp = 1, .dp = world_size + 1, .tp = 1, .ep = 1};
  int refused = 0;
  try {
    check_world_size(wrong, 0);
  } catch (const UserError& e) {
    refused = std::string(e.what()).find("started " + std::to_string(world_size) + " ranks") != std::string::npos;
    if (g_world_rank == 0) std::printf("refused: %s\n", e.what());
  }
  int everyone = 0;
  MPI_Allreduce(&refused, &everyone, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  return everyone == world_size ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi;
  g_world_rank = mpi.world_rank();
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "collectives") return run_collectives(mpi.world_size());
  if (mode == "world-size") return run_world_size(mpi.world_size());
  if ((mode == "skip" || mode == "kill") && argc == 4) {
    const int victim = std::atoi(argv[2]);
    const double timeout_s = std::atof(argv[3]);
    return mode == "skip" ? run_skip(victim, timeout_s) : run_kill(victim, timeout_s);
  }
  std::fprintf(stderr, "usage: comm_check collectives | world-size | skip RANK TIMEOUT_S | kill RANK TIMEOUT_S\n");
  return 2;
}
