// The checkpoint store: round trips, resharding between slice layouts, several writers, keep_last,
// finding the newest complete checkpoint, and clear errors for damaged or mismatched checkpoints.
// Every comparison of tensor data is bit-exact: a checkpoint stores bytes, nothing is recomputed.
#include <unistd.h>
#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "support/gradcheck.h"
#include "tests/support/temp_dir.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/checkpoint/inspect.h"

using namespace dsx;
using namespace dsx::ckpt;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;
using nlohmann::json;

namespace {

using TempDir = dsx::test::TempDir;

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

// Integers over the whole int64 range, so a lossy path (e.g. through double) would show.
Tensor random_i64(const Shape& shape, uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::vector<int64_t> v(static_cast<size_t>(shape_numel(shape)));
  for (int64_t& x : v) x = static_cast<int64_t>(gen());
  return Tensor::from<int64_t>(v, shape);
}

Tensor random_of(DType dtype, const Shape& shape, uint64_t seed) {
  if (dtype == DType::i64) return random_i64(shape, seed);
  return test::random_tensor(shape, dtype, seed, -3.0, 3.0);
}

// Copies the box [offset, offset + extent) of a whole row-major tensor into a new tensor.
Tensor extract_box(const Tensor& whole, const Shape& offset, const Shape& extent) {
  Tensor out = Tensor::empty(extent, whole.dtype());
  const size_t esize = dtype_size(whole.dtype());
  const size_t nd = extent.size();
  Shape index(nd, 0);
  for (int64_t k = 0; k < out.numel(); ++k) {
    int64_t src = 0;
    for (size_t d = 0; d < nd; ++d) src = src * whole.shape()[d] + offset[d] + index[d];
    std::memcpy(static_cast<char*>(out.raw()) + k * esize, static_cast<const char*>(whole.raw()) + src * esize, esize);
    for (size_t d = nd; d-- > 0;) {
      if (++index[d] < extent[d]) break;
      index[d] = 0;
    }
  }
  return out;
}

// Part `part` of `parts` near-equal parts of [0, size): the first size % parts parts are one longer.
std::pair<int64_t, int64_t> split_range(int64_t size, int parts, int part) {
  const int64_t base = size / parts, extra = size % parts;
  const int64_t begin = part * base + std::min<int64_t>(part, extra);
  return {begin, base + (part < extra ? 1 : 0)};
}

struct Named {
  std::string name;
  Tensor whole;
};

// Writer `part`'s slices when every tensor is split into `parts` along dim.
std::vector<TensorSlice> slices_of(const std::vector<Named>& tensors, int dim, int parts, int part) {
  std::vector<TensorSlice> out;
  for (const Named& t : tensors) {
    Shape offset(t.whole.shape().size(), 0);
    Shape extent = t.whole.shape();
    std::tie(offset[dim], extent[dim]) = split_range(extent[dim], parts, part);
    out.push_back({t.name, t.whole.shape(), offset, extract_box(t.whole, offset, extent)});
  }
  return out;
}

// Saves with one writer per part, called one after another in this process: writers 1..n-1 first,
// writer 0 last, so each barrier can be a no-op (everything before it has already happened).
fs::path save_split(const fs::path& root, int64_t step, const std::vector<Named>& tensors, int dim, int parts,
                    int keep_last = 0) {
  fs::path final_dir;
  for (int w = parts - 1; w >= 0; --w) {
    SaveOptions o{.writer_index = w, .n_writers = parts, .barrier = [] {}, .keep_last = keep_last, .attempt_id = "seq"};
    final_dir =
        save(root, CheckpointState{step, json{{"step", step}}, "model: {}\n"}, slices_of(tensors, dim, parts, w), o);
  }
  return final_dir;
}

std::vector<Named> sample_tensors(uint64_t seed) {
  return {
      {"model.embed_tokens.weight", random_of(DType::f32, {10, 12}, seed)},
      {"model.layers.1.mlp.experts.5.up_proj.weight", random_of(DType::bf16, {9, 7}, seed + 1)},
      {"optim.exp_avg.model.layers.1.self_attn.kv_a_proj_with_mqa.weight", random_of(DType::i64, {8, 6, 3}, seed + 2)}};
}

std::vector<fs::path> dir_names(const fs::path& dir) {
  std::vector<fs::path> names;
  for (const auto& e : fs::directory_iterator(dir)) names.push_back(e.path().filename());
  std::sort(names.begin(), names.end());
  return names;
}

void flip_byte(const fs::path& file, std::streamoff position) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(position);
  char c = 0;
  f.read(&c, 1);
  c = static_cast<char>(c ^ 0x5a);
  f.seekp(position);
  f.write(&c, 1);
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const UserError& e) {
    return e.what();
  }
  FAIL("expected a dsx::UserError");
  return "";
}

}  // namespace

