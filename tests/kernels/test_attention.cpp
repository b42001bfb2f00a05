// Causal attention with Dqk != Dv: forward against a float64 reference, causality, segment
// (document) masking, the saved log-sum-exp, and the backward against finite differences.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/ops/attention.h"
#include "support/gradcheck.h"

using namespace dsx;

namespace {

struct Dims {
  int64_t batch, seq, heads, dqk, dv;
};

size_t at(const Dims& d, int64_t b, int64_t s, int64_t h, int64_t width, int64_t c) {
  return static_cast<size_t>(((b * d.seq + s) * d.heads + h) * width + c);
}

struct Result {
  Tensor out, lse;
};

// softmax(scale·q·kᵀ) over visible keys, straight from the definition, in double.
Result reference_attention(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                           const std::vector<int64_t>& segments, const Dims& d) {
  const auto qv = q.to_vector(), kv = k.to_vector(), vv = v.to_vector();
  std::vector<double> out(static_cast<size_t>(d.batch * d.seq * d.heads * d.dv), 0.0);
  std::vector<double> lse(static_cast<size_t>(d.batch * d.heads * d.seq));
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t h = 0; h < d.heads; ++h) {
      for (int64_t i = 0; i < d.seq; ++i) {
        std::vector<double> scores;
        std::vector<int64_t> keys;
        for (int64_t j = 0; j <= i; ++j) {
          if (!segments.empty() &&
              segments[static_cast<size_t>(b * d.seq + j)] != segments[static_cast<size_t>(b * d.seq + i)]) {
            continue;
          }
          double s = 0;
          for (int64_t c = 0; c < d.dqk; ++c) s += qv[at(d, b, i, h, d.dqk, c)] * kv[at(d, b, j, h, d.dqk, c)];
          scores.push_back(scale * s);
          keys.push_back(j);
        }
        const double m = *std::max_element(scores.begin(), scores.end());
        double sum = 0;
        for (double s : scores) sum += std::exp(s - m);
        const double row_lse = m + std::log(sum);
        lse[static_cast<size_t>((b * d.heads + h) * d.seq + i)] = row_lse;
        for (size_t n = 0; n < keys.size(); ++n) {
          const double p = std::exp(scores[n] - row_lse);
          for (int64_t c = 0; c < d.dv; ++c) out[at(d, b, i, h, d.dv, c)] += p * vv[at(d, b, keys[n], h, d.dv, c)];
        }
      }
    }
  }
  return {Tensor::from<double>(out, {d.batch, d.seq, d.heads, d.dv}),
          Tensor::from<double>(lse, {d.batch, d.heads, d.seq})};
}

Tensor segment_tensor(const std::vector<int64_t>& segments, const Dims& d) {
  if (segments.empty()) return Tensor();
  return Tensor::from<int64_t>(std::span<const int64_t>(segments), {d.batch, d.seq});
}

Result run_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale,
                   const std::vector<int64_t>& segments, const Dims& d) {
  const DType lse_dtype = q.dtype() == DType::bf16 ? DType::f32 : q.dtype();
  Result r{Tensor::empty({d.batch, d.seq, d.heads, d.dv}, q.dtype()),
           Tensor::empty({d.batch, d.heads, d.seq}, lse_dtype)};
  ops::attention_forward(q, k, v, scale, segment_tensor(segments, d), r.out, r.lse);
  return r;
}

struct Grads {
  Tensor dq, dk, dv;
};

Grads run_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, double scale,
                   const std::vector<int64_t>& segments, const Dims& d) {
  const Result fwd = run_forward(q, k, v, scale, segments, d);
  Grads g{Tensor::empty(q.shape(), q.dtype()), Tensor::empty(k.shape(), q.dtype()),
          Tensor::empty(v.shape(), q.dtype())};
  ops::attention_backward(q, k, v, fwd.out, fwd.lse, dout, scale, segment_tensor(segments, d), g.dq, g.dk, g.dv);
  return g;
}

struct Inputs {
  Tensor q, k, v;
};

