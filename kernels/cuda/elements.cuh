// Device-side element access and launch helpers shared by every dsx CUDA kernel.
//
// Tensors store dsx's element types (kernels/dtype.h: float, double, bf16, fp8_e4m3,
// fp8_e5m2, int32_t, int64_t). Kernels load them into a compute type (double for f64, float
// for everything else) and store results back with the round-to-nearest-even codecs of
// kernels/codecs.h, the very functions the CPU ops use, so conversions agree bit for bit.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/codecs.h"
#include "kernels/cuda/runtime.h"
#include "kernels/dtype.h"

namespace dsx::cuda {

template <class T>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};
template <class T>
using compute_t = typename ComputeOf<T>::type;

__device__ __forceinline__ float load(float v) {
  return v;
}
__device__ __forceinline__ double load(double v) {
  return v;
}
__device__ __forceinline__ float load(bf16 v) {
  return codec::bf16_to_float(v.bits);
}
__device__ __forceinline__ float load(fp8_e4m3 v) {
  return codec::e4m3_to_float(v.bits);
}
__device__ __forceinline__ float load(fp8_e5m2 v) {
  return codec::e5m2_to_float(v.bits);
}

// store<T>(x): the element of type T nearest to x (round-to-nearest-even for narrow floats).
template <class T, class C>
__device__ __forceinline__ T store(C x) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return static_cast<T>(x);
  } else if constexpr (std::is_same_v<T, bf16>) {
    T r;
    r.bits = codec::float_to_bf16(static_cast<float>(x));
    return r;
  } else if constexpr (std::is_same_v<T, fp8_e4m3>) {
    T r;
    r.bits = codec::float_to_e4m3(static_cast<float>(x));
    return r;
  } else if constexpr (std::is_same_v<T, fp8_e5m2>) {
    T r;
    r.bits = codec::float_to_e5m2(static_cast<float>(x));
    return r;
  } else {
    return static_cast<T>(x);  // integers: C++ conversion (truncation), as convert_element does
  }
}

// Grid-stride launches: enough blocks to cover n, capped (each thread loops).
constexpr int kBlock = 256;
inline unsigned grid_for(int64_t n, int block = kBlock) {
  const int64_t blocks = (n + block - 1) / block;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > 65535 * 8 ? 65535 * 8 : blocks));
}

#define DSX_GRID_STRIDE_LOOP(i, n)                                                       \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

// Sum of v over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
template <class C>
__device__ __forceinline__ C block_sum(C v) {
  __shared__ C partial[32];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();  // partial may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : C(0);
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Max of v over the block, same contract as block_sum.
template <class C>
__device__ __forceinline__ C block_max(C v) {
  __shared__ C partial[32];
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < warps ? partial[lane] : partial[0];
  for (int offset = 16; offset > 0; offset /= 2) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

}  // namespace dsx::cuda
