// MoE dispatch + combine through the model's own path (ExpertRouter: plan with the per-expert
// counts exchange, dispatch straight into the expert-major layout, combine straight from it, both
// through Communicator::all_to_all_blocks) against a bare blocking MPI_Alltoallv of exactly the
// same bytes both ways, in the same run. Run under mpirun:
//
//   mpirun -np 4 --oversubscribe --bind-to none build/release/bench/bench_moe_dispatch --dtype bf16
//
// The routed rows come from a synthetic skewed router: every token picks top-k distinct experts
// with probability ∝ 1/(popularity rank + 1)^skew, the popularity order being one fixed shuffle of
// the experts shared by all ranks, so experts (and the EP ranks holding them) get uneven loads.
// The rows start in the plan's order (as moe_permute leaves them); permute and unpermute are not
// timed, since the bare baseline has nothing to compare them with.
//
// Each repetition times one dsx round trip and one bare round trip back to back (alternating
// which goes first), as the slowest rank's time; the medians are compared.
#include <mpi.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "bench_mpi.h"
#include "kernels/error.h"
#include "parallel/comm_mpi.h"
#include "trainer/model/moe_dispatch.h"

using namespace dsx;
using dsx::bench::median;
using dsx::bench::now_s;
using dsx::bench::timed;

