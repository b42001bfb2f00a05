// Token loader: packing, epoch coverage over DP ranks, DP-independent order, exact resume,
// blending proportions, prefetch, bad configurations.
#include <catch2/catch.hpp>
#include <filesystem>
#include <map>

#include "data/dataset.h"
#include "data/loader.h"
#include "kernels/error.h"
#include "tests/data/dataset_fixtures.h"
#include "tests/support/user_error.h"

using namespace dsx::data;
using namespace dsx::data::testing;
using dsx::test::user_error;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

struct Row {
  std::vector<int32_t> inputs, targets, segments;
  bool operator==(const Row&) const = default;
};

std::vector<Row> rows_of(const StepBatch& b) {
  std::vector<Row> rows;
  for (const auto& mb : b.micro_batches) {
    const int64_t n = mb.inputs.dim(0), L = mb.inputs.dim(1);
    for (int64_t r = 0; r < n; ++r) {
      const auto slice = [&](const dsx::Tensor& t) {
        const int32_t* p = t.data<int32_t>() + r * L;
        return std::vector<int32_t>(p, p + L);
      };
      rows.push_back({slice(mb.inputs), slice(mb.targets), slice(mb.segment_ids)});
    }
  }
  return rows;
}

LoaderConfig base_config(std::vector<DataSource> sources, int64_t seq_len, int64_t global_batch, int64_t micro_batch,
                         int dp_size = 1, int dp_rank = 0) {
  LoaderConfig c;
  c.sources = std::move(sources);
  c.seq_len = seq_len;
  c.global_batch = global_batch;
  c.micro_batch = micro_batch;
  c.dp_size = dp_size;
  c.dp_rank = dp_rank;
  c.seed = 1234;
  return c;
}

// Runs every rank of a DP group for `steps` steps from `state` (if given) and returns the rows
// in global sample order: step by step, rank 0's slice first.
std::vector<Row> global_rows(LoaderConfig config, int dp_size, int steps, const LoaderState* state = nullptr,
                             LoaderState* state_after = nullptr) {
  std::vector<std::vector<std::vector<Row>>> per_rank(dp_size);  // [rank][step] rows
  for (int r = 0; r < dp_size; ++r) {
    config.dp_size = dp_size;
    config.dp_rank = r;
    TokenLoader loader(config);
    if (state) loader.restore(*state);
    for (int s = 0; s < steps; ++s) {
      const StepBatch b = loader.next();
      CHECK(b.first_global_sample == b.step * config.global_batch + r * (config.global_batch / dp_size));
      per_rank[r].push_back(rows_of(b));
    }
    if (state_after) {
      // Every rank reaches the same state: any of them can be checkpointed.
      if (r == 0)
        *state_after = loader.state();
      else
        CHECK(loader.state() == *state_after);
    }
  }
  std::vector<Row> rows;
  for (int s = 0; s < steps; ++s)
    for (int r = 0; r < dp_size; ++r) rows.insert(rows.end(), per_rank[r][s].begin(), per_rank[r][s].end());
  return rows;
}

// A row is a packed window of numbered tokens (token = stream position + offset): window w
// holds positions [w * L, w * L + L]. Returns w after checking the row is exactly that.
int64_t window_of(const Row& row, int64_t L, int32_t offset = 0) {
  const int64_t start = row.inputs[0] - offset;
  REQUIRE(start % L == 0);
  for (int64_t t = 0; t < L; ++t) {
    REQUIRE(row.inputs[t] == offset + start + t);
    REQUIRE(row.targets[t] == offset + start + t + 1);
  }
  return start / L;
}

}  // namespace

