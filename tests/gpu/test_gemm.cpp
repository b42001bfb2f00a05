// The cuBLASLt GEMMs (kernels/cuda/gemm.cu, gemm_fp8.cu) against the CPU ops on random inputs,
// through the public ops (the routing) with every operand on the GPU.
//
// Tolerances are per element, in units of what the sums are made of: with S = Σ_k |a_k·b_k| (the
// operands the GEMM actually multiplies: bf16-rounded or dequantized) and u = 2^-24, one fp32
// GEMM is within (K + 2)·u·S of the exact sum whatever its summation order, so two of them (CPU
// BLAS, GPU cuBLAS) differ by at most 2·(K + 2)·u·S. The tests allow twice that, 4·(K + 2)·u·S
// (+ |beta·c_old| terms): the tensor cores' fp32 accumulation need not round to nearest at every
// step. This is tight enough to catch what would be a bug: TF32 (2^-11 per product), operands
// rounded other than to nearest even, or a wrong transpose/offset (O(S) errors). f64 uses
// u = 2^-53. A bf16 output may land on the neighbouring bf16 value: + 2^-6·|cpu| (one bf16 ulp
// is at most 2^-7 of the value, doubled for a binade edge).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "gpu_check.h"
#include "kernels/cuda/cublaslt.h"
#include "kernels/cuda/ops_gemm.h"
#include "kernels/cuda/runtime.h"
#include "kernels/ops/bf16_gemm.h"
#include "kernels/ops/fp8.h"
#include "kernels/ops/gemm.h"
#include "kernels/ops/linear.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;

namespace {

constexpr double kF32Unit = 0x1p-24;
constexpr double kF64Unit = 0x1p-53;
constexpr double kBf16Neighbour = 0x1p-6;

struct GemmShape {
  int64_t m, n, k;
};
// 1×1×1, odd sizes below a warp, just above the 128-wide tiles, and a wider inner dimension.
const std::vector<GemmShape> kShapes = {{1, 1, 1}, {7, 13, 5}, {129, 257, 130}, {64, 96, 300}, {33, 1, 77}};

std::string shape_name(GemmShape s) {
  return std::to_string(s.m) + "x" + std::to_string(s.n) + "x" + std::to_string(s.k);
}

// The stored shape of an operand whose op() is [rows, cols].
Shape stored(bool trans, int64_t rows, int64_t cols) {
  return trans ? Shape{cols, rows} : Shape{rows, cols};
}

// |x| elementwise as an f64 CPU tensor.
Tensor abs_f64(const Tensor& x) {
  std::vector<double> v = x.to_vector();
  for (double& e : v) e = std::abs(e);
  return Tensor::from<double>(v, x.shape());
}

// S [M, N] = Σ_k |op(a)_ik|·|op(b)_kj| in f64 (a, b on either device, any float dtype).
std::vector<double> sum_abs(bool ta, bool tb, const Tensor& a, const Tensor& b, int64_t m, int64_t n) {
  Tensor s = Tensor::zeros({m, n}, DType::f64);
  ops::gemm(ta, tb, 1.0, abs_f64(on_cpu(a)), abs_f64(on_cpu(b)), 0.0, s);
  return s.to_vector();
}

// Per element |gpu - cpu| <= bound; reports the worst error/bound ratio. NaN fails unless both are NaN.
void require_within(const Tensor& gpu, const Tensor& cpu, const std::vector<double>& bound) {
  REQUIRE(gpu.shape() == cpu.shape());
  const auto g = gpu.to_vector(), c = cpu.to_vector();
  REQUIRE(g.size() == bound.size());
  double worst = 0.0;
  size_t at = 0;
  for (size_t i = 0; i < g.size(); ++i) {
    if (std::isnan(g[i]) && std::isnan(c[i])) continue;
    const double ratio = std::abs(g[i] - c[i]) / bound[i];
    if (!(ratio <= worst)) {  // also takes NaN, which then fails below
      worst = std::isnan(ratio) ? INFINITY : ratio;
      at = i;
    }
  }
  INFO("worst element " << at << ": gpu " << g[at] << ", cpu " << c[at] << ", bound " << bound[at] << ", error/bound "
                        << worst);
  REQUIRE(worst <= 1.0);
}

// The bound of two fp32 (or f64) GEMMs of the same operands: 4·(K + 2)·u·(|alpha|·S + |beta·c_old|).
std::vector<double> sum_bound(const std::vector<double>& s, double k, double unit, double alpha = 1.0,
                              const std::vector<double>& c_old = {}, double beta = 0.0) {
  std::vector<double> bound(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    const double old = c_old.empty() ? 0.0 : std::abs(beta * c_old[i]);
    bound[i] = 4.0 * (k + 2.0) * unit * (std::abs(alpha) * s[i] + old) + 1e-300;
  }
  return bound;
}

// + one bf16 neighbour of the reference, for a bf16 output.
void add_bf16_output(std::vector<double>& bound, const Tensor& cpu) {
  const auto c = cpu.to_vector();
  for (size_t i = 0; i < bound.size(); ++i) bound[i] += kBf16Neighbour * std::abs(c[i]) + 0x1p-133;
}

}  // namespace

