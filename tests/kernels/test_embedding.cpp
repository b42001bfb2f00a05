// Embedding lookup and its (accumulating) table gradient.
#include <catch2/catch.hpp>

#include <cstdint>
#include <vector>

#include "kernels/ops/embedding.h"
#include "kernels/threading.h"
#include "support/gradcheck.h"

using namespace dsx;
using dsx::test::finite_difference;
using dsx::test::max_rel_error;
using dsx::test::random_tensor;

namespace {

// Gradients against central differences in f64 (see support/gradcheck.h for the error budget).
constexpr double kGradTolerance = 1e-6;

// dtable[ids[n], :] += dout[n, :] in plain float64.
Tensor reference_backward(const std::vector<int64_t>& ids, const Tensor& dout, int64_t vocab) {
  const int64_t d = dout.dim(1);
  const auto g = dout.to_vector();
  std::vector<double> acc(static_cast<size_t>(vocab * d), 0.0);
  for (size_t n = 0; n < ids.size(); ++n) {
    for (int64_t j = 0; j < d; ++j) acc[ids[n] * d + j] += g[n * d + j];
  }
  return Tensor::from<double>(acc, {vocab, d});
}

}  // namespace

TEST_CASE("embedding: forward copies the rows of the ids, for i32 and i64 ids", "[embedding]") {
  const Tensor table = random_tensor({10, 6}, DType::f32, 1);
  const std::vector<int64_t> ids = {3, 0, 9, 3, 7};
  const Tensor ids64 = Tensor::from<int64_t>(ids, {5});
  const Tensor ids32 = ids64.to(DType::i32);
  const auto t = table.to_vector();
  for (const Tensor* id_tensor : {&ids64, &ids32}) {
    Tensor out = Tensor::zeros({5, 6}, DType::f32);
    ops::embedding_forward(*id_tensor, table, out);
    const auto o = out.to_vector();
    // A lookup is a copy: exact equality is the only right answer.
    for (size_t n = 0; n < ids.size(); ++n) {
      for (int64_t j = 0; j < 6; ++j) REQUIRE(o[n * 6 + j] == t[ids[n] * 6 + j]);
    }
  }
}

TEST_CASE("embedding: table gradient matches central finite differences in f64, repeated ids included", "[embedding]") {
  Tensor table = random_tensor({7, 5}, DType::f64, 10);
  const Tensor ids = Tensor::from<int32_t>({2, 6, 2, 0, 2, 6}, {6});
  const Tensor probe = random_tensor({6, 5}, DType::f64, 11);
  Tensor out = Tensor::zeros({6, 5}, DType::f64);
  const auto loss = [&] {
    ops::embedding_forward(ids, table, out);
    return test::dot(out, probe);
  };
  Tensor dtable = Tensor::zeros({7, 5}, DType::f64);
  ops::embedding_backward_weight(ids, probe, dtable);
  REQUIRE(max_rel_error(dtable, finite_difference(table, loss)) < kGradTolerance);
}

TEST_CASE("embedding: f32 table gradient matches a float64 reference and does not depend on the thread count",
          "[embedding]") {
  // N·D > 2^15 so the column-parallel path runs; ids drawn from a small vocabulary collide often.
  const int64_t n = 300, d = 200, vocab = 17;
  std::vector<int64_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[i] = (i * 7 + i / 5) % vocab;
  const Tensor id_tensor = Tensor::from<int64_t>(ids, {n});
  const Tensor dout = random_tensor({n, d}, DType::f32, 20);
  const int threads = cpu_threads();
  set_cpu_threads(1);
  Tensor serial = Tensor::zeros({vocab, d}, DType::f32);
  ops::embedding_backward_weight(id_tensor, dout, serial);
  set_cpu_threads(2);
  Tensor parallel = Tensor::zeros({vocab, d}, DType::f32);
  ops::embedding_backward_weight(id_tensor, dout, parallel);
  set_cpu_threads(threads);
  REQUIRE(test::max_abs_diff(serial, parallel) == 0.0);
  // Each element sums ~18 f32 values in order: error ≲ 18·2^-24 relative to the scale; 1e-5 bounds it.
  REQUIRE(max_rel_error(parallel, reference_backward(ids, dout, vocab)) < 1e-5);
}