// Values in [-3, 3] give scores with a spread of several units, so the softmax is far from
// uniform and a wrong mask or scale shows.
Inputs random_inputs(const Dims& d, DType dtype, uint64_t seed) {
  return {test::random_tensor({d.batch, d.seq, d.heads, d.dqk}, dtype, seed, -3, 3),
          test::random_tensor({d.batch, d.seq, d.heads, d.dqk}, dtype, seed + 1, -3, 3),
          test::random_tensor({d.batch, d.seq, d.heads, d.dv}, dtype, seed + 2, -3, 3)};
}

// Even batch rows: ids that recur after gaps (0,0,0,0,1,1,1,1,2,2,2,2,0,...), so masking cannot
// rely on segments being contiguous; odd rows: three contiguous documents, as packing makes.
std::vector<int64_t> mixed_segments(const Dims& d) {
  std::vector<int64_t> s(static_cast<size_t>(d.batch * d.seq));
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t i = 0; i < d.seq; ++i)
      s[static_cast<size_t>(b * d.seq + i)] = b % 2 == 0 ? (i / 4) % 3 : i * 3 / d.seq;
  }
  return s;
}

const double kScale = 1.0 / std::sqrt(24.0);

}  // namespace

TEST_CASE("attention: f32 forward matches a float64 reference (Dqk 24, Dv 16)", "[attention]") {
  // S = 300 spans three query tiles of the CPU kernel (128 rows each). f32 error budget:
  // 24-term dot products of values <= 9 in size carry ~1e-5 absolute error before scaling
  // (~2e-6 after), which becomes ~2e-6 relative in the probabilities and ~1e-5 in outputs of
  // size <= 3; lse (~5) gets ~3e-6. A wrong mask or scale changes outputs by O(0.1).
  const Dims d{2, 300, 3, 24, 16};
  // Inputs rounded to f32 first, so the comparison measures the op's arithmetic alone.
  const Inputs in32 = random_inputs(d, DType::f32, 100);
  const Inputs in{in32.q.to(DType::f64), in32.k.to(DType::f64), in32.v.to(DType::f64)};
  for (const auto& segments : {std::vector<int64_t>{}, mixed_segments(d)}) {
    const Result expected = reference_attention(in.q, in.k, in.v, kScale, segments, d);
    const Result got = run_forward(in32.q, in32.k, in32.v, kScale, segments, d);
    CHECK(test::max_rel_error(got.out, expected.out) < 2e-5);
    CHECK(test::max_abs_diff(got.lse, expected.lse) < 2e-5);
    // f64 through the same code: only summation order differs from the reference.
    const Result got64 = run_forward(in.q, in.k, in.v, kScale, segments, d);
    CHECK(test::max_rel_error(got64.out, expected.out) < 1e-12);
    CHECK(test::max_abs_diff(got64.lse, expected.lse) < 1e-12);
  }
}

TEST_CASE("attention: the saved lse is the log-partition of each row, stable for large scores", "[attention]") {
  const Dims d{1, 70, 2, 24, 16};
  const Inputs in = random_inputs(d, DType::f64, 7);
  // Query 0 sees only key 0, so its lse is exactly its one score.
  const Result r = run_forward(in.q, in.k, in.v, kScale, {}, d);
  for (int64_t h = 0; h < d.heads; ++h) {
    double s = 0;
    for (int64_t c = 0; c < d.dqk; ++c)
      s += in.q.to_vector()[at(d, 0, 0, h, d.dqk, c)] * in.k.to_vector()[at(d, 0, 0, h, d.dqk, c)];
    CHECK(r.lse.to_vector()[static_cast<size_t>(h * d.seq)] == Approx(kScale * s).epsilon(1e-13));
  }
  // Scale 50 pushes scores to ~1e3, where exp overflows without the max shift; f32 must still
  // give finite values matching the reference. The scores themselves are f32 numbers of size
  // ~1e3 (spacing 1e-4), so lse carries a few ulps: 2e-6 relative of the largest |lse| (~16
  // ulps); outputs are near-one-hot mixtures of v whose weights inherit those score errors.
  const Result expected = reference_attention(in.q, in.k, in.v, 50.0, {}, d);
  const Result big = run_forward(in.q.to(DType::f32), in.k.to(DType::f32), in.v.to(DType::f32), 50.0, {}, d);
  for (double x : big.lse.to_vector()) REQUIRE(std::isfinite(x));
  CHECK(test::max_rel_error(big.lse, expected.lse) < 2e-6);
  CHECK(test::max_rel_error(big.out, expected.out) < 1e-3);
}