TEST_CASE("checkpoint: tensors of every dtype and the metadata round-trip exactly", "[checkpoint]") {
  TempDir tmp;
  std::vector<TensorSlice> slices = {
      {"model.embed_tokens.weight", {7, 5}, {}, random_of(DType::f32, {7, 5}, 1)},
      {"model.layers.0.mlp.experts.3.up_proj.weight", {4, 6}, {}, random_of(DType::bf16, {4, 6}, 2)},
      {"optim.step.model.norm.weight", {3}, {}, random_i64({3}, 3)},
      {"model.layers.0.mlp.gate.e_score_correction_bias", {}, {}, Tensor::full({}, 0.1, DType::f64)},
      {"model.layers.0.mlp.experts.0.down_proj.weight_scale", {2, 2}, {}, random_of(DType::fp8_e4m3, {2, 2}, 4)},
      {"grad.fp8_e5m2", {5}, {}, random_of(DType::fp8_e5m2, {5}, 5)},
      {"optim.counts", {2, 3}, {}, Tensor::from<int32_t>({1, -2, 3, 2147483647, -2147483647 - 1, 0}, {2, 3})},
      {"empty.weight", {0, 4}, {}, Tensor::empty({0, 4}, DType::f32)},
  };
  CheckpointState state;
  state.step = 10;
  state.metadata = {{"lr_schedule", {{"step", 10}, {"lr", 3e-4 * 0.1}}},
                    {"data_loader", {{"epoch", 1}, {"position", int64_t{12345678901234}}}},
                    {"rng", {{"philox", {UINT64_MAX, 0, 42}}}},
                    {"note", "ünïcode \"quoted\"\nnew line"}};
  state.recipe_yaml = "model:\n  hidden_size: 64\n  name: \"tiny: quoted\"\ntrain:\n  lr: 3.0e-4\n";

  const fs::path dir = save(tmp.path(), state, slices);
  REQUIRE(dir == tmp.path() / "step-000010");
  // Only the final directory remains, holding the data file and the manifest.
  REQUIRE(dir_names(tmp.path()) == std::vector<fs::path>{"step-000010"});
  REQUIRE(dir_names(dir) == std::vector<fs::path>{"manifest.json", "rank-00000.h5"});

  CheckpointReader reader(dir);
  REQUIRE(reader.step() == 10);
  REQUIRE(reader.metadata() == state.metadata);
  REQUIRE(reader.metadata()["lr_schedule"]["lr"].get<double>() == 3e-4 * 0.1);  // doubles survive exactly
  REQUIRE(reader.metadata()["rng"]["philox"][0].get<uint64_t>() == UINT64_MAX);
  REQUIRE(reader.recipe_yaml() == state.recipe_yaml);
  REQUIRE(reader.manifest().tensors.size() == slices.size());
  for (const TensorSlice& s : slices) {
    INFO(s.name);
    const TensorInfo* info = reader.find(s.name);
    REQUIRE(info != nullptr);
    REQUIRE(info->shape == s.global_shape);
    REQUIRE(info->dtype == s.data.dtype());
    REQUIRE(same_bytes(reader.read_whole(s.name), s.data));
  }
  REQUIRE(reader.find("model.missing") == nullptr);

  // The one-call form fills caller tensors and returns the state.
  Tensor embed = Tensor::zeros({7, 5}, DType::f32);
  std::vector<LoadRequest> requests = {{"model.embed_tokens.weight", {7, 5}, {}, embed}};
  const CheckpointState loaded = load(dir, requests);
  REQUIRE(loaded.step == 10);
  REQUIRE(loaded.metadata == state.metadata);
  REQUIRE(loaded.recipe_yaml == state.recipe_yaml);
  REQUIRE(same_bytes(embed, slices[0].data));
}

