// Rotary position embedding (plain and YaRN) for device tensors (kernels/ops/rope.h).
//
// dtypes: as the CPU op: x, out and the table's cos/sin share one dtype, f32 or f64; positions
// i32|i64. The table comes from ops::rope_table on the CPU and is moved to the GPU by the caller
// (table.cos.to(Device::cuda)); both halves must be on the GPU.
// Positions: rows::first_bad_index checks every position against the table BEFORE the rotation
// runs (one small kernel and an 8-byte device-to-host copy, which synchronises), so a position
// beyond the table throws the CPU's message with nothing written.
// Thread mapping: one thread per rotated pair (row = token·H + head, i < dim/2), grid-stride
// over T·H·dim/2; consecutive threads take consecutive pairs of a row (coalesced reads of x and
// of the table row). Each thread reads its pair before writing it, so out may alias x.
#include <string>

#include "kernels/cuda/elements.cuh"
#include "kernels/cuda/ops_elementwise.h"
#include "kernels/cuda/rows_common.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"

namespace dsx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// kernels

// (a, b) -> (a·cos - b·sin', a·sin' + b·cos) with sin' = sign·sin: sign = 1 rotates by +angle
// (forward), sign = -1 applies the transpose (backward).
// No __restrict__: x and out may be the same memory.
template <class T, class Index>
__global__ void rope_kernel(const T* x, const Index* positions, const T* cos_table, const T* sin_table, T* out,
                            int64_t rows, int64_t heads, int64_t half, T sign) {
  DSX_GRID_STRIDE_LOOP(e, rows * half) {
    const int64_t row = e / half, i = e - row * half;
    const int64_t p = static_cast<int64_t>(positions[row / heads]);
    const T c = cos_table[p * half + i];
    const T s = sign * sin_table[p * half + i];
    const int64_t at = row * 2 * half + 2 * i;
    const T a = x[at], b = x[at + 1];
    out[at] = a * c - b * s;
    out[at + 1] = a * s + b * c;
  }
}

// ---------------------------------------------------------------------------------------------
// launchers

void check_rope_args(const Tensor& x, const Tensor& positions, const ops::RopeTable& table, const Tensor& out,
                     std::string_view op) {
  ops::checks::rope(op, Device::cuda, x, positions, table, out);
}

void rope_apply(const Tensor& x, const Tensor& positions, const ops::RopeTable& table, Tensor& out, std::string_view op,
                double sign) {
  check_rope_args(x, positions, table, out, op);
  const int64_t max_positions = table.cos.dim(0);
  const auto bad = rows::first_bad_index(positions, max_positions, std::nullopt, op);
  check(!bad, op, [&] {
    return "positions[" + std::to_string(bad->position) + "] = " + std::to_string(bad->value) +
           " is outside the table [0, " + std::to_string(max_positions) + ")";
  });
  dispatch_float(x.dtype(), op, [&]<class T>() {
    const int64_t heads = x.dim(1), half = x.dim(2) / 2, rows = x.dim(0) * heads;
    if (rows * half == 0) return;
    dispatch_index(positions.dtype(), op, [&]<class Index>() {
      rope_kernel<T, Index><<<grid_for(rows * half), kBlock, 0, current_stream()>>>(
          x.data<T>(), positions.data<Index>(), table.cos.data<T>(), table.sin.data<T>(), out.data<T>(), rows, heads,
          half, static_cast<T>(sign));
      DSX_CUDA_CHECK_LAUNCH("rope_kernel");
    });
  });
}

}  // namespace

void rope_forward(const Tensor& x, const Tensor& positions, const ops::RopeTable& table, Tensor& out) {
  rope_apply(x, positions, table, out, "rope_forward", 1.0);
}

void rope_backward(const Tensor& dout, const Tensor& positions, const ops::RopeTable& table, Tensor& dx) {
  rope_apply(dout, positions, table, dx, "rope_backward", -1.0);
}

}  // namespace dsx::cuda