TEST_CASE("attention: causality: future keys and values do not change earlier rows", "[attention]") {
  const Dims d{1, 300, 2, 24, 16};
  const Inputs in = random_inputs(d, DType::f64, 31);
  const int64_t t0 = 150;  // inside the second query tile
  Tensor k2 = in.k.clone(), v2 = in.v.clone();
  double* kp = k2.data<double>();
  double* vp = v2.data<double>();
  for (size_t n = at(d, 0, t0, 0, d.dqk, 0); n < static_cast<size_t>(k2.numel()); ++n) kp[n] += 1.5;
  for (size_t n = at(d, 0, t0, 0, d.dv, 0); n < static_cast<size_t>(v2.numel()); ++n) vp[n] -= 2.0;
  const Result a = run_forward(in.q, in.k, in.v, kScale, {}, d);
  const Result b = run_forward(in.q, k2, v2, kScale, {}, d);
  // Rows before t0: identical up to rounding (a leak would move them by O(0.1)).
  CHECK(test::max_abs_diff(a.out.view({d.seq * d.heads * d.dv}).slice(0, t0 * d.heads * d.dv),
                           b.out.view({d.seq * d.heads * d.dv}).slice(0, t0 * d.heads * d.dv)) < 1e-14);
  const auto la = a.lse.to_vector(), lb = b.lse.to_vector();
  for (int64_t h = 0; h < d.heads; ++h) {
    for (int64_t i = 0; i < d.seq; ++i) {
      const size_t n = static_cast<size_t>(h * d.seq + i);
      if (i < t0)
        REQUIRE(std::abs(la[n] - lb[n]) < 1e-14);
      else
        REQUIRE(std::abs(la[n] - lb[n]) > 1e-6);  // the change is visible from t0 on
    }
  }
}

TEST_CASE("attention: segment masking equals attending to each document separately", "[attention]") {
  // A packed row [doc A (40 tokens) | doc B (200 tokens)] against A and B run on their own.
  // Same f64 math with different tile boundaries: agreement to 1e-12; cross-document
  // attention would change values by O(0.1).
  const int64_t len_a = 40, len_b = 200;
  const Dims packed{1, len_a + len_b, 2, 24, 16};
  const Inputs in = random_inputs(packed, DType::f64, 55);
  const Tensor probe = test::random_tensor({1, packed.seq, 2, 16}, DType::f64, 58);
  std::vector<int64_t> segments(static_cast<size_t>(packed.seq), 3);
  std::fill(segments.begin() + len_a, segments.end(), 4);
  const Result whole = run_forward(in.q, in.k, in.v, kScale, segments, packed);
  const Grads whole_grads = run_backward(in.q, in.k, in.v, probe, kScale, segments, packed);

  auto part = [](const Tensor& t, int64_t begin, int64_t end) {
    const Shape rows{t.dim(1), t.dim(2), t.dim(3)};
    return t.view(rows).slice(begin, end).clone().view({1, end - begin, t.dim(2), t.dim(3)});
  };
  int64_t begin = 0;
  for (int64_t len : {len_a, len_b}) {
    const Dims doc{1, len, 2, 24, 16};
    const int64_t end = begin + len;
    const Result alone =
        run_forward(part(in.q, begin, end), part(in.k, begin, end), part(in.v, begin, end), kScale, {}, doc);
    CHECK(test::max_abs_diff(part(whole.out, begin, end), alone.out) < 1e-12);
    const Grads g = run_backward(part(in.q, begin, end), part(in.k, begin, end), part(in.v, begin, end),
                                 part(probe, begin, end), kScale, {}, doc);
    CHECK(test::max_abs_diff(part(whole_grads.dq, begin, end), g.dq) < 1e-12);
    CHECK(test::max_abs_diff(part(whole_grads.dk, begin, end), g.dk) < 1e-12);
    CHECK(test::max_abs_diff(part(whole_grads.dv, begin, end), g.dv) < 1e-12);
    begin = end;
  }
}

