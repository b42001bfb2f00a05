// The CUDA MoE permutation ops against the CPU ops: plans (exactly), permute and its backward,
// unpermute and its backward, and the device-side detection of malformed plans.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "gpu_check.h"
#include "kernels/cuda/device_checks.h"
#include "kernels/ops/moe_permute.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;

namespace {

// Ids uniform in [0, experts): tokens may pick an expert twice, and with many tokens per expert
// the stability of the order within each expert's segment is exercised.
Tensor random_ids(int64_t tokens, int64_t top_k, int64_t experts, DType dtype, uint64_t seed) {
  std::vector<double> v =
      random_tensor({tokens, top_k}, DType::f64, seed, 0.0, static_cast<double>(experts)).to_vector();
  for (double& x : v) x = std::min(std::floor(x), static_cast<double>(experts - 1));
  return Tensor::from<double>(v, {tokens, top_k}).to(dtype);
}

struct PlanCase {
  int64_t tokens, top_k, experts;
};

const std::vector<PlanCase> kPlanCases = {
    {1, 1, 1}, {1, 8, 256}, {37, 6, 64}, {1000, 8, 256}, {4099, 6, 7}, {300, 2, 10000}, {5000, 8, 1},
};

void require_same_plan(const ops::MoePlan& gpu, const ops::MoePlan& cpu) {
  REQUIRE(gpu.n_tokens == cpu.n_tokens);
  REQUIRE(gpu.top_k == cpu.top_k);
  REQUIRE(gpu.assignment.device() == Device::cuda);
  REQUIRE(same_values(on_cpu(gpu.assignment), cpu.assignment));
  REQUIRE(gpu.expert_offsets == cpu.expert_offsets);
}

}  // namespace

TEST_CASE("moe_plan on the GPU equals the CPU's plan exactly", "[gpu][moe]") {
  for (const PlanCase& pc : kPlanCases) {
    for (DType dtype : {DType::i32, DType::i64}) {
      INFO(pc.tokens << " tokens, top-" << pc.top_k << " of " << pc.experts << ", " << dtype_name(dtype));
      const Tensor ids = random_ids(pc.tokens, pc.top_k, pc.experts, dtype, 17 + pc.tokens);
      require_same_plan(ops::moe_plan(on_gpu(ids), pc.experts), ops::moe_plan(ids, pc.experts));
    }
  }
  // no tokens
  const Tensor none = Tensor::empty({0, 4}, DType::i32);
  require_same_plan(ops::moe_plan(on_gpu(none), 8), ops::moe_plan(none, 8));
  // every token picks the same expert twice: the segment lists t·K + k in increasing order
  const Tensor same = Tensor::full({50, 2}, 3.0, DType::i32);
  require_same_plan(ops::moe_plan(on_gpu(same), 4), ops::moe_plan(same, 4));
  // out-of-range ids throw at once, with the CPU's message (moe_plan synchronises anyway)
  REQUIRE_THROWS_WITH(ops::moe_plan(on_gpu(Tensor::from<int32_t>({0, 2}, {1, 2})), 2),
                      Catch::Contains("moe_plan: expert id 2 out of range [0, 2)"));
  REQUIRE_THROWS_WITH(ops::moe_plan(on_gpu(Tensor::from<int64_t>({0, 1, -1, 5}, {2, 2})), 2),
                      Catch::Contains("moe_plan: expert id -1 out of range [0, 2)"));  // the first bad one
  REQUIRE_THROWS_AS(ops::moe_plan(on_gpu(Tensor::from<float>({0.0f}, {1, 1})), 2), std::invalid_argument);
}

