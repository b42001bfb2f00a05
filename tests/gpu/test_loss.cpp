// Cross-entropy on the GPU (kernels/cuda/cross_entropy.cu): forward, backward, token_logprobs and
// the row-weighted backward against the CPU ops on the same inputs, DeepSeek-V3's 129280-entry
// vocabulary included, with ignored rows, masked (-inf) logits and rows that stress the online
// max/sum (ascending rows: every logit is a new running max; rows shifted by +5000).
//
// Tolerances (relative to max(1, |cpu|)):
//  - forward with f32 logits 1e-6: the exponentials are f32 on both sides (CUDA's expf is within
//    2 ulp, glibc's within 1), summed in double; the online rescaling adds double roundings
//    only. Per row lse differs by a few 1e-7 at most, and lse is >= 1 in these rows.
//    f64 logits 1e-12 (exp in double, sums in a different order). An f32 lse adds its rounding
//    (6e-8 relative), still inside 1e-6.
//  - backward, weighted backward: both sides get the CPU's lse, so only exp differs: f32 1e-6
//    (a few ulp of each probability), f64 1e-13.
//  - token_logprobs: logp is the same double subtraction on both sides, rounded once to its
//    dtype: bit for bit. The entropy sums V double terms p_j·x_j in another order; in the
//    +5000 row the terms sum to ~5000, and the CPU's sequential sum of 129280 of them carries
//    a random-walk error of ~sqrt(V)·1.1e-16·5000 ≈ 2e-10 absolute: 1e-9 in f64, 1e-6 as f32.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gpu_check.h"
#include "kernels/ops/cross_entropy.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;

namespace {

constexpr int64_t kIgnore = -100;

struct Case {
  int64_t rows, vocab;
  bool special_rows;  // rows 0..4 replaced by the stress rows below (needs rows >= 5)
};

// One row, one logit; many short rows; a vocabulary not a multiple of 32; DeepSeek-V3's.
const std::vector<Case> kCases{{1, 1, false},   {300, 33, false},   {7, 1000, true},
                               {5, 4099, true}, {3, 129280, false}, {6, 129280, true}};

struct Inputs {
  Tensor logits;   // f64, converted per test
  Tensor targets;  // i64, converted per test
};

// Random logits in [-8, 8] and targets with every fourth row ignored. With special_rows:
// row 0 ascending (each thread's running max changes at every step), row 1 shifted by +5000,
// row 2 with every third logit -inf (masked), row 3 all -inf and ignored (lse NaN on both sides),
// row 4 with a single +20 spike at its target.
Inputs make_inputs(const Case& c, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::uniform_real_distribution<double> logit(-8.0, 8.0);
  std::uniform_int_distribution<int64_t> target(0, c.vocab - 1);
  const auto v = static_cast<size_t>(c.vocab);
  std::vector<double> x(static_cast<size_t>(c.rows) * v);
  for (double& e : x) e = logit(gen);
  std::vector<int64_t> t(static_cast<size_t>(c.rows));
  for (size_t n = 0; n < t.size(); ++n) t[n] = n % 4 == 1 ? kIgnore : target(gen);
  if (c.special_rows) {
    for (size_t j = 0; j < v; ++j) {
      x[0 * v + j] = -5.0 + 10.0 * static_cast<double>(j) / static_cast<double>(v);
      x[1 * v + j] += 5000.0;
      if (j % 3 == 0) x[2 * v + j] = -INFINITY;
      x[3 * v + j] = -INFINITY;
    }
    t[0] = c.vocab / 2;
    t[1] = c.vocab - 1;
    t[2] = c.vocab > 1 ? 1 : kIgnore;  // column 1 is finite
    t[3] = kIgnore;
    t[4] = 0;
    x[4 * v] = 20.0;
  }
  return {Tensor::from<double>(std::span<const double>(x), {c.rows, c.vocab}),
          Tensor::from<int64_t>(std::span<const int64_t>(t), {c.rows})};
}

double forward_tol(DType logits, DType lse) {
  return logits == DType::f32 || lse == DType::f32 ? 1e-6 : 1e-12;
}

double backward_tol(DType logits) {
  return logits == DType::f32 ? 1e-6 : 1e-13;
}

ops::CrossEntropyResult forward(const Tensor& logits, const Tensor& targets, Tensor& lse) {
  return ops::cross_entropy_forward(logits, targets, kIgnore, lse);
}

// The CPU's lse (f64), to feed both sides of the backward comparisons.
Tensor cpu_lse(const Tensor& logits, const Tensor& targets, DType dtype) {
  Tensor lse = Tensor::empty({logits.dim(0)}, dtype);
  forward(logits, targets, lse);
  return lse;
}

}  // namespace