// ---- gemm ---------------------------------------------------------------------------------------

TEST_CASE("gemm f32/f64 matches the CPU for every transpose, shape, alpha and beta", "[gpu][gemm]") {
  uint64_t seed = 100;
  for (DType t : {DType::f32, DType::f64}) {
    const double unit = t == DType::f32 ? kF32Unit : kF64Unit;
    for (GemmShape s : kShapes) {
      for (int trans = 0; trans < 4; ++trans) {
        const bool ta = trans & 1, tb = trans & 2;
        for (auto [alpha, beta] : {std::pair{1.0, 0.0}, std::pair{0.5, -1.5}}) {
          INFO(dtype_name(t) << " " << shape_name(s) << " trans_a " << ta << " trans_b " << tb << " alpha " << alpha
                             << " beta " << beta);
          const Tensor a = random_tensor(stored(ta, s.m, s.k), t, ++seed);
          const Tensor b = random_tensor(stored(tb, s.k, s.n), t, ++seed);
          const Tensor c0 = random_tensor({s.m, s.n}, t, ++seed);
          Tensor c_cpu = c0.clone(), c_gpu = on_gpu(c0);
          ops::gemm(ta, tb, alpha, a, b, beta, c_cpu);
          ops::gemm(ta, tb, alpha, on_gpu(a), on_gpu(b), beta, c_gpu);
          REQUIRE(c_gpu.device() == Device::cuda);
          require_within(c_gpu, c_cpu,
                         sum_bound(sum_abs(ta, tb, a, b, s.m, s.n), s.k, unit, alpha, c0.to_vector(), beta));
        }
      }
    }
  }
}

TEST_CASE("gemm f32 keeps every fp32 operand bit (no TF32)", "[gpu][gemm]") {
  // (1 + 2^-20)·1 is exact in fp32; TF32 keeps 10 mantissa bits and would return 1.
  const float x = 1.0f + 0x1p-20f;
  const Tensor a = on_gpu(Tensor::from<float>({x, x}, {1, 2}));
  const Tensor b = on_gpu(Tensor::from<float>({1.0f, 0.0f}, {2, 1}));
  Tensor c = Tensor::zeros({1, 1}, DType::f32, Device::cuda);
  ops::gemm(false, false, 1.0, a, b, 0.0, c);
  REQUIRE(c.item() == static_cast<double>(x));
}

