// RMSNorm on the GPU (kernels/cuda/rmsnorm.cu) against the CPU op on the same random inputs.
//
// Tolerances (DSX_REQUIRE_CLOSE: max |gpu - cpu| / max(1, max |cpu|)):
//  - f32 2e-5: both sides reduce D (or N) f32 products in T but in different orders (the CPU
//    in simd lanes, the GPU per thread then as a tree). With D <= 7168 the rounding errors of
//    either sum are typically sqrt(D)·6e-8 ≈ 5e-6 relative and bounded far below 1e-4; the
//    outputs are O(1), so 2e-5 leaves margin while a wrong index or a missing term is O(1e-2+).
//  - f64 1e-13: the same argument with 1.1e-16 per rounding.
// The backward tests feed both sides the same rstd (the CPU's) so that each op is measured alone.
#include <catch2/catch.hpp>

#include <vector>

#include "gpu_check.h"
#include "kernels/ops/rmsnorm.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;

namespace {

constexpr double kEps = 1e-6;

double tol_for(DType t) {
  return t == DType::f32 ? 2e-5 : 1e-13;
}

// D not a multiple of 32, one row, one column, N > 256 (several chunks of the weight-gradient
// reduction) and DeepSeek-V3's hidden size.
const std::vector<Shape> kShapes{{1, 1}, {1, 7}, {3, 33}, {17, 1000}, {600, 65}, {64, 4099}, {300, 7168}};

struct Forward {
  Tensor y, rstd;
};

Forward forward(const Tensor& x, const Tensor& w) {
  const Device dev = x.device();
  Forward f{Tensor::empty(x.shape(), x.dtype(), dev), Tensor::empty({x.dim(0)}, x.dtype(), dev)};
  ops::rmsnorm_forward(x, w, kEps, f.y, f.rstd);
  return f;
}

}  // namespace

TEST_CASE("gpu rmsnorm forward matches the CPU", "[gpu][norm]") {
  for (DType t : {DType::f32, DType::f64}) {
    for (const Shape& shape : kShapes) {
      CAPTURE(dtype_name(t), shape_str(shape));
      const Tensor x = random_tensor(shape, t, 1, -2, 2);
      const Tensor w = random_tensor({shape[1]}, t, 2, 0.5, 1.5);
      const Forward cpu = forward(x, w);
      const Forward gpu = forward(on_gpu(x), on_gpu(w));
      DSX_REQUIRE_CLOSE(gpu.rstd, cpu.rstd, tol_for(t));
      DSX_REQUIRE_CLOSE(gpu.y, cpu.y, tol_for(t));
    }
  }
}

TEST_CASE("gpu rmsnorm backward (input and weight) matches the CPU", "[gpu][norm]") {
  for (DType t : {DType::f32, DType::f64}) {
    for (const Shape& shape : kShapes) {
      CAPTURE(dtype_name(t), shape_str(shape));
      const Tensor x = random_tensor(shape, t, 3, -2, 2);
      const Tensor w = random_tensor({shape[1]}, t, 4, 0.5, 1.5);
      const Tensor dy = random_tensor(shape, t, 5, -1, 1);
      const Forward cpu = forward(x, w);

      Tensor dx = Tensor::empty(shape, t);
      Tensor dx_g = on_gpu(Tensor::full(shape, 7.0, t));  // overwritten, not accumulated
      ops::rmsnorm_backward_input(x, w, cpu.rstd, dy, dx);
      ops::rmsnorm_backward_input(on_gpu(x), on_gpu(w), on_gpu(cpu.rstd), on_gpu(dy), dx_g);
      DSX_REQUIRE_CLOSE(dx_g, dx, tol_for(t));

      Tensor dw = random_tensor({shape[1]}, t, 6);  // accumulated into
      Tensor dw_g = on_gpu(dw);
      ops::rmsnorm_backward_weight(x, cpu.rstd, dy, dw);
      ops::rmsnorm_backward_weight(on_gpu(x), on_gpu(cpu.rstd), on_gpu(dy), dw_g);
      DSX_REQUIRE_CLOSE(dw_g, dw, tol_for(t));
    }
  }
}

