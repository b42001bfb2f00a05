// The elementwise, gather and rotation ops on the GPU (kernels/cuda/elementwise.cu,
// embedding.cu, swiglu.cu, rope.cu) against the CPU ops on the same random inputs.
//
// Tolerances (DSX_REQUIRE_CLOSE: max |gpu - cpu| / max(1, max |cpu|)):
//  - exact (same_values) where both sides do the same single IEEE operation per element or
//    only move bytes: scale_, copy/set_columns (accumulating too: one add), embedding forward,
//    and embedding backward (each element adds its tokens' rows in token order on both sides).
//  - f32 1e-6 / f64 1e-14 where a few roundings differ: FMA contraction by nvcc (add_, rope)
//    and CUDA's expf/exp (<= 2 ulp) against glibc's (swiglu). A handful of ulps of values of
//    magnitude <= ~10 stays below 1e-6 relative to max(1, max |cpu|); an index bug is O(1).
#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "gpu_check.h"
#include "kernels/ops/elementwise.h"
#include "kernels/ops/embedding.h"
#include "kernels/ops/rope.h"
#include "kernels/ops/swiglu.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;
using dsx::test::same_values;

namespace {

constexpr double kTolF32 = 1e-6;
constexpr double kTolF64 = 1e-14;

double tol_for(DType t) {
  return t == DType::f32 ? kTolF32 : kTolF64;
}

// Ids in [0, vocab) drawn uniformly (small vocabularies repeat ids many times), as dtype.
Tensor random_ids(int64_t n, int64_t vocab, uint64_t seed, DType dtype) {
  std::mt19937_64 gen(seed);
  std::uniform_int_distribution<int64_t> dist(0, vocab - 1);
  std::vector<int64_t> v(static_cast<size_t>(n));
  for (int64_t& x : v) x = dist(gen);
  return Tensor::from<int64_t>(std::span<const int64_t>(v), {n}).to(dtype);
}

Tensor ids_tensor(const std::vector<int64_t>& ids, DType dtype) {
  return Tensor::from<int64_t>(std::span<const int64_t>(ids), {static_cast<int64_t>(ids.size())}).to(dtype);
}

const std::vector<Shape> kRowShapes{{1, 1}, {1, 7}, {3, 33}, {17, 1000}, {129, 1031}};

}  // namespace

TEST_CASE("gpu add_ matches the CPU (f32, f64)", "[gpu][elementwise]") {
  for (DType t : {DType::f32, DType::f64}) {
    for (const Shape& shape : kRowShapes) {
      CAPTURE(dtype_name(t), shape_str(shape));
      Tensor y = random_tensor(shape, t, 1, -3, 3);
      const Tensor x = random_tensor(shape, t, 2, -3, 3);
      Tensor yg = on_gpu(y);
      ops::add_(yg, on_gpu(x), -0.75);
      ops::add_(y, x, -0.75);
      DSX_REQUIRE_CLOSE(yg, y, tol_for(t));
    }
  }
}

TEST_CASE("gpu scale_ matches the CPU bit for bit; alpha = 0 clears NaN", "[gpu][elementwise]") {
  for (DType t : {DType::f32, DType::f64}) {
    for (const Shape& shape : kRowShapes) {
      CAPTURE(dtype_name(t), shape_str(shape));
      Tensor y = random_tensor(shape, t, 3, -3, 3);
      Tensor yg = on_gpu(y);
      ops::scale_(yg, 1.7);
      ops::scale_(y, 1.7);
      REQUIRE(same_values(on_cpu(yg), y));  // one correctly rounded multiply on both sides
    }
    Tensor nan = Tensor::full({5, 37}, std::nan(""), t);
    Tensor nan_g = on_gpu(nan);
    ops::scale_(nan_g, 0.0);
    REQUIRE(same_values(on_cpu(nan_g), Tensor::zeros({5, 37}, t)));
  }
}