TEST_CASE("moe_permute on the GPU copies the CPU's rows for every dtype", "[gpu][moe]") {
  for (const PlanCase& pc : {PlanCase{1, 1, 1}, PlanCase{37, 6, 64}, PlanCase{1000, 8, 256}}) {
    const Tensor ids = random_ids(pc.tokens, pc.top_k, pc.experts, DType::i32, 23 + pc.tokens);
    const ops::MoePlan cpu_plan = ops::moe_plan(ids, pc.experts);
    const ops::MoePlan gpu_plan = ops::moe_plan(on_gpu(ids), pc.experts);
    for (DType dtype : {DType::f32, DType::f64, DType::bf16, DType::fp8_e4m3, DType::i64}) {
      for (int64_t d : {1, 3, 129, 2050}) {
        for (bool offset : {false, true}) {  // offset: x starts one row in, so its base is less aligned
          INFO(pc.tokens << " tokens, top-" << pc.top_k << ", " << dtype_name(dtype) << ", D " << d << ", offset "
                         << offset);
          const Tensor all = random_tensor({pc.tokens + 1, d}, dtype, 31 + d, -100.0, 100.0);
          const Tensor x = offset ? all.slice(1, pc.tokens + 1) : all.slice(0, pc.tokens);
          Tensor cpu = Tensor::empty({pc.tokens * pc.top_k, d}, dtype);
          ops::moe_permute(x, cpu_plan, cpu);
          Tensor gpu_all = Tensor::empty({pc.tokens * pc.top_k + 1, d}, dtype, Device::cuda);
          Tensor gpu = offset ? gpu_all.slice(1, pc.tokens * pc.top_k + 1) : gpu_all.slice(0, pc.tokens * pc.top_k);
          ops::moe_permute(on_gpu(all).slice(offset ? 1 : 0, pc.tokens + (offset ? 1 : 0)), gpu_plan, gpu);
          REQUIRE(same_values(on_cpu(gpu), cpu));  // a row copy: bit for bit
        }
      }
    }
  }
  REQUIRE_NOTHROW(cuda::check_device_errors());  // valid plans never record an error
}

TEST_CASE("moe_permute_backward, moe_unpermute and its backward on the GPU match the CPU", "[gpu][moe]") {
  for (const PlanCase& pc : {PlanCase{1, 1, 1}, PlanCase{37, 6, 64}, PlanCase{1000, 8, 256}, PlanCase{300, 2, 10000}}) {
    const Tensor ids = random_ids(pc.tokens, pc.top_k, pc.experts, DType::i64, 41 + pc.tokens);
    const ops::MoePlan cpu_plan = ops::moe_plan(ids, pc.experts);
    const ops::MoePlan gpu_plan = ops::moe_plan(on_gpu(ids), pc.experts);
    const int64_t rows = pc.tokens * pc.top_k;
    for (DType dtype : {DType::f32, DType::f64}) {
      for (int64_t d : {1, 33, 1000}) {
        INFO(pc.tokens << " tokens, top-" << pc.top_k << ", " << dtype_name(dtype) << ", D " << d);
        const uint64_t seed = static_cast<uint64_t>(rows + d);
        const Tensor dxp = random_tensor({rows, d}, dtype, seed);
        const Tensor yp = random_tensor({rows, d}, dtype, seed + 1);
        const Tensor w = random_tensor({pc.tokens, pc.top_k}, dtype, seed + 2, 0.0, 2.5);
        const Tensor dy = random_tensor({pc.tokens, d}, dtype, seed + 3);

        Tensor dx_cpu = Tensor::empty({pc.tokens, d}, dtype);
        ops::moe_permute_backward(dxp, cpu_plan, dx_cpu);
        Tensor dx_gpu = on_gpu(Tensor::full({pc.tokens, d}, 9.0, dtype));  // overwritten
        ops::moe_permute_backward(on_gpu(dxp), gpu_plan, dx_gpu);
        // the same additions from 0 in the same k order, and no products: bit for bit
        REQUIRE(same_values(on_cpu(dx_gpu), dx_cpu));

        Tensor y_cpu = Tensor::empty({pc.tokens, d}, dtype);
        ops::moe_unpermute(yp, w, cpu_plan, y_cpu);
        Tensor y_gpu = on_gpu(Tensor::full({pc.tokens, d}, 9.0, dtype));
        ops::moe_unpermute(on_gpu(yp), on_gpu(w), gpu_plan, y_gpu);
        // K products summed in the same order; either side may fuse w·x + acc into an FMA:
        // at most about K ulps of the output scale (|y| <= 2.5 · K)
        DSX_REQUIRE_CLOSE(on_cpu(y_gpu), y_cpu, dtype == DType::f32 ? 2e-6 : 1e-14);

        Tensor dyp_cpu = Tensor::empty({rows, d}, dtype), dw_cpu = Tensor::empty({pc.tokens, pc.top_k}, dtype);
        ops::moe_unpermute_backward(dy, yp, w, cpu_plan, dyp_cpu, dw_cpu);
        Tensor dyp_gpu = on_gpu(Tensor::full({rows, d}, 9.0, dtype));
        Tensor dw_gpu = on_gpu(Tensor::full({pc.tokens, pc.top_k}, 9.0, dtype));
        ops::moe_unpermute_backward(on_gpu(dy), on_gpu(yp), on_gpu(w), gpu_plan, dyp_gpu, dw_gpu);
        REQUIRE(same_values(on_cpu(dyp_gpu), dyp_cpu));  // one product per element: bit for bit
        // a length-D dot product in double, summed in another order: ~D · 1e-16 relative before
        // the final rounding to the dtype
        DSX_REQUIRE_CLOSE(on_cpu(dw_gpu), dw_cpu, dtype == DType::f32 ? 1e-6 : 1e-12);
      }
    }
  }
  REQUIRE_NOTHROW(cuda::check_device_errors());
}