TEST_CASE("gpu cross_entropy forward matches the CPU (loss, count, lse)", "[gpu][loss]") {
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, 1);
    for (DType t : {DType::f32, DType::f64}) {
      for (DType lt : {DType::f32, DType::f64}) {
        for (DType it : {DType::i32, DType::i64}) {
          CAPTURE(c.rows, c.vocab, dtype_name(t), dtype_name(lt), dtype_name(it));
          const Tensor logits = in.logits.to(t), targets = in.targets.to(it);
          Tensor lse = Tensor::empty({c.rows}, lt);
          Tensor lse_g = on_gpu(Tensor::full({c.rows}, 12345.0, lt));
          const auto cpu = forward(logits, targets, lse);
          const auto gpu = forward(on_gpu(logits), on_gpu(targets), lse_g);
          REQUIRE(gpu.count == cpu.count);
          INFO("loss_sum gpu " << gpu.loss_sum << " cpu " << cpu.loss_sum);
          REQUIRE(std::abs(gpu.loss_sum - cpu.loss_sum) <= forward_tol(t, lt) * std::max(1.0, std::abs(cpu.loss_sum)));
          DSX_REQUIRE_CLOSE(lse_g, lse, forward_tol(t, lt));  // NaN where both are NaN (the all -inf row)
        }
      }
    }
  }
}

TEST_CASE("gpu cross_entropy forward is deterministic and handles all-ignored rows", "[gpu][loss]") {
  const Inputs in = make_inputs({64, 129280, false}, 2);
  const Tensor logits = on_gpu(in.logits.to(DType::f32)), targets = on_gpu(in.targets);
  Tensor lse1 = Tensor::empty({64}, DType::f64, Device::cuda), lse2 = Tensor::empty({64}, DType::f64, Device::cuda);
  const auto first = forward(logits, targets, lse1);
  const auto second = forward(logits, targets, lse2);
  REQUIRE(first.loss_sum == second.loss_sum);  // bit for bit: fixed reduction trees, host sum in row order
  REQUIRE(same_values(on_cpu(lse1), on_cpu(lse2)));

  const Tensor none = on_gpu(Tensor::full({64}, static_cast<double>(kIgnore), DType::i64));
  const auto r = forward(logits, none, lse1);
  REQUIRE(r.count == 0);
  REQUIRE(r.loss_sum == 0.0);
  Tensor d = on_gpu(Tensor::full({64, 129280}, 5.0, DType::f32));
  ops::cross_entropy_backward(logits, none, lse1, kIgnore, 1.0, d);
  for (double g : d.to_vector()) REQUIRE(g == 0.0);
}

TEST_CASE("gpu cross_entropy backward matches the CPU (uniform scale)", "[gpu][loss]") {
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, 3);
    for (DType t : {DType::f32, DType::f64}) {
      for (DType lt : {DType::f32, DType::f64}) {
        for (DType it : {DType::i32, DType::i64}) {
          CAPTURE(c.rows, c.vocab, dtype_name(t), dtype_name(lt), dtype_name(it));
          const Tensor logits = in.logits.to(t), targets = in.targets.to(it);
          const Tensor lse = cpu_lse(logits, targets, lt);
          const double scale = -0.37;
          Tensor d = Tensor::full(logits.shape(), 12345.0, t);  // every entry must be overwritten
          Tensor d_g = on_gpu(d);
          ops::cross_entropy_backward(logits, targets, lse, kIgnore, scale, d);
          ops::cross_entropy_backward(on_gpu(logits), on_gpu(targets), on_gpu(lse), kIgnore, scale, d_g);
          DSX_REQUIRE_CLOSE(d_g, d, backward_tol(t));
        }
      }
    }
  }
}