TEST_CASE("gpu rmsnorm: the whole chain on the device and a deterministic weight gradient", "[gpu][norm]") {
  const Shape shape{1000, 1031};
  const Tensor x = random_tensor(shape, DType::f32, 7, -2, 2);
  const Tensor w = random_tensor({shape[1]}, DType::f32, 8, 0.5, 1.5);
  const Tensor dy = random_tensor(shape, DType::f32, 9);
  const Forward cpu = forward(x, w);
  const Tensor xg = on_gpu(x), wg = on_gpu(w), dyg = on_gpu(dy);
  const Forward gpu = forward(xg, wg);
  Tensor dx = Tensor::empty(shape, DType::f32), dx_g = Tensor::empty(shape, DType::f32, Device::cuda);
  ops::rmsnorm_backward_input(x, w, cpu.rstd, dy, dx);
  ops::rmsnorm_backward_input(xg, wg, gpu.rstd, dyg, dx_g);
  DSX_REQUIRE_CLOSE(dx_g, dx, 2e-5);  // also carries the rstd difference, ~1e-6 relative

  Tensor dw = Tensor::zeros({shape[1]}, DType::f32);
  ops::rmsnorm_backward_weight(x, cpu.rstd, dy, dw);
  Tensor first = Tensor::zeros({shape[1]}, DType::f32, Device::cuda);
  Tensor second = Tensor::zeros({shape[1]}, DType::f32, Device::cuda);
  ops::rmsnorm_backward_weight(xg, gpu.rstd, dyg, first);
  ops::rmsnorm_backward_weight(xg, gpu.rstd, dyg, second);
  DSX_REQUIRE_CLOSE(first, dw, 2e-5);
  REQUIRE(same_values(on_cpu(first), on_cpu(second)));  // no atomics: the same bits every run
}

TEST_CASE("gpu rmsnorm rejects what the CPU rejects", "[gpu][norm]") {
  const Tensor x = on_gpu(random_tensor({3, 8}, DType::f32, 40));
  const Tensor w = on_gpu(random_tensor({8}, DType::f32, 41));
  Tensor y = Tensor::zeros({3, 8}, DType::f32, Device::cuda), rstd = Tensor::zeros({3}, DType::f32, Device::cuda);
  REQUIRE_NOTHROW(ops::rmsnorm_forward(x, w, kEps, y, rstd));
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, on_gpu(random_tensor({7}, DType::f32, 42)), kEps, y, rstd),
                    std::invalid_argument);
  Tensor rstd_wrong = Tensor::zeros({4}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w, kEps, y, rstd_wrong), std::invalid_argument);
  Tensor y_wrong = Tensor::zeros({3, 9}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w, kEps, y_wrong, rstd), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, on_gpu(random_tensor({8}, DType::f64, 41)), kEps, y, rstd),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, w, -1.0, y, rstd), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x, random_tensor({8}, DType::f32, 41), kEps, y, rstd),
                    std::invalid_argument);  // weight on the CPU
  const Tensor x16 = on_gpu(random_tensor({3, 8}, DType::bf16, 43));
  Tensor y16 = Tensor::zeros({3, 8}, DType::bf16, Device::cuda);
  Tensor rstd16 = Tensor::zeros({3}, DType::bf16, Device::cuda);
  REQUIRE_THROWS_AS(ops::rmsnorm_forward(x16, w.to(DType::bf16), kEps, y16, rstd16), std::invalid_argument);

  const Tensor dy_wrong = on_gpu(random_tensor({3, 7}, DType::f32, 44));
  Tensor dx = Tensor::zeros({3, 8}, DType::f32, Device::cuda), dw = Tensor::zeros({8}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::rmsnorm_backward_input(x, w, rstd, dy_wrong, dx), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rmsnorm_backward_weight(x, rstd, dy_wrong, dw), std::invalid_argument);
  Tensor dw_wrong = Tensor::zeros({9}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::rmsnorm_backward_weight(x, rstd, y, dw_wrong), std::invalid_argument);
}