TEST_CASE("checkpoint: slices saved along one dimension load into any other slicing", "[checkpoint]") {
  const auto [dim, parts] = GENERATE(table<int, int>({{0, 2}, {0, 4}, {1, 2}, {1, 4}}));
  INFO("saved as " << parts << " slices along dim " << dim);
  TempDir tmp;
  const std::vector<Named> tensors = sample_tensors(100);
  const fs::path dir = save_split(tmp.path(), 3, tensors, dim, parts);
  REQUIRE(dir_names(dir).size() == static_cast<size_t>(parts) + 1);  // one file per writer + manifest

  CheckpointReader reader(dir);
  for (const Named& t : tensors) {
    INFO(t.name);
    const TensorInfo* info = reader.find(t.name);
    REQUIRE(info != nullptr);
    REQUIRE(info->slices.size() == static_cast<size_t>(parts));
    REQUIRE(same_bytes(reader.read_whole(t.name), t.whole));
    // Every other slice count along both dimensions, including counts that cut across the saved
    // slice boundaries (3 of 10 rows against 4 saved slices).
    for (int load_dim : {0, 1}) {
      for (int load_parts : {1, 2, 3, 4}) {
        for (int p = 0; p < load_parts; ++p) {
          Shape offset(t.whole.shape().size(), 0);
          Shape extent = t.whole.shape();
          std::tie(offset[load_dim], extent[load_dim]) = split_range(extent[load_dim], load_parts, p);
          Tensor dest = Tensor::zeros(extent, t.whole.dtype());
          reader.read(LoadRequest{t.name, t.whole.shape(), offset, dest});
          REQUIRE(same_bytes(dest, extract_box(t.whole, offset, extent)));
        }
      }
    }
    // A 2x2 grid of blocks crossing both dimensions at once.
    const Shape& shape = t.whole.shape();
    for (int r = 0; r < 2; ++r) {
      for (int c = 0; c < 2; ++c) {
        Shape offset(shape.size(), 0), extent = shape;
        std::tie(offset[0], extent[0]) = split_range(shape[0], 2, r);
        std::tie(offset[1], extent[1]) = split_range(shape[1], 2, c);
        Tensor dest = Tensor::zeros(extent, t.whole.dtype());
        reader.read(LoadRequest{t.name, shape, offset, dest});
        REQUIRE(same_bytes(dest, extract_box(t.whole, offset, extent)));
      }
    }
  }
}

TEST_CASE("checkpoint: expert-parallel writers each hold whole experts, loadable by any layout", "[checkpoint]") {
  // EP2 layout: writer 0 holds experts 0-1 and the replicated dense weights, writer 1 experts 2-3.
  TempDir tmp;
  std::vector<Named> experts;
  for (int e = 0; e < 4; ++e) {
    experts.push_back({"model.layers.1.mlp.experts." + std::to_string(e) + ".gate_proj.weight",
                       random_of(DType::f32, {6, 4}, 200 + e)});
  }
  const Named dense{"model.norm.weight", random_of(DType::f32, {4}, 300)};
  for (int w = 1; w >= 0; --w) {
    std::vector<TensorSlice> slices;
    if (w == 0) slices.push_back({dense.name, {4}, {}, dense.whole});
    for (int e = 2 * w; e < 2 * w + 2; ++e) slices.push_back({experts[e].name, {6, 4}, {}, experts[e].whole});
    save(tmp.path(), CheckpointState{5, json::object(), ""}, slices,
         {.writer_index = w, .n_writers = 2, .barrier = [] {}, .attempt_id = "ep"});
  }
  CheckpointReader reader(tmp.path() / "step-000005");
  REQUIRE(reader.manifest().files.size() == 2);
  REQUIRE(reader.find(dense.name)->slices.at(0).file == 0);
  REQUIRE(reader.find(experts[3].name)->slices.at(0).file == 1);
  // An EP4 rank 2 needs expert 2 alone; a single rank needs all of them.
  REQUIRE(same_bytes(reader.read_whole(experts[2].name), experts[2].whole));
  for (const Named& t : experts) REQUIRE(same_bytes(reader.read_whole(t.name), t.whole));
  REQUIRE(same_bytes(reader.read_whole(dense.name), dense.whole));
}