TEST_CASE("gemm: beta = 0 overwrites NaN, K = 0 gives beta·c, empty outputs are no-ops", "[gpu][gemm]") {
  const Tensor nan_c = Tensor::full({3, 4}, NAN, DType::f32);
  const Tensor a = on_gpu(random_tensor({3, 5}, DType::f32, 1)), b = on_gpu(random_tensor({5, 4}, DType::f32, 2));
  Tensor c = on_gpu(nan_c);
  ops::gemm(false, false, 1.0, a, b, 0.0, c);
  for (double v : c.to_vector()) REQUIRE(std::isfinite(v));

  for (DType t : {DType::f32, DType::f64}) {
    const Tensor a0 = Tensor::empty({3, 0}, t, Device::cuda), b0 = Tensor::empty({0, 4}, t, Device::cuda);
    Tensor c_nan = on_gpu(nan_c.to(t));
    ops::gemm(false, false, 1.0, a0, b0, 0.0, c_nan);
    REQUIRE(dsx::test::same_values(on_cpu(c_nan), Tensor::zeros({3, 4}, t)));
    const Tensor c0 = random_tensor({3, 4}, t, 3);
    Tensor c_gpu = on_gpu(c0), c_cpu = c0.clone();
    ops::gemm(false, false, 1.0, a0, b0, 2.5, c_gpu);
    ops::gemm(false, false, 1.0, Tensor::empty({3, 0}, t), Tensor::empty({0, 4}, t), 2.5, c_cpu);
    REQUIRE(dsx::test::same_values(on_cpu(c_gpu), c_cpu));
    Tensor empty_c = Tensor::empty({0, 4}, t, Device::cuda);
    ops::gemm(false, false, 1.0, Tensor::empty({0, 5}, t, Device::cuda), on_gpu(b.to(t)), 0.0, empty_c);
  }
}

TEST_CASE("gemm on offset views (slices) and the plan cache", "[gpu][gemm]") {
  // Slices start 4 (f32) or 2 (bf16) bytes into their storage: cuBLASLt gets plans for that
  // alignment (or aligned copies) and the results must not move.
  for (DType t : {DType::f32, DType::bf16}) {
    INFO(dtype_name(t));
    const Tensor a_full = random_tensor({41, 37}, t, 11), b = random_tensor({23, 37}, t, 12);
    const Tensor a = a_full.slice(1, 41);  // [40, 37], 37 elements into the storage
    Tensor c_cpu = Tensor::zeros({40, 23}, DType::f32);
    Tensor c_full = Tensor::zeros({41, 23}, DType::f32, Device::cuda);
    Tensor c_gpu = c_full.slice(1, 41);
    ops::bf16_gemm(false, true, a, b, c_cpu);
    ops::bf16_gemm(false, true, on_gpu(a_full).slice(1, 41), on_gpu(b), c_gpu);
    require_within(c_gpu, c_cpu,
                   sum_bound(sum_abs(false, true, a.to(DType::bf16), b.to(DType::bf16), 40, 23), 37, kF32Unit));
  }
  {  // gemm f32 with every operand an offset view
    const Tensor a_full = random_tensor({30, 19}, DType::f32, 15), b_full = random_tensor({20, 21}, DType::f32, 16);
    const Tensor c0 = random_tensor({30, 21}, DType::f32, 17);
    Tensor c_cpu = c0.slice(1, 30).clone(), c_full = on_gpu(c0);
    Tensor c_gpu = c_full.slice(1, 30);
    ops::gemm(false, false, 1.0, a_full.slice(1, 30), b_full.slice(1, 20), 0.5, c_cpu);
    ops::gemm(false, false, 1.0, on_gpu(a_full).slice(1, 30), on_gpu(b_full).slice(1, 20), 0.5, c_gpu);
    require_within(c_gpu, c_cpu,
                   sum_bound(sum_abs(false, false, a_full.slice(1, 30), b_full.slice(1, 20), 29, 21), 19, kF32Unit, 1.0,
                             c0.slice(1, 30).to_vector(), 0.5));
    REQUIRE(dsx::test::same_values(on_cpu(c_full).slice(0, 1), c0.slice(0, 1)));  // the row before is untouched
  }
  // The second call of a shape asks the heuristic nothing: no new plan.
  const Tensor a = on_gpu(random_tensor({64, 48}, DType::bf16, 13)),
               w = on_gpu(random_tensor({80, 48}, DType::bf16, 14));
  Tensor y = Tensor::empty({64, 80}, DType::f32, Device::cuda);
  ops::linear_forward(a, w, y);
  const size_t plans = cuda::blas::cached_plan_count();
  for (int i = 0; i < 3; ++i) ops::linear_forward(a, w, y);
  REQUIRE(cuda::blas::cached_plan_count() == plans);
}

