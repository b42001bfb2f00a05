// Routing an op's CUDA tensors to its CUDA implementation.
//
// Every public op (kernels/ops/*.h) is implemented once for the CPU (kernels/cpu/*.cpp) and
// once for CUDA (namespace dsx::cuda, same signature, kernels/cuda/ops.h). The CPU definition
// starts with
//     DSX_ROUTE_TO_CUDA(x, rmsnorm_forward(x, weight, eps, y, rstd));
// which returns dsx::cuda::rmsnorm_forward(...) when x lives on the GPU. In a build without
// CUDA no tensor can live there (Tensor::empty refuses), so the line compiles to nothing.
#pragma once
#include "kernels/tensor.h"

#if DSX_HAVE_CUDA
#include "kernels/cuda/ops.h"
#define DSX_ROUTE_TO_CUDA(tensor, call) \
  if ((tensor).defined() && (tensor).device() == ::dsx::Device::cuda) return ::dsx::cuda::call
#else
#define DSX_ROUTE_TO_CUDA(tensor, call) static_cast<void>(0)
#endif
