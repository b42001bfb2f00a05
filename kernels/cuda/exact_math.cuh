// IEEE operations that nvcc must not fuse into FMAs, and warp reductions, for the kernels that
// reproduce a CPU op's rounding order (router, AdamW): a · b + c written with these stays two
// roundings, as the CPU's plain C++ expression is (nvcc contracts it into one fma by default).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace dsx::cuda {

__device__ __forceinline__ float add_rn(float a, float b) {
  return __fadd_rn(a, b);
}
__device__ __forceinline__ double add_rn(double a, double b) {
  return __dadd_rn(a, b);
}
__device__ __forceinline__ float sub_rn(float a, float b) {
  return __fsub_rn(a, b);
}
__device__ __forceinline__ double sub_rn(double a, double b) {
  return __dsub_rn(a, b);
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  return __fmul_rn(a, b);
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  return __dmul_rn(a, b);
}
__device__ __forceinline__ float div_rn(float a, float b) {
  return __fdiv_rn(a, b);
}
__device__ __forceinline__ double div_rn(double a, double b) {
  return __ddiv_rn(a, b);
}
__device__ __forceinline__ float sqrt_rn(float a) {
  return __fsqrt_rn(a);
}
__device__ __forceinline__ double sqrt_rn(double a) {
  return __dsqrt_rn(a);
}

// exp as the host's libm computes it, as closely as the device allows: for float, the double
// exp rounded once to float is the correctly rounded expf except when exp(x) lies within about
// 2^-29 relative of a float rounding boundary (glibc's expf is correctly rounded in nearly all
// cases too), so the two agree except on astronomically rare inputs; for double both are
// faithful (within 1 ulp).
__device__ __forceinline__ float exp_like_host(float x) {
  return static_cast<float>(exp(static_cast<double>(x)));
}
__device__ __forceinline__ double exp_like_host(double x) {
  return exp(x);
}

// Sum over the 32 lanes of a warp (every lane gets it). The butterfly order is fixed, so the
// result is deterministic.
template <class C>
__device__ __forceinline__ C warp_sum(C v) {
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace dsx::cuda