TEST_CASE("attention: backward for q, k and v matches finite differences (f64)", "[attention]") {
  // Tolerance from gradcheck.h: relative 1e-6 of the largest gradient entry.
  const double scale = kScale * 1.3;  // any scale: the gradient must carry it
  SECTION("every element, short sequences with segment masking") {
    const Dims d{2, 9, 2, 24, 16};
    Inputs in = random_inputs(d, DType::f64, 70);
    const auto segments = mixed_segments(d);
    const Tensor probe = test::random_tensor({d.batch, d.seq, d.heads, d.dv}, DType::f64, 73);
    const Grads g = run_backward(in.q, in.k, in.v, probe, scale, segments, d);
    auto loss = [&] { return test::dot(run_forward(in.q, in.k, in.v, scale, segments, d).out, probe); };
    CHECK(test::max_rel_error(g.dq, test::finite_difference(in.q, loss)) < 1e-6);
    CHECK(test::max_rel_error(g.dk, test::finite_difference(in.k, loss)) < 1e-6);
    CHECK(test::max_rel_error(g.dv, test::finite_difference(in.v, loss)) < 1e-6);
  }
  SECTION("sampled elements, a sequence spanning three query tiles") {
    // dK and dV of early keys accumulate over every later query tile; sample those rows densely.
    const Dims d{1, 300, 2, 24, 16};
    Inputs in = random_inputs(d, DType::f64, 80);
    const Tensor probe = test::random_tensor({d.batch, d.seq, d.heads, d.dv}, DType::f64, 83);
    const Grads g = run_backward(in.q, in.k, in.v, probe, scale, {}, d);
    auto loss = [&] { return test::dot(run_forward(in.q, in.k, in.v, scale, {}, d).out, probe); };
    auto check_sampled = [&](Tensor& x, const Tensor& analytic, int64_t width) {
      const auto a = analytic.to_vector();
      double* p = x.data<double>();
      double worst = 0, largest = 0;
      for (int64_t s : {0, 1, 2, 127, 128, 129, 200, 255, 256, 299}) {
        const int64_t h = s % d.heads;  // both heads appear; one per position keeps this quick
        for (int64_t c : {int64_t{0}, width / 2, width - 1}) {
          const size_t n = at(d, 0, s, h, width, c);
          const double saved = p[n], step = 1e-6;
          p[n] = saved + step;
          const double up = loss();
          p[n] = saved - step;
          const double down = loss();
          p[n] = saved;
          const double numeric = (up - down) / (2 * step);
          worst = std::max(worst, std::abs(numeric - a[n]));
          largest = std::max(largest, std::abs(numeric));
        }
      }
      CHECK(worst / largest < 1e-6);
    };
    check_sampled(in.q, g.dq, d.dqk);
    check_sampled(in.k, g.dk, d.dqk);
    check_sampled(in.v, g.dv, d.dv);

    // The f32 backward follows the f64 one: ~1e-6 relative errors in P, amplified by S-term
    // sums of size-3 values, stay below 1e-4 of the largest gradient.
    const Grads g32 =
        run_backward(in.q.to(DType::f32), in.k.to(DType::f32), in.v.to(DType::f32), probe.to(DType::f32), scale, {}, d);
    CHECK(test::max_rel_error(g32.dq, g.dq) < 1e-4);
    CHECK(test::max_rel_error(g32.dk, g.dk) < 1e-4);
    CHECK(test::max_rel_error(g32.dv, g.dv) < 1e-4);
  }
}