TEST_CASE("gemm checks its arguments like the CPU op, and the device of every tensor", "[gpu][gemm]") {
  const Tensor a = on_gpu(random_tensor({4, 6}, DType::f32, 1)), b = on_gpu(random_tensor({6, 5}, DType::f32, 2));
  Tensor c = Tensor::zeros({4, 5}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::gemm(true, false, 1.0, a, b, 0.0, c), std::invalid_argument);  // inner 4 vs 6
  Tensor wrong_c = Tensor::zeros({5, 4}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a, b, 0.0, wrong_c), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a, on_gpu(random_tensor({6, 5}, DType::f64, 3)), 0.0, c),
                    std::invalid_argument);
  Tensor c16 = Tensor::zeros({4, 5}, DType::bf16, Device::cuda);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a.to(DType::bf16), b.to(DType::bf16), 0.0, c16),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a.view({4, 6, 1}), b, 0.0, c), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, on_cpu(a), b, 0.0, c), std::invalid_argument);  // a on the CPU
  Tensor c_host = Tensor::zeros({4, 5}, DType::f32);
  REQUIRE_THROWS_AS(ops::gemm(false, false, 1.0, a, b, 0.0, c_host), std::invalid_argument);  // CPU op, GPU a
}

TEST_CASE("cuBLAS errors name the call, file and line", "[gpu][gemm]") {
  cublasLtMatmulDesc_t desc = nullptr;
  REQUIRE(cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS);
  const int8_t too_small = 0;  // TRANSA holds a 4-byte cublasOperation_t: documented INVALID_VALUE
  std::string what;
  try {
    DSX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &too_small, sizeof too_small));
  } catch (const cuda::blas::CublasError& e) {
    what = e.what();
  }
  cublasLtMatmulDescDestroy(desc);
  INFO(what);
  REQUIRE(what.find("cublasLtMatmulDescSetAttribute(") != std::string::npos);
  REQUIRE(what.find("test_gemm.cpp:") != std::string::npos);
  REQUIRE(what.find("CUBLAS_STATUS_INVALID_VALUE") != std::string::npos);
}

// ---- linear -------------------------------------------------------------------------------------

namespace {

struct LinearCase {
  DType x, w, out;  // input dtypes (x/dy and weight) and the output's
};

// Every accepted mix: the bf16 tensor-core path (bf16 × bf16 → f32), f32, f64, one bf16 input.
const std::vector<LinearCase> kLinearCases = {
    {DType::bf16, DType::bf16, DType::f32}, {DType::f32, DType::f32, DType::f32},
    {DType::bf16, DType::f32, DType::f32},  {DType::f32, DType::bf16, DType::f32},
    {DType::f64, DType::f64, DType::f64},   {DType::bf16, DType::bf16, DType::f64}};

// N tokens, in, out (incl. N = 0 and in = 0: empty sums).
const std::vector<GemmShape> kLinearShapes = {{1, 1, 1},     {7, 13, 5}, {129, 257, 130},
                                              {300, 64, 96}, {0, 8, 16}, {5, 0, 3}};

}  // namespace

