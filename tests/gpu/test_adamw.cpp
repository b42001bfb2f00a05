// The CUDA optimizer ops against the CPU ops: AdamW (every moment dtype), sum of squares,
// global norm and gradient clipping.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "gpu_check.h"
#include "kernels/ops/adamw.h"
#include "kernels/ops/grad_norm.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;

namespace {

// Fraction of elements that are bit-identical (NaN = NaN).
double fraction_identical(const Tensor& gpu, const Tensor& cpu) {
  const auto a = on_cpu(gpu).to_vector(), b = cpu.to_vector();
  if (a.empty()) return 1.0;
  size_t same = 0;
  for (size_t i = 0; i < a.size(); ++i) same += a[i] == b[i] || (std::isnan(a[i]) && std::isnan(b[i]));
  return static_cast<double>(same) / static_cast<double>(a.size());
}

}  // namespace

TEST_CASE("adamw_step on the GPU matches the CPU for every moment dtype", "[gpu][adamw]") {
  ops::AdamWConfig config;
  config.lr = 3e-3;
  config.beta1 = 0.9;
  config.beta2 = 0.95;
  config.eps = 1e-8;
  config.weight_decay = 0.1;
  for (DType p : {DType::f32, DType::f64}) {
    for (DType m_type : {p, DType::bf16}) {
      for (DType v_type : {p, DType::bf16}) {
        for (int64_t n : {1, 1000, (1 << 20) + 3}) {
          INFO("param " << dtype_name(p) << ", m " << dtype_name(m_type) << ", v " << dtype_name(v_type) << ", n "
                        << n);
          Tensor param_cpu = random_tensor({n}, p, 1 + n);
          Tensor m_cpu = Tensor::zeros({n}, m_type), v_cpu = Tensor::zeros({n}, v_type);
          Tensor param_gpu = on_gpu(param_cpu), m_gpu = on_gpu(m_cpu), v_gpu = on_gpu(v_cpu);
          for (int64_t step = 1; step <= 4; ++step) {
            const Tensor grad = random_tensor({n}, p, 100 * step + n, -2.0, 2.0);
            ops::adamw_step(config, step, param_cpu, grad, m_cpu, v_cpu);
            ops::adamw_step(config, step, param_gpu, on_gpu(grad), m_gpu, v_gpu);
          }
          // The same operations in the same order with the same host-computed constants and no
          // FMA on the GPU: bit-identical unless the CPU build contracts a·b + c into an FMA
          // (-march=native), which moves a result by an ulp of its dtype. Parameters are O(1),
          // moments <= 4; an ulp of f32 is 1.2e-7 relative, of bf16 (moments) 7.8e-3.
          const double tol = p == DType::f32 ? 1e-6 : 1e-14;
          // Where that ulp makes an f32 value round to the other bf16 neighbour (~1e-5 of the
          // elements, so a few in the 2^20 case), the next steps see a moment one bf16 ulp apart:
          // the parameter moves by up to ~2^-8 of an update (lr·|m̂/√v̂| <= ~1e-2), measured
          // 1.2e-5 with GCC 12. An indexing bug moves it by a whole update (~3e-3).
          const bool bf16_moment = m_type == DType::bf16 || v_type == DType::bf16;
          DSX_REQUIRE_CLOSE(on_cpu(param_gpu), param_cpu, p == DType::f32 && bf16_moment ? 1e-4 : tol);
          DSX_REQUIRE_CLOSE(on_cpu(m_gpu), m_cpu, m_type == DType::bf16 ? 1.6e-2 : tol);
          DSX_REQUIRE_CLOSE(on_cpu(v_gpu), v_cpu, v_type == DType::bf16 ? 1.6e-2 : tol);
          // ... and a bf16 moment can only move where the fused/unfused difference crosses a
          // rounding boundary, i.e. almost never. (An f32/f64 moment differs by an ulp wherever
          // the CPU fused, which GCC does for C++ even with -std=c++20: no bit count there.)
          if (m_type == DType::bf16) REQUIRE(fraction_identical(m_gpu, m_cpu) >= 0.999);
          if (v_type == DType::bf16) REQUIRE(fraction_identical(v_gpu, v_cpu) >= 0.999);
        }
      }
    }
  }
}

TEST_CASE("adamw_step on the GPU rejects bad input like the CPU", "[gpu][adamw]") {
  ops::AdamWConfig c;
  Tensor p = Tensor::zeros({4}, DType::f32, Device::cuda), g = Tensor::zeros({4}, DType::f32, Device::cuda);
  Tensor m = Tensor::zeros({4}, DType::f32, Device::cuda), v = Tensor::zeros({4}, DType::bf16, Device::cuda);
  REQUIRE_NOTHROW(ops::adamw_step(c, 1, p, g, m, v));
  REQUIRE_THROWS_AS(ops::adamw_step(c, 0, p, g, m, v), std::invalid_argument);  // steps are 1-based
  ops::AdamWConfig bad = c;
  bad.beta1 = 1.0;
  REQUIRE_THROWS_AS(ops::adamw_step(bad, 1, p, g, m, v), std::invalid_argument);
  bad = c;
  bad.lr = -1;
  REQUIRE_THROWS_AS(ops::adamw_step(bad, 1, p, g, m, v), std::invalid_argument);
  Tensor g64 = Tensor::zeros({4}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::adamw_step(c, 1, p, g64, m, v), std::invalid_argument);
  Tensor m64 = Tensor::zeros({4}, DType::f64, Device::cuda);
  REQUIRE_THROWS_WITH(ops::adamw_step(c, 1, p, g, m64, v), Catch::Contains("m must be f32 (the param dtype) or bf16"));
  Tensor short_v = Tensor::zeros({3}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::adamw_step(c, 1, p, g, m, short_v), std::invalid_argument);
  Tensor host_g = Tensor::zeros({4}, DType::f32);
  REQUIRE_THROWS_WITH(ops::adamw_step(c, 1, p, host_g, m, v), Catch::Contains("grad is on cpu"));
}

