// The CUDA router ops against the CPU ops: scores, expert ids (exactly), gate weights, their
// backward, expert counts, the bias update and the sequence-wise balance loss.
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "gpu_check.h"
#include "kernels/cuda/device_checks.h"
#include "kernels/ops/router.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;
using ops::RouterConfig;

namespace {

RouterConfig make_config(int64_t experts, int64_t groups, int64_t topk_group, int64_t top_k,
                         RouterConfig::Scoring scoring, bool norm, double scale) {
  RouterConfig c;
  c.n_experts = experts;
  c.n_group = groups;
  c.topk_group = topk_group;
  c.top_k = top_k;
  c.scoring = scoring;
  c.norm_topk_prob = norm;
  c.routed_scaling_factor = scale;
  return c;
}

constexpr auto kSigmoid = RouterConfig::Scoring::sigmoid;
constexpr auto kSoftmax = RouterConfig::Scoring::softmax;

struct NamedConfig {
  const char* name;
  RouterConfig config;
};

// DeepSeek-V3, V2-Lite, and shapes that stress the kernel's indexing: experts not a multiple of
// 32, one-expert groups, more experts than 8 per lane, a width that leaves one warp per block.
std::vector<NamedConfig> configs() {
  return {
      {"DeepSeek-V3 (256 experts, 8 groups, top-4 groups, top-8, sigmoid, x2.5)",
       make_config(256, 8, 4, 8, kSigmoid, true, 2.5)},
      {"V2-Lite style (64 experts, softmax, 1 group, top-6, unnormalised)",
       make_config(64, 1, 1, 6, kSoftmax, false, 1.0)},
      {"small V3-like (16 experts, 4 groups, top-2 groups, top-4)", make_config(16, 4, 2, 4, kSigmoid, true, 2.5)},
      {"40 experts, 5 groups, top-2 groups, top-3, softmax, normalised", make_config(40, 5, 2, 3, kSoftmax, true, 1.5)},
      {"one-expert groups (8 groups of 1, top-3 groups, top-2)", make_config(8, 8, 3, 2, kSigmoid, true, 1.0)},
      {"300 experts, 3 groups, top-2 groups, top-7, softmax", make_config(300, 3, 2, 7, kSoftmax, true, 1.0)},
      {"top-1 of 1 expert", make_config(1, 1, 1, 1, kSigmoid, true, 1.0)},
      {"4096 experts, 16 groups, top-4 groups, top-40 (one warp per block)",
       make_config(4096, 16, 4, 40, kSigmoid, true, 2.5)},
  };
}

struct Routed {
  Tensor scores, ids, weights;  // on the host
};

Routed route(const RouterConfig& c, const Tensor& logits, const Tensor& bias, Device device) {
  const int64_t tokens = logits.dim(0);
  const Tensor x = device == Device::cuda ? on_gpu(logits) : logits;
  const Tensor b = device == Device::cuda ? on_gpu(bias) : bias;
  Tensor scores = Tensor::empty(logits.shape(), logits.dtype(), device);
  Tensor ids = Tensor::empty({tokens, c.top_k}, DType::i32, device);
  Tensor weights = Tensor::empty({tokens, c.top_k}, logits.dtype(), device);
  ops::router_forward(c, x, b, scores, ids, weights);
  return {on_cpu(scores), on_cpu(ids), on_cpu(weights)};
}

bool same_bits(double a, double b) {
  return a == b || (std::isnan(a) && std::isnan(b));
}

// The ids must equal the CPU's exactly. The one tolerated difference: CUDA's exp and libm's may
// differ in the last bit, so a token whose GPU scores are not bit-identical to the CPU's may
// order two experts differently when their biased scores agree to within that rounding. Such
// tokens must be rare (expected: none) and each position's two choices must be a near-tie.
// Weights are compared on the tokens routed identically. Returns the number of such tokens.
int64_t require_same_routes(const RouterConfig& c, const Routed& gpu, const Routed& cpu, const Tensor& bias,
                            double weight_tol) {
  const int64_t tokens = cpu.ids.dim(0), E = c.n_experts, K = c.top_k;
  const auto gi = gpu.ids.to_vector(), ci = cpu.ids.to_vector();
  const auto gs = gpu.scores.to_vector(), cs = cpu.scores.to_vector();
  const auto gw = gpu.weights.to_vector(), cw = cpu.weights.to_vector();
  const std::vector<double> b = bias.defined() ? bias.to_vector() : std::vector<double>(E, 0.0);
  const double near = cpu.scores.dtype() == DType::f32 ? 1e-6 : 1e-14;
  int64_t explained = 0;
  double weight_err = 0, weight_scale = 1;
  for (int64_t t = 0; t < tokens; ++t) {
    bool same_ids = true;
    for (int64_t k = 0; k < K; ++k) same_ids &= gi[t * K + k] == ci[t * K + k];
    if (same_ids) {
      for (int64_t k = 0; k < K; ++k) {
        const double g = gw[t * K + k], r = cw[t * K + k];
        weight_scale = std::max(weight_scale, std::abs(r));
        if (!same_bits(g, r)) weight_err = std::max(weight_err, std::isnan(g - r) ? INFINITY : std::abs(g - r));
      }
      continue;
    }
    INFO("token " << t << " is routed differently");
    bool scores_identical = true;
    for (int64_t e = 0; e < E; ++e) scores_identical &= same_bits(gs[t * E + e], cs[t * E + e]);
    REQUIRE_FALSE(scores_identical);  // bit-identical scores must select identically
    for (int64_t k = 0; k < K; ++k) {
      // a garbage GPU id fails here instead of indexing the score vectors out of range
      REQUIRE((gi[t * K + k] >= 0 && gi[t * K + k] < static_cast<double>(E)));
      const auto key = [&](double id) { return cs[t * E + static_cast<int64_t>(id)] + b[static_cast<size_t>(id)]; };
      const double kg = key(gi[t * K + k]), kc = key(ci[t * K + k]);
      INFO("position " << k << ": gpu expert " << gi[t * K + k] << " key " << kg << ", cpu expert " << ci[t * K + k]
                       << " key " << kc);
      REQUIRE(std::abs(kg - kc) <= near * std::max(1.0, std::abs(kc)));
    }
    ++explained;
  }
  INFO("tokens routed differently through last-bit exp differences: " << explained << " of " << tokens);
  REQUIRE(explained * 1000 <= std::max<int64_t>(tokens, 1));
  INFO("weights: scaled max error " << weight_err / weight_scale << ", tolerance " << weight_tol);
  REQUIRE(weight_err / weight_scale <= weight_tol);
  return explained;
}

// Tolerances of the forward outputs. Scores: CUDA's and libm's exp agree to within an ulp (and
// the f32 path rounds a double exp once), and the rest of the arithmetic is the CPU's, operation
// for operation: a few ulps of the score scale. Weights: the same, through one division and one
// multiplication.
double score_tol(DType t) {
  return t == DType::f32 ? 1e-6 : 1e-14;
}

}  // namespace

