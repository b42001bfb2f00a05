// RoPE and YaRN: the table against the published formula, the rotation against a float64
// reference, its geometric properties, and the backward against finite differences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <numbers>
#include <vector>

#include "kernels/ops/rope.h"
#include "support/gradcheck.h"

using namespace dsx;
using dsx::ops::RopeConfig;

namespace {

RopeConfig deepseek_v3_rope() {
  RopeConfig c;
  c.dim = 64;
  c.theta = 10000.0;
  c.scaling = RopeConfig::Scaling::yarn;
  c.factor = 40.0;
  c.original_max_position_embeddings = 4096;
  c.beta_fast = 32.0;
  c.beta_slow = 1.0;
  c.mscale = 1.0;
  c.mscale_all_dim = 1.0;
  return c;
}

RopeConfig plain_rope(int64_t dim) {
  RopeConfig c;
  c.dim = dim;
  c.theta = 10000.0;
  return c;
}

// The YaRN paper / HF DeepseekV3YarnRotaryEmbedding formulas, written out independently.
double ref_mscale(double s, double m) {
  return s <= 1.0 ? 1.0 : 0.1 * m * std::log(s) + 1.0;
}

double ref_correction_dim(double rotations, double dim, double base, double original) {
  return dim * std::log(original / (rotations * 2.0 * std::numbers::pi)) / (2.0 * std::log(base));
}

std::vector<double> ref_inv_freq(const RopeConfig& c) {
  const double dim = static_cast<double>(c.dim);
  const double original = static_cast<double>(c.original_max_position_embeddings);
  const double low = std::max(0.0, std::floor(ref_correction_dim(c.beta_fast, dim, c.theta, original)));
  const double high = std::min(dim - 1, std::ceil(ref_correction_dim(c.beta_slow, dim, c.theta, original)));
  std::vector<double> inv;
  for (int64_t i = 0; i < c.dim / 2; ++i) {
    const double extrapolation = std::pow(c.theta, -2.0 * static_cast<double>(i) / dim);
    if (c.scaling == RopeConfig::Scaling::none) {
      inv.push_back(extrapolation);
      continue;
    }
    const double interpolation = extrapolation / c.factor;
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolation_weight = 1.0 - ramp;  // HF's inv_freq_mask
    inv.push_back(interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight);
  }
  return inv;
}

double ref_attention_factor(const RopeConfig& c) {
  if (c.scaling == RopeConfig::Scaling::none) return 1.0;
  return ref_mscale(c.factor, c.mscale) / ref_mscale(c.factor, c.mscale_all_dim);
}

// Rotates x [T, H, dim] pairwise in double, straight from the definition.
std::vector<double> ref_rope(const std::vector<double>& x, const std::vector<int64_t>& pos, int64_t heads,
                             const RopeConfig& c) {
  const auto inv = ref_inv_freq(c);
  const double m = ref_attention_factor(c);
  std::vector<double> out(x.size());
  const int64_t half = c.dim / 2;
  for (size_t t = 0; t < pos.size(); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(pos[t]) * inv[static_cast<size_t>(i)];
        const size_t a = (t * static_cast<size_t>(heads) + static_cast<size_t>(h)) * static_cast<size_t>(c.dim) +
                         2 * static_cast<size_t>(i);
        out[a] = m * (x[a] * std::cos(angle) - x[a + 1] * std::sin(angle));
        out[a + 1] = m * (x[a] * std::sin(angle) + x[a + 1] * std::cos(angle));
      }
    }
  }
  return out;
}

Tensor positions_tensor(const std::vector<int64_t>& pos) {
  return Tensor::from<int64_t>(std::span<const int64_t>(pos), {static_cast<int64_t>(pos.size())});
}

Tensor rope(const Tensor& x, const std::vector<int64_t>& pos, const ops::RopeTable& table) {
  Tensor out = Tensor::empty(x.shape(), x.dtype());
  ops::rope_forward(x, positions_tensor(pos), table, out);
  return out;
}

}  // namespace