TEST_CASE("checkpoint: a writer may hold several boxes of one tensor", "[checkpoint]") {
  // What a ZeRO range inside a tensor-parallel shard is: the end of one row, whole rows, the start
  // of a row (writer 0), and the rest (writer 1: two boxes again).
  TempDir tmp;
  const Tensor whole = random_of(DType::f32, {5, 6}, 400);
  const auto box = [&](const Shape& offset, const Shape& extent) {
    return TensorSlice{"optim.exp_avg.w", {5, 6}, offset, extract_box(whole, offset, extent)};
  };
  const std::vector<std::vector<TensorSlice>> writers = {
      {box({0, 4}, {1, 2}), box({1, 0}, {2, 6}), box({3, 0}, {1, 3})},
      {box({0, 0}, {1, 4}), box({3, 3}, {2, 3}), box({4, 0}, {1, 3})}};
  for (int w = 1; w >= 0; --w) {
    save(tmp.path(), CheckpointState{2, json::object(), ""}, writers[static_cast<size_t>(w)],
         {.writer_index = w, .n_writers = 2, .barrier = [] {}, .attempt_id = "boxes"});
  }
  CheckpointReader reader(tmp.path() / "step-000002");
  const TensorInfo* info = reader.find("optim.exp_avg.w");
  REQUIRE(info != nullptr);
  REQUIRE(info->slices.size() == 6);
  REQUIRE(info->slices[1].dataset == "optim.exp_avg.w@1");  // a writer's later boxes get their own datasets
  REQUIRE(same_bytes(reader.read_whole("optim.exp_avg.w"), whole));
  Tensor middle = Tensor::zeros({3, 4}, DType::f32);  // crosses boxes of both writers
  reader.read(LoadRequest{"optim.exp_avg.w", {5, 6}, {1, 1}, middle});
  REQUIRE(same_bytes(middle, extract_box(whole, {1, 1}, {3, 4})));

  // Overlapping boxes of one writer do not tile the tensor: the save fails.
  const std::vector<TensorSlice> overlapping = {box({0, 0}, {3, 6}), box({2, 0}, {3, 6})};
  REQUIRE_THROWS_WITH(save(tmp.path(), CheckpointState{3, json::object(), ""}, overlapping), Contains("overlap"));
}

TEST_CASE("checkpoint: writers whose slices do not tile a tensor fail the save", "[checkpoint]") {
  TempDir tmp;
  const std::vector<Named> tensors = sample_tensors(7);
  save_split(tmp.path(), 1, tensors, 0, 2);
  // Writer 1 forgets its half of the embedding: writer 0 refuses to commit, step 1 stays the newest.
  auto writer1 = slices_of(tensors, 0, 2, 1);
  writer1.erase(writer1.begin());
  save(tmp.path(), CheckpointState{2, json::object(), ""}, writer1,
       {.writer_index = 1, .n_writers = 2, .barrier = [] {}, .attempt_id = "x"});
  try {
    save(tmp.path(), CheckpointState{2, json::object(), ""}, slices_of(tensors, 0, 2, 0),
         {.writer_index = 0, .n_writers = 2, .barrier = [] {}, .attempt_id = "x"});
    FAIL("the save should have failed");
  } catch (const std::invalid_argument& e) {
    REQUIRE_THAT(e.what(), Contains("model.embed_tokens.weight") && Contains("60 of its 120 elements"));
  }
  REQUIRE(latest(tmp.path()) == tmp.path() / "step-000001");
  REQUIRE_FALSE(fs::exists(tmp.path() / "step-000002"));

  // Caller mistakes are caught before anything is written.
  const Tensor t = random_of(DType::f32, {4, 4}, 1);
  const auto bad_save = [&](TensorSlice s, SaveOptions o = {}) {
    const std::vector<TensorSlice> one{std::move(s)};
    REQUIRE_THROWS_AS(save(tmp.path(), CheckpointState{9, json::object(), ""}, one, o), std::invalid_argument);
  };
  bad_save({"a/b", {4, 4}, {}, t});                     // '/' would make an HDF5 group
  bad_save({"w", {4, 3}, {}, t});                       // does not fit the global shape
  bad_save({"w", {8, 4}, {6, 0}, t});                   // offset pushes it out
  bad_save({"w", {16}, {}, t});                         // rank differs
  bad_save({"w", {4, 4}, {}, t}, {.n_writers = 2});     // several writers without a barrier
  bad_save({"w", {4, 4}, {}, t}, {.writer_index = 3});  // writer index out of range
  REQUIRE_THROWS_AS(save(tmp.path(), CheckpointState{9, json::array(), ""}, {}), std::invalid_argument);
}

