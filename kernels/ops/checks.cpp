#include "kernels/ops/checks.h"

#include <algorithm>
#include <cmath>

namespace dsx::ops::checks {

ColumnRows columns(std::string_view op, Device device, const Tensor& wide, std::string_view wide_name,
                   const Tensor& narrow, std::string_view narrow_name, int64_t begin) {
  check_device(wide, device, op, wide_name);
  check_device(narrow, device, op, narrow_name);
  const auto pair = [&] {
    return std::string(wide_name) + " " + wide.describe() + " and " + std::string(narrow_name) + " " +
           narrow.describe();
  };
  check(wide.ndim() >= 1 && wide.ndim() == narrow.ndim(), op,
        [&] { return pair() + " must have the same number (>= 1) of dimensions"; });
  check(wide.dtype() == narrow.dtype(), op, [&] { return pair() + ": dtypes differ"; });
  check(std::equal(wide.shape().begin(), wide.shape().end() - 1, narrow.shape().begin()), op,
        [&] { return pair() + ": leading dimensions differ"; });
  const int64_t width = narrow.dim(-1), total = wide.dim(-1);
  check(begin >= 0 && begin + width <= total, op, [&] {
    return "columns [" + std::to_string(begin) + ", " + std::to_string(begin + width) + ") are outside [0, " +
           std::to_string(total) + ") of " + std::string(wide_name);
  });
  const int64_t rows =
      total == 0 ? shape_numel(Shape(wide.shape().begin(), wide.shape().end() - 1)) : wide.numel() / total;
  return {rows, total, width};
}

RmsnormDims rmsnorm(std::string_view op, Device device, const Tensor& x, const Tensor& rstd,
                    std::initializer_list<Named> same) {
  check_device(x, device, op, "x");
  check_device(rstd, device, op, "rstd");
  check(x.ndim() == 2, op, [&] { return "x must be 2-D [N, D], got " + shape_str(x.shape()); });
  const RmsnormDims dims{x.dim(0), x.dim(1)};
  check_shape(rstd, {dims.rows}, op, "rstd");
  for (const Named t : same) check_device(*t.tensor, device, op, t.name);
  for (const Named t : same) {
    check(t.tensor->dtype() == x.dtype(), op, [&] {
      return std::string(t.name) + " " + t.tensor->describe() + " does not share the dtype of x " + x.describe();
    });
  }
  return dims;
}

void adamw(const AdamWConfig& c, int64_t step, Device device, const Tensor& param, const Tensor& grad, const Tensor& m,
           const Tensor& v) {
  constexpr std::string_view op = "adamw_step";
  const auto in_unit = [](double b) { return std::isfinite(b) && b >= 0 && b < 1; };
  check(step >= 1, op, [&] { return "step is 1-based, got " + std::to_string(step); });
  check(std::isfinite(c.lr) && c.lr >= 0, op,
        [&] { return "lr must be finite and >= 0, got " + std::to_string(c.lr); });
  check(in_unit(c.beta1), op, [&] { return "beta1 must be in [0, 1), got " + std::to_string(c.beta1); });
  check(in_unit(c.beta2), op, [&] { return "beta2 must be in [0, 1), got " + std::to_string(c.beta2); });
  check(std::isfinite(c.eps) && c.eps >= 0, op,
        [&] { return "eps must be finite and >= 0, got " + std::to_string(c.eps); });
  check(std::isfinite(c.weight_decay) && c.weight_decay >= 0, op,
        [&] { return "weight_decay must be finite and >= 0, got " + std::to_string(c.weight_decay); });
  check_device(param, device, op, "param");
  check_device(grad, device, op, "grad");
  check_device(m, device, op, "m");
  check_device(v, device, op, "v");
  check_shape(grad, param.shape(), op, "grad");
  check_shape(m, param.shape(), op, "m");
  check_shape(v, param.shape(), op, "v");
  check(grad.dtype() == param.dtype(), op,
        [&] { return "grad " + grad.describe() + " must share the param dtype " + param.describe(); });
}

void fp8_matrix(Device device, const Fp8Matrix& q, int64_t rows, int64_t cols, std::string_view op,
                std::string_view name) {
  check_device(q.data, device, op, std::string(name) + ".data");
  check_device(q.scales, device, op, std::string(name) + ".scales");
  check(q.data.dtype() == DType::fp8_e4m3 && q.scales.dtype() == DType::f32, op, [&] {
    return std::string(name) + " must hold fp8_e4m3 data and f32 scales, got " + q.data.describe() + " and " +
           q.scales.describe();
  });
  check_shape(q.data, {rows, cols}, op, std::string(name) + ".data");
  check_shape(q.scales, fp8_scale_shape(rows, cols, q.scaling), op, std::string(name) + ".scales");
}

void fp8_source(Device device, const Tensor& x, std::string_view op) {
  check_device(x, device, op, "x");
  check(x.ndim() == 2, op, [&] { return "x must be 2-D, got " + x.describe(); });
  check(x.dtype() == DType::f32 || x.dtype() == DType::bf16, op,
        [&] { return "x must be f32 or bf16, got " + x.describe(); });
}

const char* scaling_name(Fp8Scaling s) {
  return s == Fp8Scaling::tile_1x128 ? "tile_1x128" : "block_128x128";
}

EmbeddingDims embedding(std::string_view op, Device device, const Tensor& ids, const Tensor& table,
                        std::string_view table_name, const Tensor& rows, std::string_view rows_name) {
  check_device(ids, device, op, "ids");
  check(ids.dtype() == DType::i32 || ids.dtype() == DType::i64, op,
        [&] { return "ids must be i32 or i64, got " + std::string(dtype_name(ids.dtype())); });
  check(ids.ndim() == 1, op, [&] { return "ids must be 1-D [N], got " + shape_str(ids.shape()); });
  check_device(table, device, op, table_name);
  check_device(rows, device, op, rows_name);
  check(table.ndim() == 2, op,
        [&] { return std::string(table_name) + " must be 2-D [V, D], got " + shape_str(table.shape()); });
  const EmbeddingDims dims{ids.dim(0), table.dim(0), table.dim(1)};
  check_shape(rows, {dims.n, dims.d}, op, rows_name);
  check(rows.dtype() == table.dtype(), op, [&] {
    return std::string(rows_name) + " " + rows.describe() + " and " + std::string(table_name) + " " + table.describe() +
           " dtypes differ";
  });
  return dims;
}

void rope(std::string_view op, Device device, const Tensor& x, const Tensor& positions, const RopeTable& table,
          const Tensor& out) {
  check_device(x, device, op, "x");
  check_device(positions, device, op, "positions");
  check_device(table.cos, device, op, "table.cos");
  check_device(table.sin, device, op, "table.sin");
  check_device(out, device, op, "out");
  check(x.ndim() == 3, op, [&] { return "x must be [T, H, dim], got " + shape_str(x.shape()); });
  check(table.cos.ndim() == 2, op,
        [&] { return "table.cos must be [max_positions, dim/2], got " + shape_str(table.cos.shape()); });
  check_shape(table.sin, table.cos.shape(), op, "table.sin");
  check(x.dim(2) == 2 * table.cos.dim(1), op, [&] {
    return "x's last dimension " + std::to_string(x.dim(2)) + " is not twice the table's " +
           std::to_string(table.cos.dim(1));
  });
  check_shape(positions, {x.dim(0)}, op, "positions");
  check_shape(out, x.shape(), op, "out");
  check(x.dtype() == table.cos.dtype() && x.dtype() == table.sin.dtype() && x.dtype() == out.dtype(), op,
        "x, table and out must share a dtype");
}

namespace {

void check_compute(const Tensor& out, Device device, std::string_view op, std::string_view name) {
  check_device(out, device, op, name);
  check(out.dtype() == DType::f32 || out.dtype() == DType::f64, op,
        [&] { return std::string(name) + " must be f32 or f64 (it sets the compute dtype), got " + out.describe(); });
}

void check_2d(const Tensor& t, Device device, std::string_view op, std::string_view name, std::string_view layout) {
  check_device(t, device, op, name);
  check(t.ndim() == 2, op,
        [&] { return std::string(name) + " must be 2-D " + std::string(layout) + ", got " + shape_str(t.shape()); });
}

// Each input is the output's dtype or bf16 (f32 and f64 are never mixed).
void check_input(const Tensor& t, DType compute, std::string_view op, std::string_view name) {
  check(t.dtype() == compute || t.dtype() == DType::bf16, op, [&] {
    return std::string(name) + " is " + t.describe() + "; expected " + std::string(dtype_name(compute)) +
           " (the output's dtype) or bf16";
  });
}

std::string disagree(std::string_view a_name, const Tensor& a, std::string_view b_name, const Tensor& b,
                     std::string_view what) {
  return std::string(a_name) + " " + shape_str(a.shape()) + " and " + std::string(b_name) + " " + shape_str(b.shape()) +
         " disagree on " + std::string(what);
}

}  // namespace

void linear_forward(Device device, const Tensor& x, const Tensor& weight, const Tensor& y) {
  constexpr std::string_view op = "linear_forward";
  check_compute(y, device, op, "y");
  check_2d(x, device, op, "x", "[N, in]");
  check_2d(weight, device, op, "weight", "[out, in]");
  check(x.dim(1) == weight.dim(1), op, [&] { return disagree("x", x, "weight", weight, "the input features"); });
  check_shape(y, {x.dim(0), weight.dim(0)}, op, "y");
  check_input(x, y.dtype(), op, "x");
  check_input(weight, y.dtype(), op, "weight");
}

void linear_backward_input(Device device, const Tensor& dy, const Tensor& weight, const Tensor& dx) {
  constexpr std::string_view op = "linear_backward_input";
  check_compute(dx, device, op, "dx");
  check_2d(dy, device, op, "dy", "[N, out]");
  check_2d(weight, device, op, "weight", "[out, in]");
  check(dy.dim(1) == weight.dim(0), op, [&] { return disagree("dy", dy, "weight", weight, "the output features"); });
  check_shape(dx, {dy.dim(0), weight.dim(1)}, op, "dx");
  check_input(dy, dx.dtype(), op, "dy");
  check_input(weight, dx.dtype(), op, "weight");
}

void linear_backward_weight(Device device, const Tensor& dy, const Tensor& x, const Tensor& dweight) {
  constexpr std::string_view op = "linear_backward_weight";
  check_compute(dweight, device, op, "dweight");
  check_2d(dy, device, op, "dy", "[N, out]");
  check_2d(x, device, op, "x", "[N, in]");
  check(dy.dim(0) == x.dim(0), op, [&] { return disagree("dy", dy, "x", x, "the number of rows"); });
  check_shape(dweight, {dy.dim(1), x.dim(1)}, op, "dweight");
  check_input(dy, dweight.dtype(), op, "dy");
  check_input(x, dweight.dtype(), op, "x");
}

}  // namespace dsx::ops::checks