TEST_CASE("sum_of_squares and global_norm on the GPU match the CPU, deterministically", "[gpu][adamw]") {
  for (DType t : {DType::f64, DType::f32, DType::bf16, DType::fp8_e4m3, DType::fp8_e5m2}) {
    for (int64_t n : {0, 1, 1000, 3 * 16384 + 5, 5'000'003}) {
      INFO(dtype_name(t) << ", n " << n);
      const Tensor x = random_tensor({n}, t, 7 + n, -3.0, 3.0);
      const Tensor g = on_gpu(x);
      const double gpu = ops::sum_of_squares(g);
      // Both sum the same squares in double, in different orders: relative rounding of about
      // sqrt(blocks) · 1e-16, far below 1e-12.
      REQUIRE(gpu == Approx(ops::sum_of_squares(x)).epsilon(1e-12).margin(1e-300));
      REQUIRE(ops::sum_of_squares(g) == gpu);  // a fixed partition and order: bit-identical reruns
    }
  }
  std::vector<Tensor> host = {random_tensor({1000, 3}, DType::f32, 1), random_tensor({77}, DType::bf16, 2),
                              random_tensor({1 << 18}, DType::f64, 3), random_tensor({5}, DType::fp8_e4m3, 4)};
  std::vector<Tensor> device;
  for (const Tensor& h : host) device.push_back(on_gpu(h));
  const double norm = ops::global_norm(device);
  REQUIRE(norm == Approx(ops::global_norm(host)).epsilon(1e-12));
  REQUIRE(ops::global_norm(device) == norm);
  REQUIRE(ops::global_norm(std::vector<Tensor>{}) == 0.0);

  REQUIRE_THROWS_AS(ops::sum_of_squares(Tensor::zeros({4}, DType::i32, Device::cuda)), std::invalid_argument);
  std::vector<Tensor> mixed = {device[0], host[1]};
  REQUIRE_THROWS_WITH(ops::global_norm(mixed), Catch::Contains("every tensor of this call must be on cuda"));
}

TEST_CASE("clip_grad_norm on the GPU matches the CPU", "[gpu][adamw]") {
  const std::vector<DType> types = {DType::f32, DType::bf16, DType::f64, DType::fp8_e4m3};
  for (double max_norm : {0.5, 1e9, 0.0}) {  // clipped, not clipped, disabled
    INFO("max_norm " << max_norm);
    std::vector<Tensor> cpu, gpu;
    for (size_t i = 0; i < types.size(); ++i) {
      cpu.push_back(random_tensor({static_cast<int64_t>(1000 * (i + 1) + 3)}, types[i], 50 + i));
      gpu.push_back(on_gpu(cpu.back()));
    }
    const double norm_cpu = ops::clip_grad_norm(cpu, max_norm);
    const double norm_gpu = ops::clip_grad_norm(gpu, max_norm);
    REQUIRE(norm_gpu == Approx(norm_cpu).epsilon(1e-12));
    for (size_t i = 0; i < types.size(); ++i) {
      INFO(dtype_name(types[i]));
      // The scale is max_norm / (norm + 1e-6) from norms equal to ~1e-16, so it rounds to the same
      // f32/f64 value (one multiplication per element, bit-identical) unless the two norms
      // straddle a rounding boundary: then an ulp of the dtype (f32 1.2e-7, f64 2.2e-16;
      // bf16 and fp8 round the product, 2^-8 and 2^-3).
      const double tol = types[i] == DType::f64    ? 1e-15
                         : types[i] == DType::f32  ? 2.4e-7
                         : types[i] == DType::bf16 ? 7.9e-3
                                                   : 0.125;
      DSX_REQUIRE_CLOSE(on_cpu(gpu[i]), cpu[i], tol);
      if (max_norm != 0.5) REQUIRE(same_values(on_cpu(gpu[i]), cpu[i]));  // untouched
    }
  }
  // A non-finite norm leaves the gradients alone and is returned.
  std::vector<double> values(100, 1.0);
  values[17] = std::numeric_limits<double>::infinity();
  std::vector<Tensor> grads = {on_gpu(Tensor::from<double>(values, {100}).to(DType::f32))};
  REQUIRE(std::isinf(ops::clip_grad_norm(grads, 1.0)));
  REQUIRE(same_values(on_cpu(grads[0]), Tensor::from<double>(values, {100}).to(DType::f32)));
}