TEST_CASE("checkpoint: keep_last keeps the newest N and never the one just written", "[checkpoint]") {
  TempDir tmp;
  const std::vector<Named> tensors = sample_tensors(3);
  for (int step = 1; step <= 5; ++step) save_split(tmp.path(), step, tensors, 0, 1, /*keep_last=*/2);
  REQUIRE(dir_names(tmp.path()) == std::vector<fs::path>{"step-000004", "step-000005"});
  // Re-saving an older step (a run resumed from it) keeps it plus the newest other one.
  save_split(tmp.path(), 3, tensors, 0, 1, 2);
  REQUIRE(dir_names(tmp.path()) == std::vector<fs::path>{"step-000003", "step-000005"});
  // keep_last 0 deletes nothing.
  save_split(tmp.path(), 6, tensors, 0, 1, 0);
  REQUIRE(dir_names(tmp.path()).size() == 3);
}

TEST_CASE("checkpoint: saving a step that exists replaces it", "[checkpoint]") {
  TempDir tmp;
  const std::vector<Named> first = sample_tensors(1), second = sample_tensors(2);
  save_split(tmp.path(), 7, first, 0, 2);
  save_split(tmp.path(), 7, second, 1, 4);
  REQUIRE(dir_names(tmp.path()) == std::vector<fs::path>{"step-000007"});
  CheckpointReader reader(tmp.path() / "step-000007");
  REQUIRE(reader.manifest().files.size() == 4);
  for (const Named& t : second) REQUIRE(same_bytes(reader.read_whole(t.name), t.whole));
}

TEST_CASE("checkpoint: latest ignores temporary, manifest-less and invalid directories", "[checkpoint]") {
  TempDir tmp;
  const fs::path root = tmp.path();
  REQUIRE_FALSE(latest(root / "does-not-exist").has_value());
  REQUIRE_FALSE(latest(root).has_value());
  const std::vector<Named> tensors = sample_tensors(5);
  save_split(root, 1, tensors, 0, 1);
  save_split(root, 2, tensors, 0, 2);
  // Newer directories that are all unusable, one way each.
  const auto copy_of_2 = [&](const std::string& name) {
    fs::copy(root / "step-000002", root / name, fs::copy_options::recursive);
    return root / name;
  };
  copy_of_2("step-000003.tmp-4242");                               // a save in progress / killed
  fs::remove(copy_of_2("step-000004") / kManifestFile);            // manifest never written
  std::ofstream(copy_of_2("step-000005") / kManifestFile) << "{";  // manifest cut short
  {
    const fs::path dir = copy_of_2("step-000006");  // written by a newer dsx
    json m = json::parse(std::ifstream(dir / kManifestFile));
    m["version"] = kFormatVersion + 1;
    std::ofstream(dir / kManifestFile) << m.dump();
  }
  copy_of_2("step-000007");  // its manifest says step 2
  fs::create_directories(root / "not-a-checkpoint");

  REQUIRE(latest(root) == root / "step-000002");
  const auto entries = list_checkpoints(root);
  REQUIRE(entries.size() == 7);
  std::map<std::string, EntryKind> kinds;
  for (const auto& e : entries) kinds[e.dir.filename().string()] = e.kind;
  REQUIRE(kinds["step-000001"] == EntryKind::complete);
  REQUIRE(kinds["step-000002"] == EntryKind::complete);
  REQUIRE(kinds["step-000003.tmp-4242"] == EntryKind::temporary);
  REQUIRE(kinds["step-000004"] == EntryKind::invalid);
  REQUIRE(kinds["step-000005"] == EntryKind::invalid);
  REQUIRE(kinds["step-000006"] == EntryKind::invalid);
  REQUIRE(kinds["step-000007"] == EntryKind::invalid);
  REQUIRE_THAT(entries[3].problem, Contains("no manifest.json"));
  REQUIRE_THAT(entries[6].problem, Contains("manifest is for step 2"));

  // Asked to, latest also removes what killed saves left behind, and only that.
  REQUIRE(latest(root, {.remove_stale = true}) == root / "step-000002");
  REQUIRE_FALSE(fs::exists(root / "step-000003.tmp-4242"));
  REQUIRE(fs::exists(root / "step-000004"));
  REQUIRE(list_checkpoints(root).size() == 6);
}