TEST_CASE("router_forward on the GPU selects exactly the CPU's experts", "[gpu][router]") {
  for (const NamedConfig& nc : configs()) {
    const RouterConfig& c = nc.config;
    for (DType dtype : {DType::f32, DType::f64}) {
      for (int64_t tokens : {1, 37, 1000, 4099}) {
        if (c.n_experts >= 4096 && tokens > 64) continue;  // the wide config: a few tokens suffice
        for (bool with_bias : {false, true}) {
          INFO(nc.name << ", " << dtype_name(dtype) << ", " << tokens << " tokens, bias " << with_bias);
          const uint64_t seed = static_cast<uint64_t>(tokens * 31 + c.n_experts + (with_bias ? 7 : 0));
          const Tensor logits = random_tensor({tokens, c.n_experts}, dtype, seed, -4.0, 4.0);
          const Tensor bias = with_bias ? random_tensor({c.n_experts}, dtype, seed + 1, -0.05, 0.05) : Tensor();
          const Routed cpu = route(c, logits, bias, Device::cpu);
          const Routed gpu = route(c, logits, bias, Device::cuda);
          DSX_REQUIRE_CLOSE(gpu.scores, cpu.scores, score_tol(dtype));
          require_same_routes(c, gpu, cpu, bias, 4 * score_tol(dtype));
        }
      }
    }
  }
}