TEST_CASE("gpu cross_entropy: forward then backward on the device (f32 logits, f64 lse)", "[gpu][loss]") {
  const Inputs in = make_inputs({6, 129280, true}, 4);
  const Tensor logits = in.logits.to(DType::f32);
  Tensor lse = Tensor::empty({6}, DType::f64);
  Tensor lse_g = Tensor::empty({6}, DType::f64, Device::cuda);
  const auto cpu = forward(logits, in.targets, lse);
  const auto gpu = forward(on_gpu(logits), on_gpu(in.targets), lse_g);
  const double scale = 1.0 / static_cast<double>(cpu.count);
  Tensor d = Tensor::empty(logits.shape(), DType::f32);
  Tensor d_g = Tensor::empty(logits.shape(), DType::f32, Device::cuda);
  ops::cross_entropy_backward(logits, in.targets, lse, kIgnore, scale, d);
  ops::cross_entropy_backward(on_gpu(logits), on_gpu(in.targets), lse_g, kIgnore, scale, d_g);
  // The two lse differ by a few 1e-7 absolute, which scales every probability by as much.
  DSX_REQUIRE_CLOSE(d_g, d, 2e-6);
  REQUIRE(gpu.count == cpu.count);
}

TEST_CASE("gpu token_logprobs matches the CPU (logp, entropy, no entropy)", "[gpu][loss]") {
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, 5);
    for (DType t : {DType::f32, DType::f64}) {
      for (DType lt : {DType::f32, DType::f64}) {
        for (DType out_t : {DType::f32, DType::f64}) {
          CAPTURE(c.rows, c.vocab, dtype_name(t), dtype_name(lt), dtype_name(out_t));
          const Tensor logits = in.logits.to(t);
          const Tensor targets = in.targets.to(DType::i32);
          const Tensor lse = cpu_lse(logits, targets, lt);
          // logp in out_t, entropy in the other float dtype: every combination is legal.
          const DType ent_t = out_t == DType::f32 ? DType::f64 : DType::f32;
          Tensor logp = Tensor::full({c.rows}, 9.0, out_t), entropy = Tensor::full({c.rows}, 9.0, ent_t);
          Tensor logp_g = on_gpu(logp), entropy_g = on_gpu(entropy);
          ops::token_logprobs(logits, targets, lse, kIgnore, logp, entropy);
          ops::token_logprobs(on_gpu(logits), on_gpu(targets), on_gpu(lse), kIgnore, logp_g, entropy_g);
          REQUIRE(same_values(on_cpu(logp_g), logp));  // the same double subtraction, rounded once
          DSX_REQUIRE_CLOSE(entropy_g, entropy, ent_t == DType::f32 ? 1e-6 : 1e-9);

          Tensor no_entropy;
          Tensor logp_only_g = on_gpu(Tensor::full({c.rows}, 9.0, out_t));
          ops::token_logprobs(on_gpu(logits), on_gpu(targets), on_gpu(lse), kIgnore, logp_only_g, no_entropy);
          REQUIRE(same_values(on_cpu(logp_only_g), logp));
        }
      }
    }
  }
}