TEST_CASE("gpu add_ and scale_ reject what the CPU rejects", "[gpu][elementwise]") {
  Tensor y = on_gpu(random_tensor({4, 5}, DType::f32, 4));
  REQUIRE_THROWS_AS(ops::add_(y, on_gpu(random_tensor({4, 6}, DType::f32, 5))), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::add_(y, on_gpu(random_tensor({4, 5}, DType::f64, 5))), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::add_(y, random_tensor({4, 5}, DType::f32, 5)), std::invalid_argument);  // x on the CPU
  Tensor y16 = on_gpu(random_tensor({4, 5}, DType::bf16, 6));
  REQUIRE_THROWS_AS(ops::scale_(y16, 2.0), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::add_(y16, y16), std::invalid_argument);
}

TEST_CASE("gpu copy_columns and set_columns move the same bytes as the CPU (every dtype)", "[gpu][elementwise]") {
  for (DType t : {DType::f64, DType::f32, DType::bf16, DType::fp8_e4m3, DType::i32, DType::i64}) {
    CAPTURE(dtype_name(t));
    const Tensor x = random_tensor({2, 3, 37}, t, 7, -100, 100);
    // copy_columns: columns [31, 36) of every row.
    Tensor out = Tensor::zeros({2, 3, 5}, t);
    Tensor out_g = on_gpu(out);
    ops::copy_columns(on_gpu(x), 31, out_g);
    ops::copy_columns(x, 31, out);
    REQUIRE(same_values(on_cpu(out_g), out));
    // set_columns (copy): into columns [3, 8) of a random destination, the rest untouched.
    Tensor dst = random_tensor({2, 3, 37}, t, 8, -100, 100);
    Tensor dst_g = on_gpu(dst);
    ops::set_columns(dst_g, 3, on_gpu(out));
    ops::set_columns(dst, 3, out);
    REQUIRE(same_values(on_cpu(dst_g), dst));
  }
  // Zero-width windows and one-row tensors.
  const Tensor wide = random_tensor({1, 1000}, DType::f32, 9);
  Tensor none = Tensor::zeros({1, 0}, DType::f32, Device::cuda);
  REQUIRE_NOTHROW(ops::copy_columns(on_gpu(wide), 1000, none));
  Tensor last = Tensor::zeros({1, 1}, DType::f32, Device::cuda);
  ops::copy_columns(on_gpu(wide), 999, last);
  REQUIRE(last.to_vector()[0] == wide.to_vector()[999]);
}

TEST_CASE("gpu set_columns accumulates like the CPU (f32, f64) and refuses bf16", "[gpu][elementwise]") {
  for (DType t : {DType::f32, DType::f64}) {
    for (const Shape& shape : std::vector<Shape>{{1, 40}, {7, 1031}, {3, 2, 300}}) {
      CAPTURE(dtype_name(t), shape_str(shape));
      Shape narrow = shape;
      narrow.back() = shape.back() - 9;
      Tensor dst = random_tensor(shape, t, 10);
      const Tensor src = random_tensor(narrow, t, 11);
      Tensor dst_g = on_gpu(dst);
      ops::set_columns(dst_g, 4, on_gpu(src), /*accumulate=*/true);
      ops::set_columns(dst, 4, src, /*accumulate=*/true);
      REQUIRE(same_values(on_cpu(dst_g), dst));  // one add per element on both sides
    }
  }
  Tensor dst16 = on_gpu(random_tensor({2, 8}, DType::bf16, 12));
  const Tensor src16 = on_gpu(random_tensor({2, 4}, DType::bf16, 13));
  REQUIRE_THROWS_AS(ops::set_columns(dst16, 0, src16, /*accumulate=*/true), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::set_columns(dst16, 5, src16), std::invalid_argument);  // columns 5..9 of 8
  Tensor x = on_gpu(random_tensor({2, 6}, DType::f32, 14));
  Tensor out = Tensor::zeros({2, 3}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 4, out), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::copy_columns(x, -1, out), std::invalid_argument);
  Tensor out_rows = Tensor::zeros({3, 3}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 0, out_rows), std::invalid_argument);
  Tensor out64 = Tensor::zeros({2, 3}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 0, out64), std::invalid_argument);
  Tensor out_host = Tensor::zeros({2, 3}, DType::f32);
  REQUIRE_THROWS_AS(ops::copy_columns(x, 0, out_host), std::invalid_argument);
}