TEST_CASE("loader: windows are packed seq_len + 1 token spans with per-document segment ids", "[loader]") {
  TempDir tmp;
  const auto docs = numbered_documents(120, 25, 11);
  write_dataset(tmp / "a", docs, test_identity(), 400, 32);
  std::vector<int64_t> doc_of;
  for (size_t d = 0; d < docs.size(); ++d) doc_of.insert(doc_of.end(), docs[d].size(), static_cast<int64_t>(d));

  constexpr int64_t L = 16;
  TokenLoader loader(base_config({{tmp / "a", 1.0}}, L, 4, 2));
  CHECK(loader.windows_per_epoch(0) == (total_tokens(docs) - 1) / L);
  CHECK(loader.micro_batches_per_step() == 2);
  for (int step = 0; step < 5; ++step) {
    const StepBatch b = loader.next();
    CHECK(b.step == step);
    REQUIRE(b.micro_batches.size() == 2);
    for (const auto& mb : b.micro_batches) {
      CHECK(mb.inputs.shape() == dsx::Shape{2, L});
      CHECK(mb.targets.dtype() == dsx::DType::i32);
      CHECK(mb.segment_ids.shape() == dsx::Shape{2, L});
    }
    for (const Row& row : rows_of(b)) {
      const int64_t start = window_of(row, L) * L;
      for (int64_t t = 0; t < L; ++t) CHECK(row.segments[t] == doc_of[start + t] - doc_of[start]);
    }
  }
}

TEST_CASE("loader: an epoch gives every window once, in the same order for DP 1, 2 and 4", "[loader]") {
  TempDir tmp;
  const auto docs = numbered_documents(150, 30, 21);
  write_dataset(tmp / "a", docs, test_identity(), 500, 64);
  constexpr int64_t L = 8;
  const LoaderConfig config = base_config({{tmp / "a", 1.0}}, L, 8, 1);
  const int64_t windows = (total_tokens(docs) - 1) / L;
  const int steps = static_cast<int>((2 * windows + 7) / 8);  // two epochs

  std::vector<Row> reference;
  for (int dp : {1, 2, 4}) {
    CAPTURE(dp);
    LoaderConfig c = config;
    c.micro_batch = dp == 4 ? 2 : 1;  // micro-batching does not change the order either
    const std::vector<Row> rows = global_rows(c, dp, steps);
    if (dp == 1)
      reference = rows;
    else
      CHECK(rows == reference);
  }

  // Epoch 1 and epoch 2 each cover every window exactly once, in different orders; every
  // token of the covered range is a target exactly once per epoch.
  std::vector<int64_t> order[2];
  for (int e = 0; e < 2; ++e) {
    std::vector<int> count(static_cast<size_t>(windows), 0);
    std::vector<int> target_count(static_cast<size_t>(windows * L + 1), 0);
    for (int64_t i = e * windows; i < (e + 1) * windows; ++i) {
      const int64_t w = window_of(reference[static_cast<size_t>(i)], L);
      order[e].push_back(w);
      count[static_cast<size_t>(w)] += 1;
      for (int32_t t : reference[static_cast<size_t>(i)].targets) target_count[static_cast<size_t>(t)] += 1;
    }
    CHECK(std::all_of(count.begin(), count.end(), [](int c) { return c == 1; }));
    CHECK(target_count[0] == 0);
    CHECK(std::all_of(target_count.begin() + 1, target_count.end(), [](int c) { return c == 1; }));
  }
  CHECK(order[0] != order[1]);
  std::vector<int64_t> sorted = order[0];
  std::sort(sorted.begin(), sorted.end());
  CHECK(order[0] != sorted);  // shuffled, not in stream order
}

TEST_CASE("loader: the seed decides the order", "[loader]") {
  TempDir tmp;
  write_dataset(tmp / "a", numbered_documents(100, 30, 4), test_identity(), 1000, 64);
  LoaderConfig c = base_config({{tmp / "a", 1.0}}, 8, 4, 4);
  const auto same_a = global_rows(c, 1, 6);
  const auto same_b = global_rows(c, 1, 6);
  CHECK(same_a == same_b);
  c.seed = 99;
  CHECK(global_rows(c, 1, 6) != same_a);
}