TEST_CASE("checkpoint: damaged files and mismatched requests give errors naming dir, file and tensor", "[checkpoint]") {
  TempDir tmp;
  const std::vector<Named> tensors = sample_tensors(9);
  const fs::path dir = save_split(tmp.path(), 4, tensors, 0, 2);
  const std::string embed = tensors[0].name;
  const Shape embed_shape = tensors[0].whole.shape();
  const fs::path file1 = dir / "rank-00001.h5";

  SECTION("missing tensor, wrong shape, wrong dtype") {
    CheckpointReader reader(dir);
    Tensor dest = Tensor::zeros(embed_shape, DType::f32);
    auto msg = error_of([&] { reader.read(LoadRequest{"model.nope.weight", embed_shape, {}, dest}); });
    REQUIRE_THAT(msg, Contains(dir.string()) && Contains("model.nope.weight") && Contains("not in the checkpoint"));
    msg = error_of([&] { reader.read(LoadRequest{embed, {10, 13}, {}, Tensor::zeros({10, 13}, DType::f32)}); });
    REQUIRE_THAT(msg, Contains(embed) && Contains("[10, 12]") && Contains("[10, 13]"));
    msg = error_of([&] { reader.read(LoadRequest{embed, embed_shape, {}, Tensor::zeros(embed_shape, DType::bf16)}); });
    REQUIRE_THAT(msg, Contains(embed) && Contains("f32") && Contains("bf16"));
    // A box outside the tensor is a caller bug, not a damaged checkpoint.
    REQUIRE_THROWS_AS(reader.read(LoadRequest{embed, embed_shape, {8, 0}, Tensor::zeros({4, 12}, DType::f32)}),
                      std::invalid_argument);
  }
  SECTION("a flipped byte is caught by the checksum") {
    flip_byte(file1, static_cast<std::streamoff>(fs::file_size(file1) / 2));
    CheckpointReader reader(dir);
    // Rows 0-4 live in rank-00000.h5 and still load; rows 5-9 come from the damaged file.
    Tensor top = Tensor::zeros({5, 12}, DType::f32);
    reader.read(LoadRequest{embed, embed_shape, {0, 0}, top});
    REQUIRE(same_bytes(top, extract_box(tensors[0].whole, {0, 0}, {5, 12})));
    const auto msg = error_of([&] { reader.read_whole(embed); });
    REQUIRE_THAT(msg, Contains(dir.string()) && Contains("rank-00001.h5") && Contains(embed) && Contains("corrupt"));
    REQUIRE_THROWS_AS(CheckpointReader(dir).verify_all(), UserError);
  }
  SECTION("a truncated file") {
    fs::resize_file(file1, fs::file_size(file1) - 100);
    const auto msg = error_of([&] { CheckpointReader(dir).read_whole(embed); });
    REQUIRE_THAT(msg, Contains(dir.string()) && Contains("rank-00001.h5") && Contains(embed) && Contains("truncated"));
  }
  SECTION("a missing file") {
    fs::remove(file1);
    const auto msg = error_of([&] { CheckpointReader(dir).read_whole(embed); });
    REQUIRE_THAT(msg, Contains("rank-00001.h5") && Contains("missing") && Contains(embed));
  }
  SECTION("foreign files are recognised even without checksums") {
    const ReaderOptions unchecked{.verify_checksums = false};
    SECTION("not HDF5 at all") {
      const auto size = fs::file_size(file1);
      std::ofstream(file1, std::ios::binary | std::ios::trunc) << std::string(size, 'x');
      const auto msg = error_of([&] { CheckpointReader(dir, unchecked).read_whole(embed); });
      REQUIRE_THAT(msg, Contains(dir.string()) && Contains("rank-00001.h5") && Contains("not a readable HDF5 file") &&
                            Contains(embed));
    }
    SECTION("a checkpoint file of another step") {
      const fs::path other = save_split(tmp.path(), 5, tensors, 0, 2);
      fs::copy_file(other / "rank-00001.h5", file1, fs::copy_options::overwrite_existing);
      const auto msg = error_of([&] { CheckpointReader(dir, unchecked).read_whole(embed); });
      REQUIRE_THAT(msg, Contains("rank-00001.h5") && Contains("belongs to step 5") && Contains(embed));
      // With checksums on, the same swap is reported as corruption.
      REQUIRE_THAT(error_of([&] { CheckpointReader(dir).read_whole(embed); }), Contains("corrupt"));
    }
  }
  SECTION("manifest missing, newer, or describing impossible slices") {
    json m = json::parse(std::ifstream(dir / kManifestFile));
    SECTION("missing") {
      fs::remove(dir / kManifestFile);
      REQUIRE_THAT(error_of([&] { CheckpointReader r(dir); }), Contains(dir.string()) && Contains("incomplete"));
      REQUIRE_FALSE(latest(tmp.path()).has_value());
    }
    SECTION("newer format version") {
      m["version"] = kFormatVersion + 1;
      std::ofstream(dir / kManifestFile) << m.dump();
      REQUIRE_THAT(error_of([&] { CheckpointReader r(dir); }),
                   Contains(dir.string()) && Contains("format version 3") && Contains("newer"));
    }
    SECTION("overlapping slices") {
      m["tensors"][0]["slices"][1]["offset"][0] = 4;
      std::ofstream(dir / kManifestFile) << m.dump();
      REQUIRE_THAT(error_of([&] { CheckpointReader r(dir); }),
                   Contains(dir.string()) && Contains(embed) && Contains("overlap"));
    }
    SECTION("unknown dtype") {
      m["tensors"][1]["dtype"] = "f16";
      std::ofstream(dir / kManifestFile) << m.dump();
      REQUIRE_THAT(error_of([&] { CheckpointReader r(dir); }), Contains("tensors[1].dtype") && Contains("f16"));
    }
  }
}