TEST_CASE("gpu embedding forward gathers the CPU's rows exactly", "[gpu][elementwise]") {
  struct Case {
    int64_t n, vocab, d;
  };
  for (DType t : {DType::f32, DType::f64}) {
    for (DType it : {DType::i32, DType::i64}) {
      for (const Case c : {Case{1, 1, 1}, Case{300, 50, 77}, Case{64, 129280, 33}, Case{5, 7, 1031}}) {
        CAPTURE(dtype_name(t), dtype_name(it), c.n, c.vocab, c.d);
        const Tensor table = random_tensor({c.vocab, c.d}, t, 20);
        const Tensor ids = random_ids(c.n, c.vocab, 21, it);
        Tensor out = Tensor::empty({c.n, c.d}, t);
        Tensor out_g = Tensor::empty({c.n, c.d}, t, Device::cuda);
        ops::embedding_forward(on_gpu(ids), on_gpu(table), out_g);
        ops::embedding_forward(ids, table, out);
        REQUIRE(same_values(on_cpu(out_g), out));
      }
    }
  }
}

TEST_CASE("gpu embedding backward sums repeated ids in token order, bit for bit", "[gpu][elementwise]") {
  struct Case {
    int64_t n, vocab, d;
  };
  for (DType t : {DType::f32, DType::f64}) {
    for (DType it : {DType::i32, DType::i64}) {
      // Heavy repeats (300 tokens over 50 ids), a single id repeated 1000 times over more
      // columns than one block covers (300 > 256), one token, and a wide vocabulary.
      for (const Case c : {Case{300, 50, 77}, Case{1000, 1, 300}, Case{1, 3, 1}, Case{257, 129280, 65}}) {
        CAPTURE(dtype_name(t), dtype_name(it), c.n, c.vocab, c.d);
        const Tensor ids = random_ids(c.n, c.vocab, 30, it);
        const Tensor dout = random_tensor({c.n, c.d}, t, 31, -2, 2);
        Tensor dtable = random_tensor({c.vocab, c.d}, t, 32);  // accumulates into existing values
        Tensor dtable_g = on_gpu(dtable);
        ops::embedding_backward_weight(on_gpu(ids), on_gpu(dout), dtable_g);
        ops::embedding_backward_weight(ids, dout, dtable);
        REQUIRE(same_values(on_cpu(dtable_g), dtable));
      }
    }
  }
}

TEST_CASE("gpu embedding: out-of-range ids throw the CPU's message and leave the output untouched",
          "[gpu][elementwise]") {
  const Tensor table = on_gpu(random_tensor({5, 3}, DType::f32, 40));
  Tensor out = on_gpu(Tensor::full({4, 3}, 9.0, DType::f32));
  Tensor dtable = Tensor::zeros({5, 3}, DType::f32, Device::cuda);
  const Tensor dout = on_gpu(random_tensor({4, 3}, DType::f32, 41));
  for (int64_t bad : {int64_t{5}, int64_t{-1}, int64_t{1} << 40}) {
    CAPTURE(bad);
    const Tensor ids = on_gpu(ids_tensor({0, 4, bad, 1}, DType::i64));
    REQUIRE_THROWS_AS(ops::embedding_forward(ids, table, out), std::invalid_argument);
    REQUIRE_THROWS_AS(ops::embedding_backward_weight(ids, dout, dtable), std::invalid_argument);
  }
  // The FIRST offending position is named, whatever order the device checked them in.
  const Tensor ids32 = on_gpu(ids_tensor({4, 5, 7, -2}, DType::i32));
  REQUIRE_THROWS_WITH(ops::embedding_forward(ids32, table, out), Catch::Contains("id 5 at position 1"));
  REQUIRE_THROWS_WITH(ops::embedding_backward_weight(ids32, dout, dtable), Catch::Contains("id 5 at position 1"));
  for (double v : out.to_vector()) REQUIRE(v == 9.0);
  for (double v : dtable.to_vector()) REQUIRE(v == 0.0);
  // Wrong shapes, dtypes and devices.
  const Tensor ids = on_gpu(ids_tensor({0, 1, 2, 3}, DType::i32));
  Tensor out_wrong = Tensor::zeros({4, 4}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::embedding_forward(ids, table, out_wrong), std::invalid_argument);
  Tensor out64 = Tensor::zeros({4, 3}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::embedding_forward(ids, table, out64), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::embedding_forward(on_gpu(Tensor::from<float>({0, 1, 2, 3}, {4})), table, out),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::embedding_forward(ids.view({2, 2}), table, out), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::embedding_forward(ids_tensor({0, 1, 2, 3}, DType::i32), table, out),
                    std::invalid_argument);  // ids on the CPU, table on the GPU
}