TEST_CASE("linear forward, input and weight gradients match the CPU for every dtype mix", "[gpu][linear]") {
  uint64_t seed = 1000;
  for (const LinearCase& lc : kLinearCases) {
    const double unit = lc.out == DType::f64 ? kF64Unit : kF32Unit;
    for (GemmShape s : kLinearShapes) {
      const int64_t tokens = s.m, in = s.n, out = s.k;
      INFO("x/dy " << dtype_name(lc.x) << ", weight " << dtype_name(lc.w) << ", out " << dtype_name(lc.out) << ", N "
                   << tokens << " in " << in << " out " << out);
      const Tensor x = random_tensor({tokens, in}, lc.x, ++seed), w = random_tensor({out, in}, lc.w, ++seed);
      const Tensor dy = random_tensor({tokens, out}, lc.x, ++seed);
      const Tensor dw0 = random_tensor({out, in}, lc.out, ++seed);

      Tensor y_cpu = Tensor::full({tokens, out}, NAN, lc.out), y_gpu = on_gpu(y_cpu);
      ops::linear_forward(x, w, y_cpu);
      ops::linear_forward(on_gpu(x), on_gpu(w), y_gpu);
      require_within(y_gpu, y_cpu, sum_bound(sum_abs(false, true, x, w, tokens, out), in, unit));

      Tensor dx_cpu = Tensor::full({tokens, in}, NAN, lc.out), dx_gpu = on_gpu(dx_cpu);
      ops::linear_backward_input(dy, w, dx_cpu);
      ops::linear_backward_input(on_gpu(dy), on_gpu(w), dx_gpu);
      require_within(dx_gpu, dx_cpu, sum_bound(sum_abs(false, false, dy, w, tokens, in), out, unit));

      Tensor dw_cpu = dw0.clone(), dw_gpu = on_gpu(dw0);  // accumulates into dw0
      ops::linear_backward_weight(dy, x, dw_cpu);
      ops::linear_backward_weight(on_gpu(dy), on_gpu(x), dw_gpu);
      require_within(dw_gpu, dw_cpu,
                     sum_bound(sum_abs(true, false, dy, x, out, in), tokens, unit, 1.0, dw0.to_vector(), 1.0));
    }
  }
}

TEST_CASE("linear checks its arguments like the CPU op", "[gpu][linear]") {
  const Tensor x = on_gpu(random_tensor({4, 6}, DType::f32, 1)), w = on_gpu(random_tensor({5, 6}, DType::f32, 2));
  Tensor y = Tensor::zeros({4, 5}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::linear_forward(x, on_gpu(random_tensor({5, 7}, DType::f32, 3)), y), std::invalid_argument);
  Tensor y_wrong = Tensor::zeros({4, 6}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::linear_forward(x, w, y_wrong), std::invalid_argument);
  Tensor y_bf16 = Tensor::zeros({4, 5}, DType::bf16, Device::cuda);
  REQUIRE_THROWS_AS(ops::linear_forward(x, w, y_bf16), std::invalid_argument);            // the output sets f32|f64
  REQUIRE_THROWS_AS(ops::linear_forward(x, w.to(DType::f64), y), std::invalid_argument);  // no f64 into f32
  REQUIRE_THROWS_AS(ops::linear_forward(x.view({4, 6, 1}), w, y), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::linear_forward(on_cpu(x), w, y), std::invalid_argument);
  const Tensor dy = on_gpu(random_tensor({4, 5}, DType::f32, 4));
  Tensor dx_wrong = Tensor::zeros({4, 5}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::linear_backward_input(dy, w, dx_wrong), std::invalid_argument);
  Tensor dw_wrong = Tensor::zeros({6, 5}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::linear_backward_weight(dy, x, dw_wrong), std::invalid_argument);
  Tensor dw = Tensor::zeros({5, 6}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::linear_backward_weight(dy, x.slice(0, 3), dw), std::invalid_argument);
}

// ---- bf16_gemm ----------------------------------------------------------------------------------

TEST_CASE("bf16_gemm matches the CPU emulation: every transpose, operand and output dtype", "[gpu][bf16_gemm]") {
  // Operands spread over binades with full f32 mantissas, so nearly every f32 operand is rounded;
  // a GPU rounding other than to nearest even would miss the bound by orders of magnitude.
  uint64_t seed = 2000;
  const std::vector<GemmShape> shapes = {{1, 1, 1}, {7, 13, 5}, {129, 257, 130}, {64, 96, 300}, {256, 384, 512}};
  for (GemmShape s : shapes) {
    for (int trans = 0; trans < 4; ++trans) {
      const bool ta = trans & 1, tb = trans & 2;
      for (DType in : {DType::f32, DType::bf16}) {
        for (DType out : {DType::f32, DType::bf16}) {
          for (bool accumulate : {false, true}) {
            INFO(shape_name(s) << " trans_a " << ta << " trans_b " << tb << " operands " << dtype_name(in) << " c "
                               << dtype_name(out) << " accumulate " << accumulate);
            const Tensor a = random_tensor(stored(ta, s.m, s.k), DType::f32, ++seed, -3, 3).to(in);
            const Tensor b = random_tensor(stored(tb, s.k, s.n), DType::f32, ++seed, -0.01, 0.01).to(in);
            const Tensor c0 = random_tensor({s.m, s.n}, out, ++seed);
            Tensor c_cpu = c0.clone(), c_gpu = on_gpu(c0);
            ops::bf16_gemm(ta, tb, a, b, c_cpu, accumulate);
            ops::bf16_gemm(ta, tb, on_gpu(a), on_gpu(b), c_gpu, accumulate);
            const auto s_abs = sum_abs(ta, tb, a.to(DType::bf16), b.to(DType::bf16), s.m, s.n);
            auto bound = sum_bound(s_abs, s.k, kF32Unit, 1.0, c0.to_vector(), accumulate ? 1.0 : 0.0);
            if (out == DType::bf16) add_bf16_output(bound, c_cpu);
            require_within(c_gpu, c_cpu, bound);
          }
        }
      }
    }
  }
}