TEST_CASE("router_forward on the GPU breaks ties and ranks NaN like the CPU", "[gpu][router]") {
  // Logits from a few values make many exact ties (equal logits give equal scores on both
  // devices), and saturated sigmoids (|logit| > 20 in f32) tie at exactly 1 or 0: the lower
  // index must win every tie, in groups and in the top-k. NaN logits rank below everything.
  for (const NamedConfig& nc : configs()) {
    const RouterConfig& c = nc.config;
    if (c.n_experts >= 4096) continue;
    for (DType dtype : {DType::f32, DType::f64}) {
      INFO(nc.name << ", " << dtype_name(dtype));
      const int64_t tokens = 513;
      std::vector<double> levels = random_tensor({tokens, c.n_experts}, DType::f64, 5, 0.0, 4.0).to_vector();
      // {-1.25, -0.25, 0.75, 1.75}: no level is the negative of another, since sigmoid(a) +
      // sigmoid(-a) = 1 would make group sums of different levels tie only up to exp's last bit
      for (double& v : levels) v = std::floor(v) - 1.25;
      const Tensor ties = Tensor::from<double>(levels, {tokens, c.n_experts}).to(dtype);
      const Tensor saturated = random_tensor({tokens, c.n_experts}, dtype, 6, -60.0, 60.0);
      std::vector<double> with_nan = random_tensor({tokens, c.n_experts}, DType::f64, 7, -3.0, 3.0).to_vector();
      for (size_t i = 0; i < with_nan.size(); i += 7) with_nan[i] = std::numeric_limits<double>::quiet_NaN();
      const Tensor nan_logits = Tensor::from<double>(with_nan, {tokens, c.n_experts}).to(dtype);
      for (const Tensor* logits : {&ties, &saturated, &nan_logits}) {
        const Routed cpu = route(c, *logits, Tensor(), Device::cpu);
        const Routed gpu = route(c, *logits, Tensor(), Device::cuda);
        if (logits == &ties) REQUIRE(same_values(gpu.ids, cpu.ids));  // exact: no exp rounding can matter
        DSX_REQUIRE_CLOSE(gpu.scores, cpu.scores, score_tol(dtype));
        require_same_routes(c, gpu, cpu, Tensor(), 4 * score_tol(dtype));
      }
    }
  }
}

TEST_CASE("router_backward on the GPU matches the CPU", "[gpu][router]") {
  for (const NamedConfig& nc : configs()) {
    const RouterConfig& c = nc.config;
    for (DType dtype : {DType::f32, DType::f64}) {
      for (int64_t tokens : {1, 77, 2048}) {
        if (c.n_experts >= 4096 && tokens > 77) continue;
        INFO(nc.name << ", " << dtype_name(dtype) << ", " << tokens << " tokens");
        const Tensor logits = random_tensor({tokens, c.n_experts}, dtype, 100 + tokens, -3.0, 3.0);
        const Routed cpu = route(c, logits, Tensor(), Device::cpu);
        const Tensor dweights = random_tensor({tokens, c.top_k}, dtype, 200 + tokens);
        Tensor dl_cpu = Tensor::full({tokens, c.n_experts}, 5.0, dtype);
        ops::router_backward(c, cpu.scores, cpu.ids, dweights, dl_cpu);
        Tensor dl_gpu = on_gpu(Tensor::full({tokens, c.n_experts}, 5.0, dtype));  // overwritten, not accumulated
        ops::router_backward(c, on_gpu(cpu.scores), on_gpu(cpu.ids), on_gpu(dweights), dl_gpu);
        // The same inputs and the CPU's operations; the softmax's Σ ds·s is a warp tree instead
        // of a sequential sum (K non-zero terms): a few ulps of the gradient scale.
        DSX_REQUIRE_CLOSE(dl_gpu, dl_cpu, dtype == DType::f32 ? 2e-6 : 1e-14);
      }
    }
  }
}

