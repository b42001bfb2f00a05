// CPU threads for dsx ops (OpenMP) and for BLAS. Both honour OMP_NUM_THREADS at start-up;
// set_cpu_threads changes both at once (multi-rank runs on one machine use 1 per rank).
#pragma once

namespace dsx {
int cpu_threads();
void set_cpu_threads(int n);
}  // namespace dsx