TEST_CASE("embedding: the table gradient accumulates", "[embedding]") {
  const Tensor ids = Tensor::from<int64_t>({1, 4, 1}, {3});
  const Tensor dout = random_tensor({3, 4}, DType::f64, 30);
  Tensor once = Tensor::zeros({5, 4}, DType::f64), twice = Tensor::zeros({5, 4}, DType::f64);
  ops::embedding_backward_weight(ids, dout, once);
  ops::embedding_backward_weight(ids, dout, twice);
  ops::embedding_backward_weight(ids, dout, twice);
  Tensor doubled = once.clone();
  for (int64_t i = 0; i < doubled.numel(); ++i) doubled.data<double>()[i] *= 2;
  // Row 1 sums two tokens per call, so the second call's additions round differently from
  // doubling: equal to within a few f64 ulps, while a missing accumulation is off by 50%.
  REQUIRE(max_rel_error(twice, doubled) < 1e-14);
  // Rows no id touches stay zero.
  const auto b = twice.to_vector();
  for (int64_t j = 0; j < 4; ++j) REQUIRE(b[0 * 4 + j] == 0.0);
}

TEST_CASE("embedding: out-of-range ids throw and leave the output untouched", "[embedding]") {
  const Tensor table = random_tensor({5, 3}, DType::f32, 40);
  Tensor out = Tensor::full({2, 3}, 9.0, DType::f32);
  Tensor dtable = Tensor::zeros({5, 3}, DType::f32);
  const Tensor dout = random_tensor({2, 3}, DType::f32, 41);
  for (int64_t bad : {int64_t{5}, int64_t{-1}, int64_t{1} << 40}) {
    CAPTURE(bad);
    const Tensor ids = Tensor::from<int64_t>({0, bad}, {2});
    REQUIRE_THROWS_AS(ops::embedding_forward(ids, table, out), std::invalid_argument);
    REQUIRE_THROWS_AS(ops::embedding_backward_weight(ids, dout, dtable), std::invalid_argument);
  }
  const Tensor ids32 = Tensor::from<int32_t>({4, 5}, {2});
  REQUIRE_THROWS_WITH(ops::embedding_forward(ids32, table, out), Catch::Contains("id 5 at position 1"));
  for (double v : out.to_vector()) REQUIRE(v == 9.0);
  for (double v : dtable.to_vector()) REQUIRE(v == 0.0);
}

TEST_CASE("embedding: mismatched shapes and dtypes throw", "[embedding]") {
  const Tensor table = random_tensor({5, 3}, DType::f32, 50);
  const Tensor ids = Tensor::from<int32_t>({0, 1}, {2});
  Tensor out = Tensor::zeros({2, 3}, DType::f32);
  REQUIRE_NOTHROW(ops::embedding_forward(ids, table, out));
  Tensor out_wrong = Tensor::zeros({2, 4}, DType::f32);
  REQUIRE_THROWS_AS(ops::embedding_forward(ids, table, out_wrong), std::invalid_argument);
  Tensor out64 = Tensor::zeros({2, 3}, DType::f64);
  REQUIRE_THROWS_AS(ops::embedding_forward(ids, table, out64), std::invalid_argument);
  const Tensor float_ids = Tensor::from<float>({0, 1}, {2});
  REQUIRE_THROWS_AS(ops::embedding_forward(float_ids, table, out), std::invalid_argument);
  const Tensor ids2d = ids.view({1, 2});
  REQUIRE_THROWS_AS(ops::embedding_forward(ids2d, table, out), std::invalid_argument);
  const Tensor dout_wrong = random_tensor({3, 3}, DType::f32, 51);
  Tensor dtable = Tensor::zeros({5, 3}, DType::f32);
  REQUIRE_THROWS_AS(ops::embedding_backward_weight(ids, dout_wrong, dtable), std::invalid_argument);
}