TEST_CASE("gpu swiglu forward and backward match the CPU", "[gpu][elementwise]") {
  for (DType t : {DType::f32, DType::f64}) {
    for (const Shape& shape : kRowShapes) {
      CAPTURE(dtype_name(t), shape_str(shape));
      // Gates over [-20, 20] reach sigmoid's saturation on both ends.
      const Tensor gate = random_tensor(shape, t, 50, -20, 20);
      const Tensor up = random_tensor(shape, t, 51, -2, 2);
      const Tensor dout = random_tensor(shape, t, 52, -2, 2);
      Tensor out = Tensor::empty(shape, t), dgate = Tensor::empty(shape, t), dup = Tensor::empty(shape, t);
      Tensor out_g = Tensor::empty(shape, t, Device::cuda);
      Tensor dgate_g = Tensor::empty(shape, t, Device::cuda), dup_g = Tensor::empty(shape, t, Device::cuda);
      ops::swiglu_forward(on_gpu(gate), on_gpu(up), out_g);
      ops::swiglu_forward(gate, up, out);
      DSX_REQUIRE_CLOSE(out_g, out, tol_for(t));
      ops::swiglu_backward(on_gpu(gate), on_gpu(up), on_gpu(dout), dgate_g, dup_g);
      ops::swiglu_backward(gate, up, dout, dgate, dup);
      DSX_REQUIRE_CLOSE(dgate_g, dgate, tol_for(t));
      DSX_REQUIRE_CLOSE(dup_g, dup, tol_for(t));
    }
  }
  const Tensor gate = on_gpu(random_tensor({4, 6}, DType::f32, 53));
  Tensor out = Tensor::zeros({4, 6}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate, on_gpu(random_tensor({4, 5}, DType::f32, 54)), out),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate, on_gpu(random_tensor({4, 6}, DType::f64, 54)), out),
                    std::invalid_argument);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate, random_tensor({4, 6}, DType::f32, 54), out), std::invalid_argument);
  const Tensor gate16 = on_gpu(random_tensor({4, 6}, DType::bf16, 55));
  Tensor out16 = Tensor::zeros({4, 6}, DType::bf16, Device::cuda);
  REQUIRE_THROWS_AS(ops::swiglu_forward(gate16, gate16, out16), std::invalid_argument);
}

namespace {

// DeepSeek-V3's YaRN, with mscale_all_dim = 0 so that cos/sin carry a non-unit attention factor
// (mscale(40, 1) ≈ 1.369): the backward must then be the transpose, not the inverse.
ops::RopeConfig yarn_rope() {
  ops::RopeConfig c;
  c.dim = 64;
  c.theta = 10000.0;
  c.scaling = ops::RopeConfig::Scaling::yarn;
  c.factor = 40.0;
  c.original_max_position_embeddings = 4096;
  c.beta_fast = 32.0;
  c.beta_slow = 1.0;
  c.mscale = 1.0;
  c.mscale_all_dim = 0.0;
  return c;
}

ops::RopeConfig plain_rope(int64_t dim) {
  ops::RopeConfig c;
  c.dim = dim;
  return c;
}

ops::RopeTable table_on_gpu(const ops::RopeTable& t) {
  return {on_gpu(t.cos), on_gpu(t.sin)};
}

}  // namespace