TEST_CASE("bf16_gemm: mixed operand dtypes, K = 0, and argument checks", "[gpu][bf16_gemm]") {
  const Tensor a = random_tensor({9, 17}, DType::f32, 1), b = random_tensor({17, 11}, DType::bf16, 2);
  Tensor c_cpu = Tensor::zeros({9, 11}, DType::f32), c_gpu = on_gpu(c_cpu);
  ops::bf16_gemm(false, false, a, b, c_cpu);
  ops::bf16_gemm(false, false, on_gpu(a), on_gpu(b), c_gpu);
  require_within(c_gpu, c_cpu, sum_bound(sum_abs(false, false, a.to(DType::bf16), b, 9, 11), 17, kF32Unit));
  // The caller's f32 operand is not modified by the rounding.
  const Tensor a_gpu = on_gpu(a);
  ops::bf16_gemm(false, false, a_gpu, on_gpu(b), c_gpu);
  REQUIRE(dsx::test::same_values(on_cpu(a_gpu), a));

  for (DType out : {DType::f32, DType::bf16}) {
    const Tensor c0 = random_tensor({3, 4}, out, 5);
    Tensor kept = on_gpu(c0), zeroed = on_gpu(c0);
    const Tensor a0 = Tensor::empty({3, 0}, DType::bf16, Device::cuda),
                 b0 = Tensor::empty({0, 4}, DType::bf16, Device::cuda);
    ops::bf16_gemm(false, false, a0, b0, kept, true);
    ops::bf16_gemm(false, false, a0, b0, zeroed, false);
    REQUIRE(dsx::test::same_values(on_cpu(kept), c0));
    REQUIRE(dsx::test::same_values(on_cpu(zeroed), Tensor::zeros({3, 4}, out)));
  }

  Tensor c = Tensor::zeros({9, 11}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::bf16_gemm(true, false, on_gpu(a), on_gpu(b), c), std::invalid_argument);  // inner 9 vs 17
  Tensor c64 = Tensor::zeros({9, 11}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::bf16_gemm(false, false, on_gpu(a), on_gpu(b), c64), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::bf16_gemm(false, false, on_gpu(a.to(DType::f64)), on_gpu(b), c), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::bf16_gemm(false, false, a, on_gpu(b), c), std::invalid_argument);  // a on the CPU
}

// ---- fp8_gemm -----------------------------------------------------------------------------------

namespace {

using ops::Fp8Matrix;
using ops::Fp8Scaling;

// x [rows, cols] with magnitudes varying by 2^-4 .. 2^4 from one 1×128 tile to the next (and
// between rows), so every scale differs: a scale applied to the wrong tile or block is an O(S)
// error, far outside the tolerance.
Tensor tiled_magnitudes(int64_t rows, int64_t cols, uint64_t seed) {
  Tensor x = random_tensor({rows, cols}, DType::f32, seed);
  float* p = x.data<float>();
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      const uint64_t h = (static_cast<uint64_t>(r) * 2654435761u + static_cast<uint64_t>(c / 128) * 40503u + seed) % 9;
      p[r * cols + c] = std::ldexp(p[r * cols + c], static_cast<int>(h) - 4);
    }
  }
  return x;
}

