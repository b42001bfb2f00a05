// The CUDA FP8 quantization ops against the CPU ops, bit for bit (codes and scales): 1×128
// tiles, 128×128 blocks, transposed tiles, both scale rules, dequantization and the block
// transpose, on shapes with partial tiles and blocks.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "gpu_check.h"
#include "kernels/ops/fp8.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using ops::Fp8Matrix;
using ops::Fp8Scaling;

namespace {

// Bitwise equality of the raw bytes (same_values would let -0 equal +0 and any NaN code equal
// another): fp8 codes, including the NaN code, come from the shared codecs and must match
// exactly.
bool same_bytes(const Tensor& gpu, const Tensor& cpu) {
  const Tensor g = on_cpu(gpu);
  return g.shape() == cpu.shape() && g.dtype() == cpu.dtype() && std::memcmp(g.raw(), cpu.raw(), cpu.nbytes()) == 0;
}

// f32 tensors bit for bit, except that any NaN equals any NaN: the payload of a NaN produced by
// arithmetic is the hardware's (x86 propagates the operand's quiet NaN, NVIDIA GPUs return the
// canonical 0x7fffffff), so the scale of a tile holding a NaN is NaN on both devices but not
// necessarily the same NaN.
bool same_f32_bits(const Tensor& gpu, const Tensor& cpu) {
  const Tensor g = on_cpu(gpu);
  if (g.shape() != cpu.shape() || g.dtype() != DType::f32 || cpu.dtype() != DType::f32) return false;
  const float* a = g.data<float>();
  const float* b = cpu.data<float>();
  for (int64_t i = 0; i < cpu.numel(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0) {
      UNSCOPED_INFO("element " << i << ": gpu " << a[i] << ", cpu " << b[i]);
      return false;
    }
  }
  return true;
}

void require_same_matrix(const Fp8Matrix& gpu, const Fp8Matrix& cpu) {
  REQUIRE(gpu.scaling == cpu.scaling);
  REQUIRE(gpu.data.device() == Device::cuda);
  REQUIRE(same_f32_bits(gpu.scales, cpu.scales));
  REQUIRE(same_bytes(gpu.data, cpu.data));
}

Fp8Matrix to_gpu(const Fp8Matrix& m) {
  return {on_gpu(m.data), on_gpu(m.scales), m.scaling};
}

// Values spanning many binades (each 128-run gets its own magnitude, from 2^-30 to 2^20, so the
// scales differ and hit subnormal fp8 codes), with exact zeros, an all-zero row, negative
// zeros, and — when `special` — a NaN and an infinity in two tiles.
Tensor awkward_values(int64_t rows, int64_t cols, DType dtype, uint64_t seed, bool special) {
  std::vector<double> v = random_tensor({rows, cols}, DType::f64, seed, -1.0, 1.0).to_vector();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      double& x = v[static_cast<size_t>(r * cols + c)];
      const int exponent = static_cast<int>((r * 7 + (c / 128) * 13 + r / 128 * 5) % 51) - 30;
      x = std::ldexp(x, exponent);
      if ((r + c) % 97 == 0) x = 0.0;
      if ((r + 3 * c) % 89 == 0) x = -0.0;
      if (r == rows / 2 && rows > 2) x = 0.0;  // an all-zero row
    }
  }
  if (special && rows * cols > 300) {
    v[static_cast<size_t>(rows * cols / 3)] = std::numeric_limits<double>::quiet_NaN();
    v[static_cast<size_t>(rows * cols - 2)] = std::numeric_limits<double>::infinity();
  }
  return Tensor::from<double>(v, {rows, cols}).to(dtype);
}

struct Shape2 {
  int64_t rows, cols;
};
const std::vector<Shape2> kShapes = {{1, 1},   {1, 128},   {1, 129},    {3, 5000},   {129, 257}, {128, 128},
                                     {127, 1}, {256, 384}, {300, 1000}, {513, 1792}, {2000, 33}};

}  // namespace