TEST_CASE("the GPU MoE ops reject bad shapes and report malformed plans", "[gpu][moe]") {
  const int64_t tokens = 4, top_k = 2, d = 3;
  ops::MoePlan plan = ops::moe_plan(on_gpu(random_ids(tokens, top_k, 4, DType::i32, 15)), 4);
  const Tensor x = Tensor::zeros({tokens, d}, DType::f32, Device::cuda);
  Tensor xp = Tensor::zeros({tokens * top_k, d}, DType::f32, Device::cuda);
  Tensor y = Tensor::empty({tokens, d}, DType::f32, Device::cuda);
  const Tensor w = Tensor::zeros({tokens, top_k}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::moe_permute(x.slice(0, 3), plan, xp), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::moe_permute(x, plan, y), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::moe_unpermute(xp, w.to(DType::f64), plan, y), std::invalid_argument);
  Tensor dxp_wrong = Tensor::empty({tokens * top_k, d}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::moe_permute(x, plan, dxp_wrong), std::invalid_argument);
  Tensor host_xp = Tensor::empty({tokens * top_k, d}, DType::f32);
  REQUIRE_THROWS_WITH(ops::moe_permute(x, plan, host_xp), Catch::Contains("xp is on cpu"));
  ops::MoePlan host_plan = plan;
  host_plan.assignment = on_cpu(plan.assignment);
  REQUIRE_THROWS_WITH(ops::moe_permute(x, host_plan, xp), Catch::Contains("plan.assignment is on cpu"));

  // Malformed contents are found on the device without a synchronisation, reported by
  // check_device_errors(), and never make a kernel read or write out of range.
  std::vector<double> a = on_cpu(plan.assignment).to_vector();
  const auto with_assignment = [&](std::vector<double> values) {
    ops::MoePlan p = plan;
    p.assignment = on_gpu(Tensor::from<double>(values, {tokens * top_k}).to(DType::i64));
    return p;
  };
  std::vector<double> duplicate = a;
  duplicate[1] = duplicate[0];
  ops::moe_permute(x, with_assignment(duplicate), xp);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(),
                      Catch::Contains("moe_permute: plan.assignment is not a permutation of [0, T·K)"));
  ops::moe_unpermute(xp, w, with_assignment(duplicate), y);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(), Catch::Contains("moe_unpermute: plan.assignment"));
  std::vector<double> out_of_range = a;
  out_of_range[1] = static_cast<double>(tokens * top_k);
  ops::moe_permute_backward(xp, with_assignment(out_of_range), y);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(),
                      Catch::Contains("moe_permute_backward: plan.assignment is not a permutation of [0, T·K): row 1 "
                                      "holds 8"));
  out_of_range[2] = -5;
  Tensor dyp = Tensor::empty({tokens * top_k, d}, DType::f32, Device::cuda);
  Tensor dw = Tensor::empty({tokens, top_k}, DType::f32, Device::cuda);
  ops::moe_unpermute_backward(y, xp, w, with_assignment(out_of_range), dyp, dw);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(), Catch::Contains("moe_unpermute_backward: plan.assignment"));
  ops::moe_permute(x, with_assignment(out_of_range), xp);
  // the record is also checked by the next synchronising op
  REQUIRE_THROWS_WITH(ops::moe_plan(on_gpu(random_ids(tokens, top_k, 4, DType::i32, 16)), 4),
                      Catch::Contains("moe_permute: plan.assignment"));
  REQUIRE_NOTHROW(cuda::check_device_errors());
}
