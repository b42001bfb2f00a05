// MoE dispatch + combine throughput: the dsx communicator's all_to_all_v (forward, then the
// reverse with the counts swapped) against a bare blocking MPI_Alltoallv of the same bytes, in
// the same run. Run under mpirun:
//
//   mpirun -np 4 --oversubscribe --bind-to none build/bench/bench_alltoall --tokens 4096
//
// Each repetition times one dsx round trip and one bare round trip back to back (alternating
// which goes first), as the slowest rank's time; the medians are compared.
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

#include "bench_mpi.h"
#include "kernels/error.h"
#include "parallel/comm_mpi.h"

using namespace dsx;
using dsx::bench::median;
using dsx::bench::now_s;
using dsx::bench::timed;

namespace {

struct Options {
  int64_t tokens = 4096;  // rows each rank dispatches (token-expert pairs)
  int64_t hidden = 1024;
  std::string dtype = "bf16";
  int reps = 30;
  int warmup = 3;
};

// Uneven routing, as a skewed router produces: destination q gets a weight that varies with
// (rank, q); every rank sends exactly `tokens` rows in all.
std::vector<int64_t> routing_counts(int rank, int n, int64_t tokens) {
  std::vector<int64_t> weights(n), counts(n);
  int64_t total_weight = 0;
  for (int q = 0; q < n; ++q) total_weight += weights[q] = 1 + (rank * 7 + q * 3) % 5;
  int64_t assigned = 0;
  for (int q = 0; q < n; ++q) assigned += counts[q] = tokens * weights[q] / total_weight;
  counts[rank] += tokens - assigned;
  return counts;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi;
  Options opt;
  CLI::App app{"dispatch+combine all-to-all throughput: dsx communicator vs bare MPI_Alltoallv (run under mpirun)"};
  app.add_option("--tokens", opt.tokens, "rows each rank sends per all-to-all")->check(CLI::PositiveNumber);
  app.add_option("--hidden", opt.hidden, "elements per row")->check(CLI::PositiveNumber);
  app.add_option("--dtype", opt.dtype, "row element type")->check(CLI::IsMember({"bf16", "f32"}));
  app.add_option("--reps", opt.reps, "timed round trips of each kind")->check(CLI::PositiveNumber);
  app.add_option("--warmup", opt.warmup, "untimed round trips first")->check(CLI::NonNegativeNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return mpi.world_rank() == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
  }

  const int rank = mpi.world_rank(), n = mpi.world_size();
  const DType dtype = opt.dtype == "bf16" ? DType::bf16 : DType::f32;
  auto world = make_mpi_world_communicator(120.0);
  const std::vector<int64_t> send_counts = routing_counts(rank, n, opt.tokens);
  const std::vector<int64_t> recv_counts = exchange_counts(*world, send_counts);
  int64_t recv_rows = 0;
  for (int64_t c : recv_counts) recv_rows += c;

  Tensor send = Tensor::full({opt.tokens, opt.hidden}, 1.0 + rank, dtype);
  Tensor recv = Tensor::zeros({recv_rows, opt.hidden}, dtype);
  Tensor back = Tensor::zeros({opt.tokens, opt.hidden}, dtype);

  // Bare MPI: byte counts and displacements for the same buffers.
  const int64_t row_bytes = opt.hidden * static_cast<int64_t>(dtype_size(dtype));
  std::vector<int> sc(n), sd(n), rc(n), rd(n);
  for (int q = 0, so = 0, ro = 0; q < n; ++q) {
    sc[q] = static_cast<int>(send_counts[q] * row_bytes);
    rc[q] = static_cast<int>(recv_counts[q] * row_bytes);
    sd[q] = so;
    rd[q] = ro;
    so += sc[q];
    ro += rc[q];
  }

  auto dsx_round_trip = [&] {
    world->all_to_all_v(send, send_counts, recv, recv_counts).wait();
    world->all_to_all_v(recv, recv_counts, back, send_counts).wait();
  };
  auto bare_round_trip = [&] {
    MPI_Alltoallv(send.raw(), sc.data(), sd.data(), MPI_BYTE, recv.raw(), rc.data(), rd.data(), MPI_BYTE,
                  MPI_COMM_WORLD);
    MPI_Alltoallv(recv.raw(), rc.data(), rd.data(), MPI_BYTE, back.raw(), sc.data(), sd.data(), MPI_BYTE,
                  MPI_COMM_WORLD);
  };

  for (int i = 0; i < opt.warmup; ++i) {
    dsx_round_trip();
    bare_round_trip();
  }
  std::vector<double> dsx_times, bare_times;
  for (int i = 0; i < opt.reps; ++i) {
    if (i % 2 == 0) {
      dsx_times.push_back(timed(dsx_round_trip));
      bare_times.push_back(timed(bare_round_trip));
    } else {
      bare_times.push_back(timed(bare_round_trip));
      dsx_times.push_back(timed(dsx_round_trip));
    }
  }
  // The data arrived where it should: every row came back to its sender unchanged.
  const bool intact = back.to_vector() == send.to_vector();
  int all_intact = 0, mine = intact ? 1 : 0;
  MPI_Allreduce(&mine, &all_intact, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);

  // Bytes leaving all ranks in one round trip (dispatch + combine), off-rank rows only.
  int64_t off_rank = 0, total_off_rank = 0;
  for (int q = 0; q < n; ++q) off_rank += q == rank ? 0 : 2 * send_counts[q] * row_bytes;
  MPI_Allreduce(&off_rank, &total_off_rank, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);

  if (rank == 0) {
    const double t_dsx = median(dsx_times), t_bare = median(bare_times);
    std::printf("ranks %d, %lld rows x %lld %s per rank (%.1f MB), uneven counts, %d reps\n", n,
                static_cast<long long>(opt.tokens), static_cast<long long>(opt.hidden), opt.dtype.c_str(),
                opt.tokens * row_bytes / 1e6, opt.reps);
    std::printf("dsx all_to_all_v   dispatch+combine  median %8.3f ms  %7.2f GB/s (off-rank bytes, all ranks)\n",
                t_dsx * 1e3, total_off_rank / t_dsx / 1e9);
    std::printf("bare MPI_Alltoallv dispatch+combine  median %8.3f ms  %7.2f GB/s\n", t_bare * 1e3,
                total_off_rank / t_bare / 1e9);
    std::printf("ratio dsx/bare throughput: %.3f (goal >= 0.8)  data intact: %s\n", t_bare / t_dsx,
                all_intact ? "yes" : "NO");
  }
  return all_intact ? 0 : 1;
}