TEST_CASE("fp8_quantize on the GPU equals the CPU bit for bit", "[gpu][fp8_quant]") {
  for (const Shape2& s : kShapes) {
    for (DType dtype : {DType::f32, DType::bf16}) {
      for (Fp8Scaling scaling : {Fp8Scaling::tile_1x128, Fp8Scaling::block_128x128}) {
        for (bool pow2 : {false, true}) {
          for (bool special : {false, true}) {
            INFO(s.rows << "x" << s.cols << " " << dtype_name(dtype) << ", "
                        << (scaling == Fp8Scaling::tile_1x128 ? "1x128 tiles" : "128x128 blocks") << ", pow2 " << pow2
                        << ", NaN/inf " << special);
            const Tensor x = awkward_values(s.rows, s.cols, dtype, 11 + s.rows * s.cols, special);
            const ops::Fp8QuantOptions options{pow2};
            Fp8Matrix cpu = Fp8Matrix::empty(s.rows, s.cols, scaling);
            ops::fp8_quantize(x, cpu, options);
            Fp8Matrix gpu = Fp8Matrix::empty(s.rows, s.cols, scaling, Device::cuda);
            ops::fp8_quantize(on_gpu(x), gpu, options);
            require_same_matrix(gpu, cpu);

            // dequantization of the same codes
            Tensor back_cpu = Tensor::empty({s.rows, s.cols}, DType::f32);
            ops::fp8_dequantize(cpu, back_cpu);
            Tensor back_gpu = Tensor::empty({s.rows, s.cols}, DType::f32, Device::cuda);
            ops::fp8_dequantize(gpu, back_gpu);
            REQUIRE(same_f32_bits(back_gpu, back_cpu));
          }
        }
      }
    }
  }
}

TEST_CASE("fp8_quantize_transposed on the GPU equals the CPU bit for bit", "[gpu][fp8_quant]") {
  for (const Shape2& s : kShapes) {
    for (DType dtype : {DType::f32, DType::bf16}) {
      for (bool pow2 : {false, true}) {
        for (bool special : {false, true}) {
          INFO(s.rows << "x" << s.cols << " " << dtype_name(dtype) << ", pow2 " << pow2 << ", NaN/inf " << special);
          const Tensor x = awkward_values(s.rows, s.cols, dtype, 23 + s.rows + s.cols, special);
          const ops::Fp8QuantOptions options{pow2};
          Fp8Matrix cpu = Fp8Matrix::empty(s.cols, s.rows, Fp8Scaling::tile_1x128);
          ops::fp8_quantize_transposed(x, cpu, options);
          Fp8Matrix gpu = Fp8Matrix::empty(s.cols, s.rows, Fp8Scaling::tile_1x128, Device::cuda);
          ops::fp8_quantize_transposed(on_gpu(x), gpu, options);
          require_same_matrix(gpu, cpu);
        }
      }
    }
  }
}

TEST_CASE("fp8_transpose_blocks on the GPU equals the CPU bit for bit", "[gpu][fp8_quant]") {
  for (const Shape2& s : kShapes) {
    for (bool pow2 : {false, true}) {
      INFO(s.rows << "x" << s.cols << ", pow2 " << pow2);
      const Tensor w = awkward_values(s.rows, s.cols, DType::f32, 37 + s.rows, false);
      Fp8Matrix q = Fp8Matrix::empty(s.rows, s.cols, Fp8Scaling::block_128x128);
      ops::fp8_quantize(w, q, {pow2});
      const Fp8Matrix cpu = ops::fp8_transpose_blocks(q);
      const Fp8Matrix gpu = ops::fp8_transpose_blocks(to_gpu(q));
      require_same_matrix(gpu, cpu);
    }
  }
}

TEST_CASE("the GPU fp8 ops reject bad input like the CPU", "[gpu][fp8_quant]") {
  const Tensor x = on_gpu(random_tensor({4, 130}, DType::f32, 1));
  Fp8Matrix wrong = Fp8Matrix::empty(4, 129, Fp8Scaling::tile_1x128, Device::cuda);
  REQUIRE_THROWS_AS(ops::fp8_quantize(x, wrong), std::invalid_argument);
  Fp8Matrix blocks = Fp8Matrix::empty(130, 4, Fp8Scaling::block_128x128, Device::cuda);
  REQUIRE_THROWS_AS(ops::fp8_quantize_transposed(x, blocks), std::invalid_argument);
  Fp8Matrix q = Fp8Matrix::empty(4, 130, Fp8Scaling::tile_1x128, Device::cuda);
  REQUIRE_THROWS_AS(ops::fp8_quantize(x.to(DType::f64), q), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::fp8_transpose_blocks(q), std::invalid_argument);  // tiles, not blocks
  Fp8Matrix host_q = Fp8Matrix::empty(4, 130, Fp8Scaling::tile_1x128);
  REQUIRE_THROWS_WITH(ops::fp8_quantize(x, host_q), Catch::Contains("q.data is on cpu"));
  Tensor out64 = Tensor::empty({4, 130}, DType::f64, Device::cuda);
  ops::fp8_quantize(x, q);
  REQUIRE_THROWS_AS(ops::fp8_dequantize(q, out64), std::invalid_argument);
}
