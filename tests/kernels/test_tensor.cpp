#include <catch2/catch.hpp>

#include "kernels/device.h"
#include "kernels/tensor.h"

using namespace dsx;

TEST_CASE("tensor: shape, views and slices share storage", "[tensor]") {
  Tensor t = Tensor::from<float>({0, 1, 2, 3, 4, 5}, {3, 2});
  REQUIRE(t.numel() == 6);
  REQUIRE(t.dim(-1) == 2);
  Tensor rows = t.slice(1, 3);
  REQUIRE(rows.shape() == Shape{2, 2});
  REQUIRE(rows.data<float>()[0] == 2.0f);
  rows.data<float>()[0] = 42.0f;
  REQUIRE(t.data<float>()[2] == 42.0f);
  Tensor flat = t.view({6});
  REQUIRE(flat.data<float>()[2] == 42.0f);
  REQUIRE_THROWS_AS(t.view({4}), std::invalid_argument);
  REQUIRE_THROWS_AS(t.slice(2, 4), std::out_of_range);
  REQUIRE_THROWS_AS(t.data<double>(), std::invalid_argument);
}

TEST_CASE("tensor: dtype conversion rounds through the codecs", "[tensor]") {
  Tensor t = Tensor::from<float>({1.0f, 1.00390625f, 500.0f, -1e-3f}, {4});
  auto b = t.to(DType::bf16).to_vector();
  REQUIRE(b[0] == 1.0);
  REQUIRE(b[1] == 1.0);  // 1 + 2^-8 is the tie between 1 and 1 + 2^-7: rounds to even
  auto e = t.to(DType::fp8_e4m3).to_vector();
  REQUIRE(e[2] == 448.0);  // saturates
  Tensor c = t.clone();
  c.fill(3.0);
  REQUIRE(t.to_vector()[0] == 1.0);
  REQUIRE(c.to_vector()[3] == 3.0);
}

TEST_CASE("tensor: host tensor memory counts live bytes and their peak", "[tensor]") {
  reset_host_tensor_peak();
  const HostTensorMemory before = host_tensor_memory();
  CHECK(before.peak_bytes == before.used_bytes);
  {
    const Tensor a = Tensor::empty({1000}, DType::f32);  // 4000 B, stored in 64-byte multiples: 4032
    const Tensor view = a.view({10, 100});               // a view allocates nothing
    const HostTensorMemory live = host_tensor_memory();
    CHECK(live.used_bytes - before.used_bytes == 4032);
    CHECK(live.peak_bytes == live.used_bytes);
  }
  const HostTensorMemory after = host_tensor_memory();
  CHECK(after.used_bytes == before.used_bytes);  // freed
  CHECK(after.peak_bytes - before.used_bytes == 4032);
  CHECK(device_memory_stats(Device::cpu).peak_used_bytes == after.peak_bytes);
  CHECK(device_memory_stats(Device::cpu).reserved_bytes >= 4032);  // malloc holds at least that
  reset_device_peak_memory(Device::cpu);
  CHECK(host_tensor_memory().peak_bytes == after.used_bytes);
}
