// Argument checks that an op's CPU and CUDA implementations share (kernels/cpu/*.cpp,
// kernels/cuda/*.cu): the same shapes, dtypes and messages on either device, with the device
// every tensor of the call must live on as a parameter.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <stdexcept>
#include <string>
#include <string_view>

#include "kernels/ops/adamw.h"
#include "kernels/ops/fp8.h"
#include "kernels/ops/rope.h"
#include "kernels/tensor.h"

namespace dsx::ops::checks {

// copy_columns / set_columns: `wide` [..., D] and `narrow` [..., W] with identical leading
// dimensions and dtype, columns [begin, begin + W) inside D.
struct ColumnRows {
  int64_t count;         // rows (product of the leading dimensions)
  int64_t wide_width;    // D
  int64_t narrow_width;  // W
};
ColumnRows columns(std::string_view op, Device device, const Tensor& wide, std::string_view wide_name,
                   const Tensor& narrow, std::string_view narrow_name, int64_t begin);

// RMSNorm: x [N, D] and rstd [N]; every tensor in `same` shares x's dtype.
struct RmsnormDims {
  int64_t rows;
  int64_t cols;
};
struct Named {
  const Tensor* tensor;
  std::string_view name;
};
RmsnormDims rmsnorm(std::string_view op, Device device, const Tensor& x, const Tensor& rstd,
                    std::initializer_list<Named> same);

// adamw_step: the config's ranges, param/grad/m/v of one shape, grad in the param's dtype.
void adamw(const AdamWConfig& config, int64_t step, Device device, const Tensor& param, const Tensor& grad,
           const Tensor& m, const Tensor& v);

// linear_forward / linear_backward_input / linear_backward_weight: the output is f32|f64 (it
// sets the compute dtype), every operand 2-D with agreeing features, each input the output's
// dtype or bf16.
void linear_forward(Device device, const Tensor& x, const Tensor& weight, const Tensor& y);
void linear_backward_input(Device device, const Tensor& dy, const Tensor& weight, const Tensor& dx);
void linear_backward_weight(Device device, const Tensor& dy, const Tensor& x, const Tensor& dweight);

// FP8 quantization: q holds fp8_e4m3 data [rows, cols] and f32 scales of q.scaling's grid.
void fp8_matrix(Device device, const Fp8Matrix& q, int64_t rows, int64_t cols, std::string_view op,
                std::string_view name);
// The high-precision side of a quantization: x 2-D, f32 or bf16.
void fp8_source(Device device, const Tensor& x, std::string_view op);
const char* scaling_name(Fp8Scaling s);  // "tile_1x128" / "block_128x128"

// Calls f.template operator()<T>() with T = float or bf16, x's dtype (checked by fp8_source).
template <class F>
void dispatch_fp8_source(const Tensor& x, F&& f) {
  if (x.dtype() == DType::f32) {
    f.template operator()<float>();
  } else {
    f.template operator()<bf16>();
  }
}

// embedding_forward / embedding_backward_weight: ids [N] i32|i64, table [V, D], rows [N, D]
// (out or dout) in the table's dtype.
struct EmbeddingDims {
  int64_t n, vocab, d;
};
EmbeddingDims embedding(std::string_view op, Device device, const Tensor& ids, const Tensor& table,
                        std::string_view table_name, const Tensor& rows, std::string_view rows_name);

// rope_forward / rope_backward: x [T, H, dim], positions [T], cos/sin [max_positions, dim/2],
// out shaped like x; x, the table and out share a dtype.
void rope(std::string_view op, Device device, const Tensor& x, const Tensor& positions, const RopeTable& table,
          const Tensor& out);

// Calls f.template operator()<M>() with M = the moment's element type: the param type P or bf16.
template <class P, class F>
void dispatch_moment(DType t, std::string_view op, std::string_view name, F&& f) {
  if (t == dtype_of<P>()) {
    f.template operator()<P>();
  } else if (t == DType::bf16) {
    f.template operator()<bf16>();
  } else {
    throw std::invalid_argument(std::string(op) + ": " + std::string(name) + " must be " +
                                std::string(dtype_name(dtype_of<P>())) + " (the param dtype) or bf16, got " +
                                std::string(dtype_name(t)));
  }
}

}  // namespace dsx::ops::checks
