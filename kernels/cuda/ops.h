// The CUDA implementations of the public ops: the same signatures and semantics as
// kernels/ops/*.h, for tensors on Device::cuda (see kernels/cuda/route.h and README.md).
// Each group header declares its ops; the .cu files beside them hold kernels and launchers.
#pragma once
#include "kernels/cuda/ops_adamw.h"
#include "kernels/cuda/ops_attention.h"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/cuda/ops_fp8.h"
#include "kernels/cuda/ops_gemm.h"
#include "kernels/cuda/ops_loss.h"
#include "kernels/cuda/ops_moe.h"
#include "kernels/cuda/ops_norm.h"
#include "kernels/cuda/ops_router.h"