TEST_CASE("gpu cross_entropy_backward_weighted matches the CPU", "[gpu][loss]") {
  for (const Case& c : kCases) {
    const Inputs in = make_inputs(c, 6);
    for (DType t : {DType::f32, DType::f64}) {
      for (DType st : {DType::f32, DType::f64}) {
        CAPTURE(c.rows, c.vocab, dtype_name(t), dtype_name(st));
        const Tensor logits = in.logits.to(t);
        const Tensor targets = in.targets;
        const Tensor lse = cpu_lse(logits, targets, DType::f64);
        const Tensor row_scale = random_tensor({c.rows}, st, 7, -2, 2);
        Tensor d = Tensor::full(logits.shape(), 12345.0, t);
        Tensor d_g = on_gpu(d);
        ops::cross_entropy_backward_weighted(logits, targets, lse, kIgnore, row_scale, d);
        ops::cross_entropy_backward_weighted(on_gpu(logits), on_gpu(targets), on_gpu(lse), kIgnore, on_gpu(row_scale),
                                             d_g);
        DSX_REQUIRE_CLOSE(d_g, d, backward_tol(t));
      }
    }
  }
}

TEST_CASE("gpu cross_entropy ops reject bad targets and shapes like the CPU", "[gpu][loss]") {
  const Tensor logits = on_gpu(random_tensor({2, 5}, DType::f32, 1));
  Tensor lse = on_gpu(Tensor::full({2}, 3.0, DType::f32));
  const auto targets = [](std::vector<int64_t> v) {
    return on_gpu(Tensor::from<int64_t>(std::span<const int64_t>(v), {static_cast<int64_t>(v.size())}));
  };
  REQUIRE_THROWS_WITH(forward(logits, targets({0, 5}), lse),
                      Catch::Contains("targets[1] = 5 is neither ignore_index (-100) nor in [0, 5)"));
  REQUIRE_THROWS_WITH(forward(logits, targets({-1, 7}), lse), Catch::Contains("targets[0] = -1"));
  for (double v : lse.to_vector()) REQUIRE(v == 3.0);  // checked before anything is written
  REQUIRE_THROWS_AS(forward(logits, targets({0}), lse), std::invalid_argument);
  Tensor lse_bf16 = Tensor::empty({2}, DType::bf16, Device::cuda);
  Tensor lse_short = Tensor::empty({1}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(forward(logits, targets({0, 1}), lse_bf16), std::invalid_argument);
  REQUIRE_THROWS_AS(forward(logits, targets({0, 1}), lse_short), std::invalid_argument);
  Tensor lse_host = Tensor::empty({2}, DType::f32);
  REQUIRE_THROWS_AS(forward(logits, targets({0, 1}), lse_host), std::invalid_argument);
  const Tensor empty_vocab = Tensor::zeros({2, 0}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(forward(empty_vocab, targets({kIgnore, kIgnore}), lse), std::invalid_argument);
  const Tensor logits16 = on_gpu(random_tensor({2, 5}, DType::bf16, 2));
  REQUIRE_THROWS_AS(forward(logits16, targets({0, 1}), lse), std::invalid_argument);
  REQUIRE_NOTHROW(forward(logits, on_gpu(Tensor::from<int32_t>({4, -100}, {2})), lse));

  Tensor small = Tensor::empty({2, 4}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::cross_entropy_backward(logits, targets({0, 1}), lse, kIgnore, 1.0, small),
                    std::invalid_argument);
  Tensor d = on_gpu(Tensor::full({2, 5}, 4.0, DType::f32));
  REQUIRE_THROWS_WITH(ops::cross_entropy_backward(logits, targets({0, 9}), lse, kIgnore, 1.0, d),
                      Catch::Contains("targets[1] = 9"));
  Tensor short_logp = Tensor::empty({1}, DType::f32, Device::cuda), none;
  REQUIRE_THROWS_AS(ops::token_logprobs(logits, targets({0, 1}), lse, kIgnore, short_logp, none),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::cross_entropy_backward_weighted(logits, targets({0, 1}), lse, kIgnore,
                                                         Tensor::zeros({4}, DType::f32, Device::cuda), d),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::cross_entropy_backward_weighted(logits, targets({0, 9}), lse, kIgnore,
                                                         Tensor::zeros({2}, DType::f32, Device::cuda), d),
                    std::invalid_argument);
  for (double v : d.to_vector()) REQUIRE(v == 4.0);
}