TEST_CASE("checkpoint: inspect describes a checkpoint and a root", "[checkpoint]") {
  TempDir tmp;
  const std::vector<Named> tensors = sample_tensors(11);
  save_split(tmp.path(), 1, tensors, 0, 1);
  const fs::path dir = save_split(tmp.path(), 20, tensors, 1, 2);
  fs::create_directories(tmp.path() / "step-000030.tmp-1");

  const json d = describe(dir, /*verify=*/true);
  REQUIRE(d["kind"] == "checkpoint");
  REQUIRE(d["step"] == 20);
  REQUIRE(d["verified"] == true);
  REQUIRE(d["files"].size() == 2);
  REQUIRE(d["n_tensors"] == 3);
  REQUIRE(d["metadata_keys"] == json::array({"step"}));
  REQUIRE(d["total_tensor_bytes"] == 10 * 12 * 4 + 9 * 7 * 2 + 8 * 6 * 3 * 8);
  const json& embed = d["tensors"][0];
  REQUIRE(embed["name"] == tensors[0].name);
  REQUIRE(embed["shape"] == json::array({10, 12}));
  REQUIRE(embed["dtype"] == "f32");
  REQUIRE(embed["slices"][1] == json{{"file", "rank-00001.h5"}, {"offset", {0, 6}}, {"extent", {10, 6}}});
  const std::string text = format_description(d);
  REQUIRE_THAT(text, Contains("step      20") && Contains(tensors[2].name) && Contains("rank-00001.h5[0:10, 6:12]"));

  const json r = describe(tmp.path(), false);
  REQUIRE(r["kind"] == "root");
  REQUIRE(r["checkpoints"].size() == 3);
  REQUIRE(r["checkpoints"][2]["state"] == "temporary");
  REQUIRE(r["latest"]["step"] == 20);
  REQUIRE_THAT(format_description(r),
               Contains("2 complete checkpoints, 1 other directory") && Contains("step-000030.tmp-1"));

  REQUIRE_THROWS_AS(describe(tmp.path() / "nothing-here", false), UserError);
  flip_byte(dir / "rank-00000.h5", 100);
  REQUIRE_THROWS_AS(describe(dir, true), UserError);
  REQUIRE(describe(dir, false)["step"] == 20);  // without --verify the manifest alone is shown
}