TEST_CASE("rope: YaRN table of a DeepSeek-V3 config matches the published formula", "[rope]") {
  const RopeConfig c = deepseek_v3_rope();
  // The ramp bounds for dim 64, base 1e4, original 4096: correction dims 10.47 (beta_fast 32) and
  // 22.51 (beta_slow 1), floored/ceiled to 10 and 23.
  REQUIRE(std::floor(ref_correction_dim(32, 64, 1e4, 4096)) == 10.0);
  REQUIRE(std::ceil(ref_correction_dim(1, 64, 1e4, 4096)) == 23.0);

  const int64_t max_pos = 163840;  // 40 × 4096, V3's max_position_embeddings
  const auto table = ops::rope_table(c, max_pos, DType::f64);
  REQUIRE(table.cos.shape() == Shape{max_pos, 32});
  REQUIRE(table.sin.shape() == Shape{max_pos, 32});
  const double* cs = table.cos.data<double>();
  const double* sn = table.sin.data<double>();

  // Spot values computed with Python's math module from the same published formula (floor/ceil
  // correction range, clamp ramp, inv = inter·ramp + extra·(1 − ramp); mscale ratio 1 here).
  // Doubles agree to rounding of an angle up to ~130 rad, so 1e-12 absolute.
  struct Spot {
    int64_t pos, pair;
    double cos, sin;
  };
  const Spot spots[] = {
      {1, 0, 0.5403023058681398, 0.8414709848078965},          // pure extrapolation: inv 1
      {4095, 12, -0.9933675866695494, -0.11498190185553221},   // inside the ramp
      {4095, 16, -0.8621230924986953, -0.5066988981441405},    // inv exactly 0.0055
      {100000, 31, 0.9449415590350292, 0.3272391327583676},    // pure interpolation
      {163839, 20, -0.7512756089534267, -0.6599886055013813},  // last position
  };
  for (const Spot& s : spots) {
    CHECK(cs[s.pos * 32 + s.pair] == Approx(s.cos).margin(1e-12));
    CHECK(sn[s.pos * 32 + s.pair] == Approx(s.sin).margin(1e-12));
  }

  // Every entry on a grid of positions against the formula evaluated here in double. Angles
  // reach 1.6e5 rad, and two double evaluations of inv_freq may differ by a few ulp (4e-16
  // relative), so entries agree to ~1e-10; a wrong ramp or factor is off by O(0.1).
  const auto inv = ref_inv_freq(c);
  double worst = 0;
  for (int64_t p = 0; p < max_pos; p += 997) {
    for (int64_t i = 0; i < 32; ++i) {
      const double angle = static_cast<double>(p) * inv[static_cast<size_t>(i)];
      worst = std::max(worst, std::abs(cs[p * 32 + i] - std::cos(angle)));
      worst = std::max(worst, std::abs(sn[p * 32 + i] - std::sin(angle)));
    }
  }
  INFO("worst deviation " << worst);
  CHECK(worst < 1e-10);
}

TEST_CASE("rope: attention factor multiplies cos and sin when mscale != mscale_all_dim", "[rope]") {
  RopeConfig c = deepseek_v3_rope();
  c.mscale = 1.0;
  c.mscale_all_dim = 0.0;  // HF's default: the softmax scale is untouched, cos/sin carry 1 + 0.1·ln 40
  const auto table = ops::rope_table(c, 8, DType::f64);
  const double m = 0.1 * std::log(40.0) + 1.0;
  for (int64_t p = 0; p < 8; ++p) {
    for (int64_t i = 0; i < 32; ++i) {
      const double c2 = table.cos.data<double>()[p * 32 + i], s2 = table.sin.data<double>()[p * 32 + i];
      REQUIRE(std::sqrt(c2 * c2 + s2 * s2) == Approx(m).epsilon(1e-14));
    }
  }
  CHECK(table.cos.data<double>()[0] == Approx(m).epsilon(1e-15));  // position 0: cos = 1·m
}

TEST_CASE("rope: softmax scale factor follows mscale_all_dim", "[rope]") {
  RopeConfig v3 = deepseek_v3_rope();
  CHECK(ops::rope_softmax_scale_factor(v3) == Approx(0.1 * std::log(40.0) + 1.0).epsilon(1e-15));
  CHECK(ops::rope_softmax_scale_factor(v3) == Approx(1.3688879454113936).epsilon(1e-15));
  RopeConfig v2_lite = v3;
  v2_lite.mscale = v2_lite.mscale_all_dim = 0.707;
  CHECK(ops::rope_softmax_scale_factor(v2_lite) == Approx(0.0707 * std::log(40.0) + 1.0).epsilon(1e-15));
  RopeConfig no_all_dim = v3;
  no_all_dim.mscale_all_dim = 0.0;
  CHECK(ops::rope_softmax_scale_factor(no_all_dim) == 1.0);
  CHECK(ops::rope_softmax_scale_factor(plain_rope(64)) == 1.0);
  RopeConfig no_stretch = v3;
  no_stretch.factor = 1.0;  // mscale(1, m) = 1
  CHECK(ops::rope_softmax_scale_factor(no_stretch) == 1.0);
}

TEST_CASE("rope: f32 forward matches a float64 reference", "[rope]") {
  // |x| <= 1 and |cos|, |sin| <= 1.37: each output is two f32 products and a sum of values
  // <= 2.8, rounded table entries (2^-24 relative) included, so errors stay below ~1e-6;
  // 5e-6 leaves margin while a wrong angle or sign is off by O(0.1).
  const int64_t tokens = 11, heads = 3;
  const std::vector<int64_t> pos{0, 1, 2, 7, 100, 4095, 4096, 9000, 20000, 30000, 3};
  for (const RopeConfig& c : {plain_rope(64), deepseek_v3_rope(), [] {
                                RopeConfig yarn_m = deepseek_v3_rope();
                                yarn_m.mscale_all_dim = 0.0;
                                return yarn_m;
                              }()}) {
    const auto table = ops::rope_table(c, 30001, DType::f32);
    Tensor x = test::random_tensor({tokens, heads, c.dim}, DType::f32, 11);
    Tensor out = rope(x, pos, table);
    const auto expected = ref_rope(x.to_vector(), pos, heads, c);
    const Tensor expected_t = Tensor::from<double>(expected, x.shape());
    CHECK(test::max_abs_diff(out, expected_t) < 5e-6);
  }
}

