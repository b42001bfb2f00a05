// The bookkeeping under tensor parallelism, in one process: a parameter's TP shards hold exactly
// their boxes of the tensor one process would initialise, the rows each TP rank routes partition
// the tokens, and a ZeRO range of a shard's flattened moments becomes boxes of the global tensor
// covering exactly those elements. (Training under mpirun with TP is compared with one process in
// tests/trainer/parallel_train.cmake.)
#include <catch2/catch.hpp>

#include <set>
#include <string>
#include <vector>

#include "trainer/model/expert_parallel.h"
#include "trainer/model/parameters.h"
#include "trainer/optim/optimizer.h"

using namespace dsx;

namespace {

ParamSpec matrix_spec(int dim) {
  ParamSpec spec;
  spec.name = "model.layers.0.self_attn.o_proj.weight";
  spec.shape = {8, 12};
  spec.shard = ShardSpec::tensor_parallel(dim);
  spec.init_std = 0.02;
  return spec;
}

}  // namespace

TEST_CASE("tensor parallel: shards initialise to their boxes of the whole tensor", "[tensor_parallel]") {
  ParameterStore whole_store(DType::f32);
  const Parameter& whole = whole_store.add(matrix_spec(0));
  whole_store.initialize(7);
  const std::vector<double> expected = whole.value.to_vector();
  for (int dim : {0, 1}) {
    for (int parts : {2, 4}) {
      INFO("split along dim " << dim << " into " << parts);
      std::vector<double> assembled(expected.size(), -1.0);
      for (int rank = 0; rank < parts; ++rank) {
        ParameterStore store(DType::f32);
        const Parameter& p = store.add(matrix_spec(dim), TensorShard{parts, rank});
        store.initialize(7);
        REQUIRE(p.value.dim(dim) == matrix_spec(dim).shape[static_cast<size_t>(dim)] / parts);
        REQUIRE(p.grad.shape() == p.value.shape());
        REQUIRE(p.offset[static_cast<size_t>(dim)] == p.value.dim(dim) * rank);
        const std::vector<double> local = p.value.to_vector();
        for (int64_t i = 0; i < p.value.numel(); ++i) {
          assembled[static_cast<size_t>(global_element_index(p.spec.shape, p.offset, p.value.shape(), i))] =
              local[static_cast<size_t>(i)];
        }
      }
      REQUIRE(assembled == expected);  // bit-exact: the same Philox draws at the same global indices
    }
  }
  // Replicated and expert parameters stay whole whatever the shard; an uneven split is refused.
  ParamSpec norm;
  norm.name = "model.norm.weight";
  norm.shape = {8};
  norm.init = InitKind::ones;
  ParameterStore store(DType::f32);
  REQUIRE(store.add(norm, TensorShard{2, 1}).value.shape() == Shape{8});
  REQUIRE_THROWS_AS(store.add(matrix_spec(0), TensorShard{3, 0}), std::invalid_argument);  // 8 rows over 3
}

TEST_CASE("tensor parallel: the rows each rank routes partition the tokens", "[tensor_parallel]") {
  for (int64_t n : {0, 1, 5, 8, 13}) {
    for (int size : {1, 2, 3, 4}) {
      int64_t next = 0;
      for (int rank = 0; rank < size; ++rank) {
        const RowRange r = tp_rows(n, size, rank);
        REQUIRE(r.begin == next);
        REQUIRE(r.end - r.begin >= n / size);
        REQUIRE(r.end - r.begin <= n / size + 1);
        next = r.end;
      }
      REQUIRE(next == n);
    }
  }
}

TEST_CASE("tensor parallel: moment ranges of a shard become boxes of the global tensor", "[tensor_parallel]") {
  for (int dim : {0, 1}) {
    ParameterStore store(DType::f32);
    const Parameter& p = store.add(matrix_spec(dim), TensorShard{2, 1});  // [4, 12] at row 4, or [8, 6] at column 6
    const int64_t n = p.value.numel();
    // every range [first, first + length) of the flattened shard
    for (int64_t first = 0; first < n; ++first) {
      for (int64_t length = 1; first + length <= n; ++length) {
        INFO("dim " << dim << " range [" << first << ", " << first + length << ")");
        std::vector<float> values(static_cast<size_t>(length));
        for (int64_t k = 0; k < length; ++k) values[static_cast<size_t>(k)] = static_cast<float>(first + k);
        const Tensor flat = Tensor::from<float>(values, {length});
        const std::vector<ckpt::TensorSlice> boxes = moment_boxes("optim.exp_avg.w", p, first, flat);
        REQUIRE(boxes.size() <= 3);
        std::set<int64_t> covered;
        for (const ckpt::TensorSlice& box : boxes) {
          REQUIRE(box.global_shape == p.spec.shape);
          const std::vector<double> v = box.data.to_vector();
          for (int64_t i = 0; i < box.data.numel(); ++i) {
            const int64_t global = global_element_index(p.spec.shape, box.offset, box.data.shape(), i);
            const auto local = static_cast<int64_t>(v[static_cast<size_t>(i)]);  // the local index it came from
            REQUIRE(global == global_element_index(p.spec.shape, p.offset, p.value.shape(), local));
            REQUIRE(covered.insert(local).second);
          }
        }
        REQUIRE(static_cast<int64_t>(covered.size()) == length);
      }
    }
  }
}