TEST_CASE("gpu rope forward and backward match the CPU (YaRN and plain, in place too)", "[gpu][elementwise]") {
  struct Case {
    ops::RopeConfig config;
    int64_t max_positions, tokens, heads;
  };
  const std::vector<Case> cases{
      {yarn_rope(), 300, 37, 3}, {yarn_rope(), 5000, 129, 1}, {plain_rope(6), 4, 1, 1}, {plain_rope(70), 100, 16, 5}};
  for (DType t : {DType::f32, DType::f64}) {
    for (DType it : {DType::i32, DType::i64}) {
      for (const Case& c : cases) {
        CAPTURE(dtype_name(t), dtype_name(it), c.config.dim, c.max_positions, c.tokens, c.heads);
        const ops::RopeTable table = ops::rope_table(c.config, c.max_positions, t);
        const ops::RopeTable table_g = table_on_gpu(table);
        const Shape shape{c.tokens, c.heads, c.config.dim};
        const Tensor x = random_tensor(shape, t, 60, -1, 1);
        Tensor positions = random_ids(c.tokens, c.max_positions, 61, it);
        Tensor out = Tensor::empty(shape, t), dx = Tensor::empty(shape, t);
        ops::rope_forward(x, positions, table, out);
        ops::rope_backward(x, positions, table, dx);

        Tensor out_g = Tensor::empty(shape, t, Device::cuda), dx_g = Tensor::empty(shape, t, Device::cuda);
        ops::rope_forward(on_gpu(x), on_gpu(positions), table_g, out_g);
        ops::rope_backward(on_gpu(x), on_gpu(positions), table_g, dx_g);
        DSX_REQUIRE_CLOSE(out_g, out, tol_for(t));
        DSX_REQUIRE_CLOSE(dx_g, dx, tol_for(t));

        // out aliasing x (and dx aliasing dout) gives the same values.
        Tensor in_place = on_gpu(x);
        ops::rope_forward(in_place, on_gpu(positions), table_g, in_place);
        DSX_REQUIRE_CLOSE(in_place, out, tol_for(t));
        Tensor in_place_back = on_gpu(x);
        ops::rope_backward(in_place_back, on_gpu(positions), table_g, in_place_back);
        DSX_REQUIRE_CLOSE(in_place_back, dx, tol_for(t));
      }
    }
  }
}

TEST_CASE("gpu rope: positions beyond the table throw like the CPU with nothing written", "[gpu][elementwise]") {
  const ops::RopeTable table = ops::rope_table(yarn_rope(), 10, DType::f32);
  const ops::RopeTable table_g = table_on_gpu(table);
  const Tensor x = on_gpu(random_tensor({3, 2, 64}, DType::f32, 70));
  Tensor out = on_gpu(Tensor::full({3, 2, 64}, 7.0, DType::f32));
  for (DType it : {DType::i32, DType::i64}) {
    REQUIRE_THROWS_WITH(ops::rope_forward(x, on_gpu(ids_tensor({0, 10, 3}, it)), table_g, out),
                        Catch::Contains("positions[1] = 10 is outside the table [0, 10)"));
    REQUIRE_THROWS_WITH(ops::rope_backward(x, on_gpu(ids_tensor({0, 9, -1}, it)), table_g, out),
                        Catch::Contains("positions[2] = -1 is outside the table [0, 10)"));
  }
  for (double v : out.to_vector()) REQUIRE(v == 7.0);
  // The CPU's shape, dtype and device checks.
  const Tensor pos = on_gpu(ids_tensor({0, 1, 2}, DType::i64));
  REQUIRE_THROWS_AS(ops::rope_forward(x, on_gpu(ids_tensor({0}, DType::i64)), table_g, out), std::invalid_argument);
  const Tensor wide = on_gpu(random_tensor({3, 2, 66}, DType::f32, 71));
  Tensor wide_out = Tensor::zeros({3, 2, 66}, DType::f32, Device::cuda);
  REQUIRE_THROWS_AS(ops::rope_forward(wide, pos, table_g, wide_out), std::invalid_argument);
  const Tensor x64 = on_gpu(random_tensor({3, 2, 64}, DType::f64, 72));
  Tensor out64 = Tensor::zeros({3, 2, 64}, DType::f64, Device::cuda);
  REQUIRE_THROWS_AS(ops::rope_forward(x64, pos, table_g, out64), std::invalid_argument);
  REQUIRE_THROWS_AS(ops::rope_forward(x, pos, table, out), std::invalid_argument);  // table left on the CPU
  REQUIRE_THROWS_AS(ops::rope_forward(x, ids_tensor({0, 1, 2}, DType::i64), table_g, out), std::invalid_argument);
}