Fp8Matrix quantized(const Tensor& x, Fp8Scaling scaling) {
  Fp8Matrix q = Fp8Matrix::empty(x.dim(0), x.dim(1), scaling);
  ops::fp8_quantize(x, q);
  return q;
}

Fp8Matrix to_gpu(const Fp8Matrix& q) {
  return Fp8Matrix{on_gpu(q.data), on_gpu(q.scales), q.scaling};
}

Tensor dequantized(const Fp8Matrix& q) {
  Tensor x = Tensor::empty(q.data.shape(), DType::f32);
  ops::fp8_dequantize(q, x);
  return x;
}

struct Fp8Shape {
  int64_t m, n, k;
};

}  // namespace

TEST_CASE("fp8_gemm matches the CPU reference: 1x128 x 128x128 and 1x128 x 1x128, f32 and bf16 d", "[gpu][fp8_gemm]") {
  // K and N multiples of 16 with M a multiple of 4 take cuBLASLt's block-scaled path where the
  // GPU has it (K = 320: 3 chunks, the 128x128 scale rows padded to 4; K = 200, N = 13, and
  // M = 1 or 129: the fallback).
  const std::vector<Fp8Shape> shapes = {{1, 16, 16},     {7, 13, 5},       {129, 130, 200}, {144, 272, 320},
                                        {129, 256, 512}, {256, 512, 1024}, {64, 48, 4096}};
  uint64_t seed = 3000;
  for (Fp8Shape s : shapes) {
    for (Fp8Scaling b_scaling : {Fp8Scaling::block_128x128, Fp8Scaling::tile_1x128}) {
      const Fp8Matrix a = quantized(tiled_magnitudes(s.m, s.k, ++seed), Fp8Scaling::tile_1x128);
      const Fp8Matrix b = quantized(tiled_magnitudes(s.n, s.k, ++seed), b_scaling);
      const Fp8Matrix a_gpu = to_gpu(a), b_gpu = to_gpu(b);
      const auto s_abs = sum_abs(false, true, dequantized(a), dequantized(b), s.m, s.n);
      for (DType out : {DType::f32, DType::bf16}) {
        const bool scaled = cuda::fp8_gemm_uses_block_scaling(s.m, s.n, s.k, b_scaling, out);
        // Block-scaled: Hopper's FP8 tensor cores accumulate a 128-chunk with ~14-bit precision
        // before the fp32 promotion; docs/FP8.md suggests 2^-13·S, allowed here with 16x margin
        // until measured (a misplaced scale errs by O(S)). Fallback: dequantized operands (one
        // fp32 rounding each) and an fp32 sum over K, against the CPU's (128 + chunks + 2)·u·S.
        const double chunks = std::ceil(static_cast<double>(s.k) / 128.0);
        const double rel = scaled ? 0x1p-9 : 2.0 * ((s.k + 4.0) + (128.0 + chunks + 2.0)) * kF32Unit;
        for (bool accumulate : {false, true}) {
          INFO("M " << s.m << " N " << s.n << " K " << s.k << " b "
                    << (b_scaling == Fp8Scaling::block_128x128 ? "128x128" : "1x128") << " d " << dtype_name(out)
                    << " accumulate " << accumulate << " path "
                    << (scaled ? "cuBLASLt block-scaled" : "dequantize + f32 GEMM"));
          const Tensor d0 = random_tensor({s.m, s.n}, out, ++seed, -4, 4);
          Tensor d_cpu = d0.clone(), d_gpu = on_gpu(d0);
          ops::fp8_gemm(a, b, d_cpu, accumulate);
          ops::fp8_gemm(a_gpu, b_gpu, d_gpu, accumulate);
          const auto old = d0.to_vector();
          std::vector<double> bound(s_abs.size());
          double worst = 0.0;
          const auto g = d_gpu.to_vector(), c = d_cpu.to_vector();
          for (size_t i = 0; i < bound.size(); ++i) {
            bound[i] = rel * s_abs[i] + (accumulate ? 4.0 * kF32Unit * std::abs(old[i]) : 0.0) + 1e-30;
            worst = std::max(worst, std::abs(g[i] - c[i]) / (s_abs[i] + 1e-30));
          }
          if (out == DType::bf16) add_bf16_output(bound, d_cpu);
          if (out == DType::f32 && !accumulate) {
            std::printf("fp8_gemm %lldx%lldx%lld b %s, %s: worst |gpu - cpu| / S = %.3g (2^%.1f)\n",
                        static_cast<long long>(s.m), static_cast<long long>(s.n), static_cast<long long>(s.k),
                        b_scaling == Fp8Scaling::block_128x128 ? "128x128" : "1x128",
                        scaled ? "cuBLASLt block-scaled" : "dequantize + f32 GEMM", worst,
                        worst > 0 ? std::log2(worst) : -INFINITY);
          }
          require_within(d_gpu, d_cpu, bound);
        }
      }
    }
  }
}