TEST_CASE("attention: bf16 inputs and outputs follow the f32 op on the widened values", "[attention]") {
  // What training with bf16 activations runs (trainer/model/mla.cpp). The bf16 inputs are exact
  // in f32 and f64, so the float64 reference sees the very values the op sees; the only extra
  // error is rounding each output to bf16 once (2^-9 relative to the element, so 2^-8 of the
  // largest entry covers it with the f32 arithmetic's ~1e-5).
  const Dims d{2, 150, 2, 24, 16};  // two query tiles
  const Inputs in = random_inputs(d, DType::bf16, 400);
  const Inputs in64{in.q.to(DType::f64), in.k.to(DType::f64), in.v.to(DType::f64)};
  const Tensor probe = test::random_tensor({d.batch, d.seq, d.heads, d.dv}, DType::bf16, 403);
  for (const auto& segments : {std::vector<int64_t>{}, mixed_segments(d)}) {
    const Result expected = reference_attention(in64.q, in64.k, in64.v, kScale, segments, d);
    const Result got = run_forward(in.q, in.k, in.v, kScale, segments, d);
    REQUIRE(got.out.dtype() == DType::bf16);
    CHECK(test::max_rel_error(got.out, expected.out) < 1.0 / 256);
    CHECK(test::max_abs_diff(got.lse, expected.lse) < 2e-5);  // f32 lse: no bf16 rounding

    // Backward: the f32 op on the widened bf16 tensors (out as stored, in bf16), each gradient
    // rounded to bf16 once (2^-9 of an element), against the f64 op on the same values.
    const Grads g = run_backward(in.q, in.k, in.v, probe, kScale, segments, d);
    REQUIRE(g.dq.dtype() == DType::bf16);
    Grads g64{Tensor::empty(in64.q.shape(), DType::f64), Tensor::empty(in64.k.shape(), DType::f64),
              Tensor::empty(in64.v.shape(), DType::f64)};
    ops::attention_backward(in64.q, in64.k, in64.v, got.out.to(DType::f64), expected.lse, probe.to(DType::f64), kScale,
                            segment_tensor(segments, d), g64.dq, g64.dk, g64.dv);
    CHECK(test::max_rel_error(g.dq, g64.dq) < 1.0 / 256);
    CHECK(test::max_rel_error(g.dk, g64.dk) < 1.0 / 256);
    CHECK(test::max_rel_error(g.dv, g64.dv) < 1.0 / 256);
  }
  // A bf16 lse is refused: its rounding would distort the recomputed probabilities.
  Tensor out = Tensor::empty({d.batch, d.seq, d.heads, d.dv}, DType::bf16);
  Tensor lse16 = Tensor::empty({d.batch, d.heads, d.seq}, DType::bf16);
  CHECK_THROWS_AS(ops::attention_forward(in.q, in.k, in.v, kScale, Tensor(), out, lse16), std::invalid_argument);
}

TEST_CASE("attention: rejects mismatched shapes and dtypes", "[attention]") {
  const Dims d{1, 4, 2, 24, 16};
  const Inputs in = random_inputs(d, DType::f32, 1);
  Tensor out = Tensor::empty({1, 4, 2, 16}, DType::f32), lse = Tensor::empty({1, 2, 4}, DType::f32);
  CHECK_NOTHROW(ops::attention_forward(in.q, in.k, in.v, kScale, Tensor(), out, lse));
  Tensor bad_k = Tensor::empty({1, 4, 2, 16}, DType::f32);
  CHECK_THROWS_AS(ops::attention_forward(in.q, bad_k, in.v, kScale, Tensor(), out, lse), std::invalid_argument);
  Tensor bad_lse = Tensor::empty({1, 4, 2}, DType::f32);
  CHECK_THROWS_AS(ops::attention_forward(in.q, in.k, in.v, kScale, Tensor(), out, bad_lse), std::invalid_argument);
  Tensor bad_segments = Tensor::from<int32_t>({0, 0, 1}, {1, 3});
  CHECK_THROWS_AS(ops::attention_forward(in.q, in.k, in.v, kScale, bad_segments, out, lse), std::invalid_argument);
  Tensor v64 = in.v.to(DType::f64);
  CHECK_THROWS_AS(ops::attention_forward(in.q, in.k, v64, kScale, Tensor(), out, lse), std::invalid_argument);
  Tensor float_segments = Tensor::zeros({1, 4}, DType::f32);
  CHECK_THROWS_AS(ops::attention_forward(in.q, in.k, in.v, kScale, float_segments, out, lse), std::invalid_argument);
}
