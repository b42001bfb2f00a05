// The device runtime: allocation, copies, conversions and fills against the host.
#include <catch2/catch.hpp>

#include <string>

#include "gpu_check.h"
#include "kernels/cuda/runtime.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;

TEST_CASE("device tensors round-trip through host memory unchanged", "[gpu][runtime]") {
  for (DType t : {DType::f64, DType::f32, DType::bf16, DType::fp8_e4m3, DType::fp8_e5m2}) {
    const Tensor x = random_tensor({37, 129}, t, 7, -300, 300);
    const Tensor g = on_gpu(x);
    REQUIRE(g.device() == Device::cuda);
    REQUIRE(same_values(on_cpu(g), x));
    REQUIRE(same_values(on_cpu(g.clone()), x));
    REQUIRE(same_values(on_cpu(g.slice(3, 9)), x.slice(3, 9)));
  }
}

TEST_CASE("device conversions round like the host codecs, bit for bit", "[gpu][runtime]") {
  // Values across the fp8 ranges, subnormals and saturation included.
  const Tensor x = random_tensor({4096}, DType::f32, 11, -1000, 1000);
  const Tensor tiny = random_tensor({4096}, DType::f32, 12, -1e-3, 1e-3);
  for (DType to : {DType::f64, DType::bf16, DType::fp8_e4m3, DType::fp8_e5m2, DType::i32, DType::i64}) {
    for (const Tensor* src : {&x, &tiny}) {
      INFO("to " << dtype_name(to));
      REQUIRE(same_values(on_cpu(on_gpu(*src).to(to)), src->to(to)));
    }
  }
  const Tensor b = x.to(DType::bf16);
  REQUIRE(same_values(on_cpu(on_gpu(b).to(DType::fp8_e4m3)), b.to(DType::fp8_e4m3)));
  // Mixed devices: copy_from converts on the source's device and moves the bytes.
  Tensor host = Tensor::empty({4096}, DType::bf16);
  host.copy_from(on_gpu(x));
  REQUIRE(same_values(host, b));
}

TEST_CASE("fill and zero on the device", "[gpu][runtime]") {
  for (DType t : {DType::f32, DType::bf16, DType::i64, DType::fp8_e4m3}) {
    Tensor g = Tensor::empty({1000}, t, Device::cuda);
    g.fill(3.3);
    REQUIRE(same_values(on_cpu(g), Tensor::full({1000}, 3.3, t)));
    g.zero();
    REQUIRE(same_values(on_cpu(g), Tensor::full({1000}, 0.0, t)));
  }
}

TEST_CASE("the caching pool reuses freed memory: no growth over repeated steps", "[gpu][runtime]") {
  auto step = [] {
    for (int i = 0; i < 8; ++i) Tensor::zeros({1 << 20}, DType::f32, Device::cuda);
  };
  step();
  cuda::synchronize_current_stream();
  const auto before = cuda::memory_stats();
  for (int s = 0; s < 5; ++s) step();
  cuda::synchronize_current_stream();
  const auto after = cuda::memory_stats();
  REQUIRE(after.reserved_bytes == before.reserved_bytes);
  REQUIRE(after.peak_used_bytes >= (1u << 22));
  REQUIRE(after.used_bytes == before.used_bytes);
}

TEST_CASE("CUDA errors name the call, file and line", "[gpu][runtime]") {
  std::string what;
  try {
    DSX_CUDA_CHECK(cudaSetDevice(1 << 20));
  } catch (const cuda::CudaError& e) {
    what = e.what();
  }
  // The failed call is also the thread's last error: clear it, or the next launch check
  // (cudaGetLastError) of a later test would report it.
  (void)cudaGetLastError();
  INFO(what);
  REQUIRE(what.find("cudaSetDevice(1 << 20)") != std::string::npos);
  REQUIRE(what.find("test_runtime.cpp:") != std::string::npos);
}