TEST_CASE("expert_counts on the GPU equals the CPU's and reports bad ids", "[gpu][router]") {
  for (int64_t experts : {1, 7, 256, 10000}) {  // 10000: past the shared-memory histogram
    for (DType dtype : {DType::i32, DType::i64}) {
      for (int64_t n : {1, 100, 65537}) {
        INFO(experts << " experts, " << dtype_name(dtype) << ", " << n << " ids");
        std::vector<double> ids =
            random_tensor({n}, DType::f64, 300 + n, 0.0, static_cast<double>(experts)).to_vector();
        for (double& v : ids) v = std::floor(v);
        const Tensor host_ids = Tensor::from<double>(ids, {n}).to(dtype);
        Tensor cpu = Tensor::empty({experts}, DType::i64);
        ops::expert_counts(host_ids, experts, cpu);
        Tensor gpu = on_gpu(Tensor::full({experts}, 99.0, DType::i64));
        ops::expert_counts(on_gpu(host_ids), experts, gpu);
        REQUIRE(same_values(on_cpu(gpu), cpu));
      }
    }
  }
  Tensor counts = Tensor::empty({4}, DType::i64, Device::cuda);
  ops::expert_counts(on_gpu(Tensor::from<int32_t>({0, 4}, {1, 2})), 4, counts);  // no sync: reported later
  REQUIRE_THROWS_WITH(cuda::check_device_errors(), Catch::Contains("expert_counts: expert id 4 out of range [0, 4)"));
  ops::expert_counts(on_gpu(Tensor::from<int64_t>({-1, 2}, {2})), 4, counts);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(), Catch::Contains("expert_counts: expert id -1 out of range"));
  REQUIRE_NOTHROW(cuda::check_device_errors());                            // reported once, then cleared
  REQUIRE(on_cpu(counts).to_vector() == std::vector<double>{0, 0, 1, 0});  // the bad id is skipped
  REQUIRE_THROWS_AS(ops::expert_counts(on_gpu(Tensor::from<float>({0.0f}, {1})), 4, counts), std::invalid_argument);
  Tensor host_counts = Tensor::empty({4}, DType::i64);
  REQUIRE_THROWS_WITH(ops::expert_counts(on_gpu(Tensor::from<int32_t>({0}, {1})), 4, host_counts),
                      Catch::Contains("every tensor of this call must be on cuda"));
}

TEST_CASE("router_update_bias on the GPU equals the CPU's bit for bit", "[gpu][router]") {
  for (int64_t experts : {1, 8, 256, 3000}) {
    for (DType count_type : {DType::i64, DType::i32}) {
      for (DType bias_type : {DType::f32, DType::f64}) {
        INFO(experts << " experts, counts " << dtype_name(count_type) << ", bias " << dtype_name(bias_type));
        std::vector<double> c = random_tensor({experts}, DType::f64, 400 + experts, 0.0, 50.0).to_vector();
        for (size_t i = 0; i < c.size(); ++i) c[i] = i % 5 == 0 ? 25.0 : std::floor(c[i]);  // some at the mean-ish
        const Tensor counts = Tensor::from<double>(c, {experts}).to(count_type);
        Tensor cpu = random_tensor({experts}, bias_type, 500 + experts, -0.1, 0.1);
        Tensor gpu = on_gpu(cpu);
        ops::router_update_bias(counts, 0.001, cpu);
        ops::router_update_bias(on_gpu(counts), 0.001, gpu);
        // integer counts sum exactly in double in any order, and the step is one rounded add
        REQUIRE(same_values(on_cpu(gpu), cpu));
      }
    }
  }
  // equal loads: nothing moves
  Tensor bias = on_gpu(Tensor::from<float>({0.5f, -0.5f, 0.25f}, {3}));
  ops::router_update_bias(on_gpu(Tensor::from<int64_t>({4, 4, 4}, {3})), 0.01, bias);
  REQUIRE(on_cpu(bias).to_vector() == std::vector<double>{0.5, -0.5, 0.25});
  REQUIRE_THROWS_AS(ops::router_update_bias(on_gpu(Tensor::from<int64_t>({1, 2}, {2})), 0.001, bias),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::router_update_bias(on_gpu(Tensor::from<int64_t>({1, 2, 3}, {3})), -1.0, bias),
                    std::invalid_argument);
}

TEST_CASE("balance loss forward and backward on the GPU match the CPU", "[gpu][router]") {
  for (const NamedConfig& nc : configs()) {
    const RouterConfig& c = nc.config;
    for (DType dtype : {DType::f32, DType::f64}) {
      for (const auto& [tokens, n_seq] :
           std::vector<std::pair<int64_t, int64_t>>{{1, 1}, {96, 3}, {2048, 4}, {4099, 1}}) {
        if (c.n_experts >= 4096 && tokens > 96) continue;
        INFO(nc.name << ", " << dtype_name(dtype) << ", " << tokens << " tokens in " << n_seq << " sequences");
        const Tensor logits = random_tensor({tokens, c.n_experts}, dtype, 600 + tokens, -3.0, 3.0);
        const Routed cpu = route(c, logits, Tensor(), Device::cpu);
        const double alpha = 0.003, dloss = 1.7;
        const double loss_cpu = ops::balance_loss_forward(c, cpu.scores, cpu.ids, n_seq, alpha);
        const double loss_gpu = ops::balance_loss_forward(c, on_gpu(cpu.scores), on_gpu(cpu.ids), n_seq, alpha);
        // Both sum in double, in different orders (and f as count·unit instead of repeated adds).
        REQUIRE(loss_gpu == Approx(loss_cpu).epsilon(1e-12));
        const Tensor start = random_tensor({tokens, c.n_experts}, dtype, 700 + tokens);
        Tensor dl_cpu = start.clone();
        ops::balance_loss_backward(c, cpu.scores, cpu.ids, n_seq, alpha, dloss, dl_cpu);
        Tensor dl_gpu = on_gpu(start);
        ops::balance_loss_backward(c, on_gpu(cpu.scores), on_gpu(cpu.ids), n_seq, alpha, dloss, dl_gpu);
        // accumulated onto `start` (|start| <= 1): double-precision per-token sums, the step
        // rounded to the dtype once, then the CPU's operations; a few ulps of the scale
        DSX_REQUIRE_CLOSE(dl_gpu, dl_cpu, dtype == DType::f32 ? 1e-6 : 1e-14);
      }
    }
  }
}