TEST_CASE("fp8_gemm: the H100 takes the block-scaled path at DeepSeek-V3 shapes", "[gpu][fp8_gemm]") {
  // Not a correctness requirement elsewhere: on an sm_90 GPU cuBLASLt (>= 12.9) must accept
  // the recipe, otherwise every FP8 GEMM silently runs the slow fallback.
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, cuda::current_device()) == cudaSuccess);
  if (prop.major != 9) {
    WARN("not an sm_90 GPU (sm_" << prop.major << prop.minor << "): block-scaled FP8 is Hopper's");
    return;
  }
  for (Fp8Scaling b : {Fp8Scaling::block_128x128, Fp8Scaling::tile_1x128}) {
    for (DType out : {DType::f32, DType::bf16}) {
      REQUIRE(cuda::fp8_gemm_uses_block_scaling(4096, 2048, 7168, b, out));
      REQUIRE(cuda::fp8_gemm_uses_block_scaling(4096, 7168, 2048, b, out));
    }
  }
}

TEST_CASE("fp8_gemm: K = 0, empty outputs and argument checks", "[gpu][fp8_gemm]") {
  const Fp8Matrix a0 = to_gpu(quantized(Tensor::zeros({3, 0}, DType::f32), Fp8Scaling::tile_1x128));
  const Fp8Matrix b0 = to_gpu(quantized(Tensor::zeros({4, 0}, DType::f32), Fp8Scaling::block_128x128));
  for (DType out : {DType::f32, DType::bf16}) {
    const Tensor d0 = random_tensor({3, 4}, out, 7);
    Tensor kept = on_gpu(d0), zeroed = on_gpu(d0);
    ops::fp8_gemm(a0, b0, kept, true);
    ops::fp8_gemm(a0, b0, zeroed, false);
    REQUIRE(dsx::test::same_values(on_cpu(kept), d0));
    REQUIRE(dsx::test::same_values(on_cpu(zeroed), Tensor::zeros({3, 4}, out)));
  }
  const Fp8Matrix a = to_gpu(quantized(random_tensor({8, 32}, DType::f32, 1), Fp8Scaling::tile_1x128));
  const Fp8Matrix b = to_gpu(quantized(random_tensor({16, 32}, DType::f32, 2), Fp8Scaling::block_128x128));
  Tensor d = Tensor::zeros({8, 16}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::fp8_gemm(b, a, d), std::invalid_argument);  // a must be 1x128-tiled
  const Fp8Matrix b_k = to_gpu(quantized(random_tensor({16, 48}, DType::f32, 3), Fp8Scaling::block_128x128));
  REQUIRE_THROWS_AS(ops::fp8_gemm(a, b_k, d), std::invalid_argument);  // K differs
  Tensor d64 = Tensor::zeros({8, 16}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::fp8_gemm(a, b, d64), std::invalid_argument);
  Tensor d_wrong = Tensor::zeros({16, 8}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::fp8_gemm(a, b, d_wrong), std::invalid_argument);
  const Fp8Matrix b_host_scales{b.data, on_cpu(b.scales), b.scaling};
  REQUIRE_THROWS_AS(ops::fp8_gemm(a, b_host_scales, d), std::invalid_argument);
}
