// Element conversion and fill for device tensors (Tensor::to, copy_from, fill on CUDA).
#include "kernels/cuda/elements.cuh"
#include "kernels/dispatch.h"

namespace dsx::cuda {
namespace {

template <class To, class From>
__global__ void convert_kernel(const From* src, To* dst, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) {
    // The same routes as the host's convert_element: integers and f64 convert directly,
    // narrow floats go through float.
    if constexpr (std::is_arithmetic_v<From> && std::is_arithmetic_v<To>) {
      dst[i] = static_cast<To>(src[i]);
    } else if constexpr (std::is_arithmetic_v<From>) {
      dst[i] = store<To>(static_cast<float>(src[i]));
    } else {
      dst[i] = store<To>(load(src[i]));
    }
  }
}

template <class T>
__global__ void fill_kernel(T* dst, T value, int64_t n) {
  DSX_GRID_STRIDE_LOOP(i, n) dst[i] = value;
}

// The host-side value of a fill, converted once with the host codecs (identical rounding).
template <class T>
T host_value(double value) {
  return convert_element<T>(value);
}

}  // namespace

void convert_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, int64_t n) {
  if (n == 0) return;
  dispatch_any(dst_dtype, [&]<class To>() {
    dispatch_any(src_dtype, [&]<class From>() {
      convert_kernel<To, From>
          <<<grid_for(n), kBlock, 0, current_stream()>>>(static_cast<const From*>(src), static_cast<To*>(dst), n);
      DSX_CUDA_CHECK_LAUNCH("convert_kernel");
    });
  });
}

void fill_elements(void* dst, DType dtype, double value, int64_t n) {
  if (n == 0) return;
  dispatch_any(dtype, [&]<class T>() {
    fill_kernel<T><<<grid_for(n), kBlock, 0, current_stream()>>>(static_cast<T*>(dst), host_value<T>(value), n);
    DSX_CUDA_CHECK_LAUNCH("fill_kernel");
  });
}

}  // namespace dsx::cuda