TEST_CASE("router ops on the GPU reject bad input like the CPU", "[gpu][router]") {
  const RouterConfig c = make_config(16, 4, 2, 4, kSigmoid, true, 2.5);
  const Tensor logits = on_gpu(Tensor::zeros({2, 16}, DType::f32));
  Tensor s = Tensor::empty({2, 16}, DType::f32, Device::cuda), w = Tensor::empty({2, 4}, DType::f32, Device::cuda);
  Tensor ids = Tensor::empty({2, 4}, DType::i32, Device::cuda);
  RouterConfig bad = c;
  bad.top_k = 9;  // the two kept groups hold 8 experts
  REQUIRE_THROWS_AS(ops::router_forward(bad, logits, Tensor(), s, ids, w), std::invalid_argument);
  bad = c;
  bad.n_group = 3;
  REQUIRE_THROWS_AS(ops::router_forward(bad, logits, Tensor(), s, ids, w), std::invalid_argument);
  Tensor ids64 = Tensor::empty({2, 4}, DType::i64, Device::cuda);
  REQUIRE_THROWS_AS(ops::router_forward(c, logits, Tensor(), s, ids64, w), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::router_forward(c, logits, on_gpu(Tensor::zeros({16}, DType::f64)), s, ids, w),
                    std::invalid_argument);
  REQUIRE_THROWS_WITH(ops::router_forward(c, logits, Tensor::zeros({16}, DType::f32), s, ids, w),
                      Catch::Contains("bias is on cpu"));
  // More experts than one block's shared memory holds (~340 KB for 20000 f64 experts): a clear
  // error, not a failed launch.
  const RouterConfig huge = make_config(20000, 1, 1, 2, kSigmoid, true, 1.0);
  Tensor hs = Tensor::empty({1, 20000}, DType::f64, Device::cuda), hw = Tensor::empty({1, 2}, DType::f64, Device::cuda);
  Tensor hids = Tensor::empty({1, 2}, DType::i32, Device::cuda);
  REQUIRE_THROWS_WITH(ops::router_forward(huge, on_gpu(Tensor::zeros({1, 20000}, DType::f64)), Tensor(), hs, hids, hw),
                      Catch::Contains("shared memory"));

  // Out-of-range ids: the backward ops record them on the device; balance_loss_forward throws.
  const Tensor bad_ids = on_gpu(Tensor::from<int32_t>({0, 1, 2, 16, 0, 1, 2, 3}, {2, 4}));
  Tensor dl = Tensor::zeros({2, 16}, DType::f32, Device::cuda);
  ops::router_backward(c, s, bad_ids, w, dl);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(),
                      Catch::Contains("router_backward: expert id 16 out of range [0, 16)"));
  ops::balance_loss_backward(c, s, bad_ids, 1, 0.01, 1.0, dl);
  REQUIRE_THROWS_WITH(cuda::check_device_errors(), Catch::Contains("balance_loss_backward: expert id 16"));
  REQUIRE_THROWS_WITH(ops::balance_loss_forward(c, s, bad_ids, 1, 0.01),
                      Catch::Contains("balance_loss_forward: expert id 16 out of range [0, 16)"));
  REQUIRE_THROWS_AS(ops::balance_loss_forward(c, s, ids, 3, 0.01), std::invalid_argument);  // 3 does not divide 2
  REQUIRE_NOTHROW(cuda::check_device_errors());
}
