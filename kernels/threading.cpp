#include "kernels/threading.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>

namespace dsx {

int cpu_threads() { return omp_get_max_threads(); }

void set_cpu_threads(int n) {
  n = std::max(1, n);
  omp_set_num_threads(n);
  openblas_set_num_threads(n);
}

}  // namespace dsx