namespace {

struct Options {
  int64_t tokens = 2048;  // tokens each rank routes
  int64_t hidden = 1024;
  int64_t top_k = 4;
  int64_t experts = 32;
  double skew = 1.0;
  std::string dtype = "bf16";
  int reps = 20;
  int warmup = 3;
  uint64_t seed = 1;
};

// Minor page faults of this process so far: fresh buffers cost one per page on first touch.
int64_t minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

int64_t sum_over_ranks(int64_t mine) {
  int64_t total = 0;
  MPI_Allreduce(&mine, &total, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  return total;
}

int64_t max_over_ranks(int64_t mine) {
  int64_t most = 0;
  MPI_Allreduce(&mine, &most, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  return most;
}

// Expert ids [T, K] i32 of the skewed router. The popularity order is the same on every rank
// (seeded by `seed` alone); the draws differ per rank.
Tensor skewed_expert_ids(const Options& opt, int rank) {
  std::vector<int32_t> popularity_order(static_cast<size_t>(opt.experts));
  std::iota(popularity_order.begin(), popularity_order.end(), 0);
  std::mt19937_64 shared_gen(opt.seed);
  std::shuffle(popularity_order.begin(), popularity_order.end(), shared_gen);
  std::vector<double> weight(static_cast<size_t>(opt.experts));
  for (int64_t i = 0; i < opt.experts; ++i) {
    weight[static_cast<size_t>(popularity_order[static_cast<size_t>(i)])] =
        std::pow(static_cast<double>(i + 1), -opt.skew);
  }
  std::mt19937_64 gen(opt.seed * 1000003 + static_cast<uint64_t>(rank) + 1);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::vector<int32_t> ids(static_cast<size_t>(opt.tokens * opt.top_k));
  std::vector<double> left(weight.size());
  for (int64_t t = 0; t < opt.tokens; ++t) {
    left = weight;  // sampling without replacement: a chosen expert's weight drops to 0
    for (int64_t k = 0; k < opt.top_k; ++k) {
      double pick = unit(gen) * std::accumulate(left.begin(), left.end(), 0.0);
      size_t e = 0;
      while (e + 1 < left.size() && (left[e] == 0 || pick >= left[e])) pick -= left[e++];
      while (left[e] == 0) --e;  // rounding ran past the last expert still available
      ids[static_cast<size_t>(t * opt.top_k + k)] = static_cast<int32_t>(e);
      left[e] = 0;
    }
  }
  return Tensor::from<int32_t>(ids, {opt.tokens, opt.top_k});
}

// Rows [T·K, D] in the plan's order: element 0 of a row is its global expert (exact in bf16 for
// up to 256 experts), the others a pattern of rank and row, so a round trip can be checked.
Tensor routed_rows(const ops::MoePlan& plan, int64_t hidden, DType dtype, int rank) {
  const int64_t n_rows = plan.expert_offsets.back();
  std::vector<float> v(static_cast<size_t>(n_rows * hidden));
  for (size_t e = 0; e + 1 < plan.expert_offsets.size(); ++e) {
    for (int64_t r = plan.expert_offsets[e]; r < plan.expert_offsets[e + 1]; ++r) {
      float* row = v.data() + r * hidden;
      row[0] = static_cast<float>(e);
      for (int64_t i = 1; i < hidden; ++i) row[i] = static_cast<float>((rank * 37 + r * 13 + i) % 251);
    }
  }
  return Tensor::from<float>(v, {n_rows, hidden}).to(dtype);
}

// Every row a local expert received carries that expert's id: the dispatch landed it in place.
bool expert_major_ok(const Tensor& expert_rows, const Dispatch& d, const LocalExperts& local) {
  const std::vector<double> v = expert_rows.to_vector();
  const int64_t hidden = expert_rows.dim(1);
  for (int64_t j = 0; j < local.count; ++j) {
    for (int64_t r = d.local_offsets[j]; r < d.local_offsets[j + 1]; ++r) {
      if (v[static_cast<size_t>(r * hidden)] != static_cast<double>(local.first + j)) return false;
    }
  }
  return true;
}

// Byte counts and displacements of an all-to-all of rows of `row_bytes` (MPI takes int).
struct ByteLayout {
  std::vector<int> counts, displs;
};
ByteLayout byte_layout(const std::vector<int64_t>& rows, int64_t row_bytes) {
  ByteLayout b;
  int64_t at = 0;
  for (int64_t r : rows) {
    const int64_t bytes = r * row_bytes;
    b.counts.push_back(static_cast<int>(bytes));
    b.displs.push_back(static_cast<int>(at));
    at += bytes;
  }
  return b;
}

void print_routing(const Dispatch& d, const Options& opt, int rank, int n_ranks) {
  // Load skew over the whole job: rows per expert and rows each EP rank's experts receive.
  std::vector<int64_t> per_expert(static_cast<size_t>(opt.experts)), global(per_expert.size());
  for (int64_t e = 0; e < opt.experts; ++e) per_expert[e] = d.plan.expert_offsets[e + 1] - d.plan.expert_offsets[e];
  MPI_Allreduce(per_expert.data(), global.data(), static_cast<int>(opt.experts), MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  const int64_t received = std::accumulate(d.recv_counts.begin(), d.recv_counts.end(), int64_t{0});
  const int64_t most_received = max_over_ranks(received), all_rows = sum_over_ranks(d.n_rows);
  const double mean_expert = static_cast<double>(all_rows) / static_cast<double>(opt.experts);
  const double mean_rank = static_cast<double>(all_rows) / n_ranks;
  if (rank == 0) {
    std::printf(
        "skewed router (skew %.2f): rows per expert max %lld min %lld (max/mean %.2f); "
        "rows received per EP rank max/mean %.2f\n",
        opt.skew, static_cast<long long>(*std::max_element(global.begin(), global.end())),
        static_cast<long long>(*std::min_element(global.begin(), global.end())),
        static_cast<double>(*std::max_element(global.begin(), global.end())) / mean_expert,
        static_cast<double>(most_received) / mean_rank);
  }
}

int run(const Options& opt, int rank, int n) {
  const DType dtype = opt.dtype == "bf16" ? DType::bf16 : DType::f32;
  if (opt.top_k > opt.experts) throw UserError("bench_moe_dispatch: --top-k must not exceed --experts");
  if (opt.experts > 256) throw UserError("bench_moe_dispatch: --experts above 256 (row tags must be exact in bf16)");
  MeshSizes sizes;
  sizes.dp = n;
  sizes.ep = n;
  validate_mesh(sizes, n, opt.experts);
  MeshComms comms = make_mpi_mesh_comms(build_mesh(sizes, rank), 120.0);
  ModelParallel parallel;
  parallel.ep = comms.ep.get();
  // rows travel as they are: the wire format is the rows' dtype both ways
  parallel.dispatch = parallel.combine = dtype == DType::bf16 ? WireFormat::bf16 : WireFormat::f32;
  const ExpertRouter router(opt.experts, parallel);

  const Tensor expert_ids = skewed_expert_ids(opt, rank);
  const std::vector<ExpertRouter::TokenRange> whole{{0, expert_ids.dim(0)}};
  const Dispatch routes = std::move(router.plan(expert_ids, whole)[0]);  // the counts both paths send
  print_routing(routes, opt, rank, n);
  const Tensor rows = routed_rows(routes.plan, opt.hidden, dtype, rank);
  const int64_t row_bytes = opt.hidden * static_cast<int64_t>(dtype_size(dtype));

  Tensor dsx_back;
  bool expert_major = true;  // set by the last (untimed) round trip
  // This rank's time in each phase of every dsx round trip, to show where the time goes.
  const char* const phase_names[] = {"plan (routes + counts exchange)", "start_to_experts", "finish_to_experts (wait)",
                                     "start_from_experts (send)", "finish_from_experts (wait)"};
  constexpr int n_phases = 5;
  std::vector<std::vector<double>> phase_s(n_phases);
  auto dsx_round_trip = [&](bool check) {
    double mark = now_s();
    auto lap = [&](int phase) {
      const double t = now_s();
      phase_s[static_cast<size_t>(phase)].push_back(t - mark);
      mark = t;
    };
    Dispatch d = std::move(router.plan(expert_ids, whole)[0]);
    lap(0);
    const Tensor to_experts = router.start_to_experts(rows, d, Transfer::dispatch);
    lap(1);
    const Tensor expert_rows = router.finish_to_experts(d, to_experts);
    lap(2);
    const Tensor from_experts = router.start_from_experts(expert_rows, d);
    lap(3);
    dsx_back = router.finish_from_experts(d, from_experts, dtype);
    lap(4);
    if (check) expert_major = expert_major_ok(expert_rows, d, router.local());
  };
  auto dsx_timed = [&] { dsx_round_trip(false); };

  // Bare MPI counts bytes in int: every rank stops when any rank's buffer would not fit.
  const int64_t recv_rows = std::accumulate(routes.recv_counts.begin(), routes.recv_counts.end(), int64_t{0});
  if (max_over_ranks(std::max(routes.n_rows, recv_rows) * row_bytes) > INT_MAX) {
    throw UserError(
        "bench_moe_dispatch: a rank's rows exceed 2 GiB (bare MPI counts bytes in int); lower --tokens "
        "or --hidden");
  }
  const ByteLayout sent = byte_layout(routes.send_counts, row_bytes), got = byte_layout(routes.recv_counts, row_bytes);
  Tensor bare_recv = Tensor::zeros({recv_rows, opt.hidden}, dtype);
  Tensor bare_back = Tensor::zeros(rows.shape(), dtype);
  auto bare_round_trip = [&] {
    MPI_Alltoallv(rows.raw(), sent.counts.data(), sent.displs.data(), MPI_BYTE, bare_recv.raw(), got.counts.data(),
                  got.displs.data(), MPI_BYTE, MPI_COMM_WORLD);
    MPI_Alltoallv(bare_recv.raw(), got.counts.data(), got.displs.data(), MPI_BYTE, bare_back.raw(), sent.counts.data(),
                  sent.displs.data(), MPI_BYTE, MPI_COMM_WORLD);
  };

  for (int i = 0; i < opt.warmup; ++i) {
    dsx_round_trip(false);
    bare_round_trip();
  }
  for (auto& p : phase_s) p.clear();
  std::vector<double> dsx_times, bare_times;
  int64_t dsx_faults = 0, bare_faults = 0;
  auto dsx_counted = [&] {
    const int64_t before = minor_faults();
    dsx_timed();
    dsx_faults += minor_faults() - before;
  };
  auto bare_counted = [&] {
    const int64_t before = minor_faults();
    bare_round_trip();
    bare_faults += minor_faults() - before;
  };
  for (int i = 0; i < opt.reps; ++i) {
    if (i % 2 == 0) {
      dsx_times.push_back(timed(dsx_counted));
      bare_times.push_back(timed(bare_counted));
    } else {
      bare_times.push_back(timed(bare_counted));
      dsx_times.push_back(timed(dsx_counted));
    }
  }
  std::vector<double> phase_slowest(n_phases);  // per phase: the slowest rank's median
  for (int p = 0; p < n_phases; ++p) {
    const double mine = median(phase_s[static_cast<size_t>(p)]);
    MPI_Allreduce(&mine, &phase_slowest[static_cast<size_t>(p)], 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  }
  dsx_round_trip(true);
  // Every row came back to its place unchanged, by both paths, and each local expert's rows
  // were contiguous on the way.
  const std::vector<double> original = rows.to_vector();
  const int mine = expert_major && dsx_back.to_vector() == original && bare_back.to_vector() == original ? 1 : 0;
  int all_ok = 0;
  MPI_Allreduce(&mine, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);

  // Bytes leaving all ranks in one round trip (dispatch + combine), off-rank rows only.
  int64_t off_rank = 0;
  for (int q = 0; q < n; ++q) off_rank += q == rank ? 0 : 2 * routes.send_counts[q] * row_bytes;
  const int64_t total_off_rank = sum_over_ranks(off_rank);
  const double faults_per_trip = static_cast<double>(opt.reps) * n;
  const double dsx_faults_mean = static_cast<double>(sum_over_ranks(dsx_faults)) / faults_per_trip;
  const double bare_faults_mean = static_cast<double>(sum_over_ranks(bare_faults)) / faults_per_trip;

  if (rank == 0) {
    const double t_dsx = median(dsx_times), t_bare = median(bare_times);
    const int64_t per_token = 2 * opt.top_k * opt.hidden;  // elements per token, dispatch + combine
    std::printf(
        "ranks %d, %lld tokens x top-%lld of %lld experts per rank, rows of %lld %s (%.1f MB sent each way "
        "per rank), %d reps\n",
        n, static_cast<long long>(opt.tokens), static_cast<long long>(opt.top_k), static_cast<long long>(opt.experts),
        static_cast<long long>(opt.hidden), opt.dtype.c_str(), static_cast<double>(rows.nbytes()) / 1e6, opt.reps);
    std::printf(
        "bytes per token, dispatch + combine: f32 %lld, bf16 %lld (this run: %lld); counts exchange %lld B per "
        "rank per plan\n",
        static_cast<long long>(per_token * 4), static_cast<long long>(per_token * 2),
        static_cast<long long>(per_token * static_cast<int64_t>(dtype_size(dtype))),
        static_cast<long long>(opt.experts * 8));
    std::printf("dsx ExpertRouter  plan+dispatch+combine  median %8.3f ms  %7.2f GB/s (off-rank bytes, all ranks)\n",
                t_dsx * 1e3, static_cast<double>(total_off_rank) / t_dsx / 1e9);
    std::printf("bare MPI_Alltoallv  dispatch+combine     median %8.3f ms  %7.2f GB/s\n", t_bare * 1e3,
                static_cast<double>(total_off_rank) / t_bare / 1e9);
    std::printf("  minor page faults per round trip and rank: dsx %.0f, bare %.0f (%.1f MB of pages at 4 KiB)\n",
                dsx_faults_mean, bare_faults_mean, dsx_faults_mean * 4096 / 1e6);
    std::printf("  dsx phases (each rank's median, slowest rank):\n");
    for (int p = 0; p < n_phases; ++p) std::printf("    %-36s %8.1f ms\n", phase_names[p], phase_slowest[p] * 1e3);
    std::printf("ratio dsx/bare throughput: %.3f (goal >= 0.8)  data intact: %s\n", t_bare / t_dsx,
                all_ok ? "yes" : "NO");
  }
  return all_ok ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi;
  Options opt;
  CLI::App app{
      "MoE dispatch+combine through ExpertRouter (plan, counts exchange, expert-major all-to-all) vs bare "
      "MPI_Alltoallv of the same bytes (run under mpirun)"};
  app.add_option("--tokens", opt.tokens, "tokens each rank routes")->check(CLI::PositiveNumber);
  app.add_option("--hidden", opt.hidden, "elements per row (model hidden size)")->check(CLI::PositiveNumber);
  app.add_option("--top-k", opt.top_k, "experts per token")->check(CLI::PositiveNumber);
  app.add_option("--experts", opt.experts, "routed experts (split evenly over the ranks)")->check(CLI::PositiveNumber);
  app.add_option("--skew", opt.skew, "router skew: expert popularity ~ 1/(rank+1)^skew (0 = uniform)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--dtype", opt.dtype, "row element type")->check(CLI::IsMember({"bf16", "f32"}));
  app.add_option("--reps", opt.reps, "timed round trips of each kind")->check(CLI::PositiveNumber);
  app.add_option("--warmup", opt.warmup, "untimed round trips first")->check(CLI::NonNegativeNumber);
  app.add_option("--seed", opt.seed, "router seed");
  return bench::parse_and_run(app, argc, argv, mpi.world_rank(), "bench_moe_dispatch",
                              [&] { return run(opt, mpi.world_rank(), mpi.world_size()); });
}