TEST_CASE("loader: restoring a state continues exactly, also on another DP size", "[loader]") {
  TempDir tmp;
  write_dataset(tmp / "a", numbered_documents(80, 30, 31), test_identity(), 300, 32);
  write_dataset(tmp / "b", numbered_documents(60, 30, 32, 500000), test_identity(), 300, 32);
  LoaderConfig config = base_config({{tmp / "a", 2.0}, {tmp / "b", 1.0}}, 8, 8, 2);
  constexpr int k = 7, more = 25;  // 32 steps * 8 = 256 samples: several epochs of source b

  for (int prefetch : {0, 2}) {
    CAPTURE(prefetch);
    config.prefetch_steps = prefetch;
    // The uninterrupted run on DP 2.
    LoaderState state_k;
    global_rows(config, 2, k, nullptr, &state_k);
    const std::vector<Row> continuous = global_rows(config, 2, k + more);
    const std::vector<Row> tail(continuous.begin() + k * 8, continuous.end());

    // The state survives JSON, as a checkpoint stores it.
    const LoaderState loaded = LoaderState::from_json(state_k.to_json(), "test");
    CHECK(loaded == state_k);
    CHECK(loaded.consumed_samples == k * 8);
    CHECK(loaded.steps == k);

    CHECK(global_rows(config, 2, more, &loaded) == tail);  // DP 2 -> 2
    CHECK(global_rows(config, 4, more, &loaded) == tail);  // DP 2 -> 4
    CHECK(global_rows(config, 1, more, &loaded) == tail);  // DP 2 -> 1
  }

  SECTION("restore in the middle of a running prefetching loader") {
    config.prefetch_steps = 3;
    TokenLoader loader(config);
    for (int i = 0; i < 4; ++i) loader.next();
    const LoaderState at4 = loader.state();
    const auto expected = rows_of(loader.next());
    for (int i = 0; i < 3; ++i) loader.next();
    loader.restore(at4);
    CHECK(rows_of(loader.next()) == expected);
  }
}

TEST_CASE("loader: blending follows the weights within the stated bound", "[loader]") {
  TempDir tmp;
  // Token values tell the source: a < 100000 <= b < 200000 <= c.
  write_dataset(tmp / "a", numbered_documents(50, 30, 41), test_identity(), 1000, 64);
  write_dataset(tmp / "b", numbered_documents(50, 30, 42, 100000), test_identity(), 1000, 64);
  write_dataset(tmp / "c", numbered_documents(50, 30, 43, 200000), test_identity(), 1000, 64);
  const auto source_of = [](const Row& r) { return r.inputs[0] / 100000; };

  SECTION("two sources: every prefix within one sample of w * n") {
    // Proven bound (loader.h): no source is ever a whole sample ahead; with two sources the
    // other one is then less than a sample behind.
    const auto rows = global_rows(base_config({{tmp / "a", 0.7}, {tmp / "b", 0.3}}, 8, 10, 5), 2, 60);
    int64_t a = 0;
    for (size_t n = 1; n <= rows.size(); ++n) {
      a += source_of(rows[n - 1]) == 0;
      REQUIRE(std::abs(static_cast<double>(a) - 0.7 * static_cast<double>(n)) < 1.0);
    }
    CHECK(a == 420);
  }
  SECTION("three sources with weights 1:2:5") {
    // Bound for k = 3 sources: ahead by less than 1, behind by less than k - 1 = 2.
    LoaderConfig c = base_config({{tmp / "a", 1}, {tmp / "b", 2}, {tmp / "c", 5}}, 8, 16, 4);
    LoaderState state;
    const auto rows = global_rows(c, 4, 50, nullptr, &state);
    const double w[3] = {1.0 / 8, 2.0 / 8, 5.0 / 8};
    int64_t counts[3] = {0, 0, 0};
    for (size_t n = 1; n <= rows.size(); ++n) {
      counts[source_of(rows[n - 1])] += 1;
      for (int s = 0; s < 3; ++s) {
        const double err = static_cast<double>(counts[s]) - w[s] * static_cast<double>(n);
        REQUIRE(err < 1.0);
        REQUIRE(err > -2.0);
      }
    }
    for (int s = 0; s < 3; ++s) CHECK(state.sources[s].taken == counts[s]);
    CHECK(counts[0] == 100);
    CHECK(counts[1] == 200);
    CHECK(counts[2] == 500);
  }
}

