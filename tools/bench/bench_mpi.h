// What the multi-rank (mpirun) benchmarks share: timing as the slowest rank sees it, medians,
// and the CLI11 parse / error handling every rank must agree on.
#pragma once
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

#include "kernels/error.h"

namespace dsx::bench {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// The slowest rank's time of f(), after a barrier so every rank starts together.
template <class F>
double timed(F&& f) {
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = now_s();
  f();
  double elapsed = now_s() - start, slowest = 0;
  MPI_Allreduce(&elapsed, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return slowest;
}

inline double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Parses the command line (rank 0 prints help and parse errors), then runs run(); a
// dsx::UserError — the same on every rank, since every rank has the same options — is printed
// once as "<name>: error: ..." with exit code 2.
inline int parse_and_run(CLI::App& app, int argc, char** argv, int rank, const char* name,
                         const std::function<int()>& run) {
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return rank == 0 ? app.exit(e) : (e.get_exit_code() == 0 ? 0 : 2);
  }
  try {
    return run();
  } catch (const UserError& e) {
    if (rank == 0) std::fprintf(stderr, "%s: error: %s\n", name, e.what());
    return 2;
  }
}

}  // namespace dsx::bench
