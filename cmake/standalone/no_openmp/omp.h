// Stand-in for <omp.h> when the compiler has no OpenMP (standalone CUDA build only, see
// cmake/StandaloneDependencies.cmake): the program behaves as OpenMP with one thread would.
#pragma once

inline int omp_get_max_threads() {
  return 1;
}
inline int omp_get_num_threads() {
  return 1;
}
inline int omp_get_thread_num() {
  return 0;
}
inline int omp_in_parallel() {
  return 0;
}
inline void omp_set_num_threads(int) {}