TEST_CASE("loader: each source cycles through its own epochs without repeats inside one", "[loader]") {
  TempDir tmp;
  write_dataset(tmp / "a", numbered_documents(20, 20, 51), test_identity(), 1000, 64);           // small
  write_dataset(tmp / "b", numbered_documents(200, 20, 52, 100000), test_identity(), 1000, 64);  // large
  constexpr int64_t L = 4;
  LoaderConfig c = base_config({{tmp / "a", 1}, {tmp / "b", 1}}, L, 8, 8);
  TokenLoader probe(c);
  const int64_t wa = probe.windows_per_epoch(0);
  const auto rows = global_rows(c, 1, static_cast<int>(wa));  // 4 * wa samples of a: 4 epochs
  std::vector<int64_t> from_a;
  for (const Row& r : rows)
    if (r.inputs[0] < 100000) from_a.push_back(window_of(r, L));
  REQUIRE(static_cast<int64_t>(from_a.size()) >= 3 * wa);
  for (int e = 0; e < 3; ++e) {
    std::vector<int64_t> epoch(from_a.begin() + e * wa, from_a.begin() + (e + 1) * wa);
    std::sort(epoch.begin(), epoch.end());
    for (int64_t i = 0; i < wa; ++i) REQUIRE(epoch[static_cast<size_t>(i)] == i);
  }
}

TEST_CASE("loader: bad configurations and mismatched datasets give clear errors", "[loader]") {
  TempDir tmp;
  write_dataset(tmp / "a", numbered_documents(30, 20, 61), test_identity(5000, "hash-a"), 1000, 64);
  write_dataset(tmp / "b", numbered_documents(30, 20, 62), test_identity(5000, "hash-b"), 1000, 64);
  const auto ok = base_config({{tmp / "a", 1.0}}, 8, 4, 2);

  SECTION("dataset vocabulary larger than the model's") {
    auto c = ok;
    c.expected_vocab_size = 4096;
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains(tmp / "a") && Contains("5000") && Contains("4096"));
    c.expected_vocab_size = 5000;
    CHECK_NOTHROW(TokenLoader(c));
  }
  SECTION("tokenizer hash mismatch") {
    auto c = ok;
    c.expected_tokenizer_hash = "hash-z";
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains(tmp / "a") && Contains("hash-a") && Contains("hash-z"));
  }
  SECTION("blended datasets of different tokenizers") {
    auto c = ok;
    c.sources.push_back({tmp / "b", 1.0});
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains("hash-b") && Contains("one tokenizer"));
  }
  SECTION("missing dataset") {
    auto c = ok;
    c.sources[0].path = tmp / "nope";
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains("nope"));
  }
  SECTION("dataset shorter than one window") {
    auto c = ok;
    c.seq_len = 100000;
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains("too few") && Contains(tmp / "a"));
  }
  SECTION("batch shapes") {
    auto c = ok;
    c.dp_size = 3;
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains("multiple of the DP size"));
    c = ok;
    c.micro_batch = 3;
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains("micro batch 3"));
    c = ok;
    c.sources[0].weight = 0;
    CHECK_THAT(user_error([&] { TokenLoader l(c); }), Contains("data.sources[0].weight"));
  }
  SECTION("state of another run") {
    TokenLoader loader(ok);
    loader.next();
    LoaderState s = loader.state();
    s.seed += 1;
    CHECK_THAT(user_error([&] { loader.restore(s); }), Contains("does not match") && Contains("seed"));
    s = loader.state();
    s.sources[0].windows += 1;
    CHECK_THAT(user_error([&] { loader.restore(s); }), Contains("windows"));
    std::string json = loader.state().to_json();
    json.replace(json.find("\"version\":1"), 11, "\"version\":7");
    CHECK_THAT(user_error([&] { LoaderState::from_json(json, "ckpt.h5"); }), Contains("ckpt.h5") && Contains("newer"));
    CHECK_THAT(user_error([&] { LoaderState::from_json("{\"version\":1}", "ckpt.h5"); }), Contains("'seed'"));
  }
}

TEST_CASE("loader: a read error in the prefetch thread reaches the caller", "[loader]") {
  TempDir tmp;
  write_dataset(tmp / "a", numbered_documents(100, 30, 71), test_identity(), 200, 32);
  auto c = base_config({{tmp / "a", 1.0}}, 8, 4, 4);
  c.prefetch_steps = 2;
  TokenLoader loader(c);  // opens and checks every shard ...
  for (const auto& entry : fs::directory_iterator(tmp / "a")) {
    if (entry.path().extension() == ".h5") write_file(entry.path().string(), "gone");  // ... then they break
  }
  CHECK_THAT(user_error([&] {
               for (int i = 0; i < 100; ++i) loader.next();
             }),
             Contains("shard-") && Contains("not an HDF5 file"));
}