TEST_CASE("rope: rotation preserves pair norms and works in place", "[rope]") {
  const std::vector<int64_t> pos{0, 5, 123, 4097, 20000};
  for (const RopeConfig& c : {plain_rope(16), deepseek_v3_rope()}) {  // V3: mscale ratio is 1
    const auto table = ops::rope_table(c, 20001, DType::f64);
    Tensor x = test::random_tensor({5, 2, c.dim}, DType::f64, 3);
    Tensor out = rope(x, pos, table);
    const auto a = x.to_vector(), b = out.to_vector();
    for (size_t i = 0; i < a.size(); i += 2) {
      REQUIRE(std::hypot(b[i], b[i + 1]) == Approx(std::hypot(a[i], a[i + 1])).epsilon(1e-13));
    }
    Tensor in_place = x.clone();
    ops::rope_forward(in_place, positions_tensor(pos), table, in_place);
    CHECK(test::max_abs_diff(in_place, out) == 0.0);
  }
}

TEST_CASE("rope: q·k after plain RoPE depends only on the position difference", "[rope]") {
  const RopeConfig c = plain_rope(32);
  const auto table = ops::rope_table(c, 5000, DType::f64);
  Tensor q = test::random_tensor({1, 1, 32}, DType::f64, 21);
  Tensor k = test::random_tensor({1, 1, 32}, DType::f64, 22);
  auto score = [&](int64_t pq, int64_t pk) { return test::dot(rope(q, {pq}, table), rope(k, {pk}, table)); };
  // Rotations by pq·θ and pk·θ leave q·k a function of (pq − pk)·θ; in double the scores agree
  // to ~1e-15·|angle|, while a shift that mattered would change them by O(0.1).
  for (int64_t offset : {0, 3, 17, 250}) {
    const double base = score(offset + 7, 7);
    for (int64_t shift : {1, 40, 999, 4000}) CHECK(score(offset + 7 + shift, 7 + shift) == Approx(base).margin(1e-11));
  }
  CHECK(std::abs(score(10, 7) - score(10, 8)) > 1e-3);  // but it does depend on the difference
}

TEST_CASE("rope: backward is the transpose rotation (finite differences, f64)", "[rope]") {
  // mscale_all_dim 0 makes the map non-orthogonal (scaled by 1.37), so the transpose and the
  // inverse differ and a backward that used the inverse would fail. Tolerance: gradcheck.h.
  RopeConfig c = deepseek_v3_rope();
  c.dim = 8;
  c.original_max_position_embeddings = 64;  // puts the ramp inside the 4 pairs of dim 8
  c.mscale_all_dim = 0.0;
  const auto table = ops::rope_table(c, 300, DType::f64);
  const std::vector<int64_t> pos{0, 3, 299, 64, 17};
  Tensor x = test::random_tensor({5, 2, 8}, DType::f64, 5);
  const Tensor probe = test::random_tensor({5, 2, 8}, DType::f64, 6);
  Tensor dx = Tensor::empty(x.shape(), DType::f64);
  ops::rope_backward(probe, positions_tensor(pos), table, dx);
  const Tensor numeric = test::finite_difference(x, [&] { return test::dot(rope(x, pos, table), probe); });
  CHECK(test::max_rel_error(dx, numeric) < 1e-6);
}

TEST_CASE("rope: rejects bad shapes, dtypes and positions", "[rope]") {
  const auto table = ops::rope_table(plain_rope(8), 10, DType::f32);
  Tensor x = test::random_tensor({2, 1, 8}, DType::f32, 1);
  Tensor out = Tensor::empty(x.shape(), DType::f32);
  CHECK_THROWS_AS(ops::rope_forward(x, positions_tensor({0, 10}), table, out), std::invalid_argument);
  CHECK_THROWS_AS(ops::rope_forward(x, positions_tensor({0, -1}), table, out), std::invalid_argument);
  CHECK_THROWS_AS(ops::rope_forward(x, positions_tensor({0}), table, out), std::invalid_argument);
  Tensor wide = test::random_tensor({2, 1, 10}, DType::f32, 1);
  Tensor wide_out = Tensor::empty(wide.shape(), DType::f32);
  CHECK_THROWS_AS(ops::rope_forward(wide, positions_tensor({0, 1}), table, wide_out), std::invalid_argument);
  Tensor x64 = x.to(DType::f64), out64 = Tensor::empty(x.shape(), DType::f64);
  CHECK_THROWS_AS(ops::rope_forward(x64, positions_tensor({0, 1}), table, out64), std::invalid_argument);
  CHECK_THROWS_AS(ops::rope_table(plain_rope(7), 10, DType::f32), std::invalid_argument);
  CHECK_THROWS_AS(ops::rope_table(plain_rope(8), 10, DType::bf16), std::invalid_argument);
  CHECK_NOTHROW(ops::rope_forward(x, Tensor::from<int32_t>({9, 0}, {2}), table, out));
}
