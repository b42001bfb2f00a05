// Hugging Face export: the safetensors files dsx writes and reads (round trips of every dtype,
// damaged files refused with the file's name), and a checkpoint exported as a DeepseekV3
// directory holding every parameter whole, rounded to bf16 exactly as Tensor::to rounds, with a
// config.json that describes the model; and back: an export imports to the same bits, FP8
// weights with DeepSeek's 128x128 block scales are dequantized. (tests/trainer/convert_cli.cmake
// checks the files with the reference `safetensors` Python package.)
#include <catch2/catch.hpp>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "kernels/error.h"
#include "support/gradcheck.h"
#include "tests/support/temp_dir.h"
#include "tests/trainer/test_model_fixtures.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/checkpoint/hf_export.h"
#include "trainer/checkpoint/hf_import.h"
#include "trainer/checkpoint/safetensors.h"
#include "trainer/model/model.h"

using namespace dsx;
namespace fs = std::filesystem;
using Catch::Matchers::Contains;

namespace {

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() &&
         (a.nbytes() == 0 || std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0);
}

// A checkpoint (step 4) of the model's parameters under root.
fs::path save_model(Model& model, const fs::path& root) {
  std::vector<ckpt::TensorSlice> slices;
  for (Parameter& p : model.parameters()) slices.push_back({p.spec.name, p.spec.shape, {}, p.value});
  return ckpt::save(root, {4, nlohmann::json::object(), ""}, slices);
}

std::string read_text(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

TEST_CASE("safetensors: every dtype round-trips with its metadata", "[hf_export]") {
  test::TempDir tmp;
  std::vector<safetensors::NamedTensor> tensors;
  uint64_t seed = 1;
  for (DType d : {DType::f64, DType::f32, DType::bf16, DType::fp8_e4m3, DType::fp8_e5m2})
    tensors.push_back({"t." + std::string(dtype_name(d)), test::random_tensor({3, 5}, DType::f32, seed++).to(d)});
  tensors.push_back({"ids", Tensor::from<int64_t>({1, -2, 3}, {3})});
  tensors.push_back({"scalar", Tensor::from<int32_t>({7}, {})});
  const fs::path file = tmp.path() / "a.safetensors";
  safetensors::write(file, tensors, {{"format", "pt"}});
  REQUIRE_FALSE(fs::exists(tmp.path() / "a.safetensors.tmp"));
  // The header is 8-byte aligned JSON after its little-endian length, as the reference writer does.
  const std::string bytes = read_text(file);
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  REQUIRE(n % 8 == 0);
  REQUIRE(nlohmann::json::parse(bytes.substr(8, n))["t.bf16"]["dtype"] == "BF16");

  safetensors::Reader reader(file);
  REQUIRE(reader.metadata().at("format") == "pt");
  REQUIRE(reader.entries().size() == tensors.size());
  for (const safetensors::NamedTensor& t : tensors) {
    INFO(t.name);
    REQUIRE(same_bytes(reader.read(t.name), t.tensor));
  }
  REQUIRE_THROWS_WITH(reader.read("missing"), Contains("a.safetensors") && Contains("no tensor missing"));
}

TEST_CASE("safetensors: damaged files are refused, naming the file", "[hf_export]") {
  test::TempDir tmp;
  const fs::path good = tmp.path() / "good.safetensors";
  safetensors::write(good, {{"w", test::random_tensor({4, 4}, DType::f32, 3)}});
  const std::string bytes = read_text(good);
  const auto damaged = [&](const std::string& name, const std::string& content) {
    const fs::path p = tmp.path() / name;
    std::ofstream(p, std::ios::binary) << content;
    try {
      safetensors::Reader r(p);
    } catch (const UserError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  REQUIRE_THAT(damaged("short", "abc"), Contains("short") && Contains("not a safetensors file"));
  REQUIRE_THAT(damaged("truncated", bytes.substr(0, bytes.size() - 4)), Contains("truncated"));
  REQUIRE_THAT(damaged("longer", bytes + "xxxx"), Contains("longer") && Contains("hold 64 bytes"));
  std::string wrong_dtype = bytes;
  wrong_dtype.replace(wrong_dtype.find("F32"), 3, "U16");
  REQUIRE_THAT(damaged("dtype", wrong_dtype), Contains("dtype") && Contains("U16"));
  std::string huge = bytes;
  huge[7] = '\x7f';  // a header length far beyond the file
  REQUIRE_THAT(damaged("huge", huge), Contains("does not fit"));
}

TEST_CASE("hf export: a checkpoint becomes a DeepseekV3 directory with every parameter", "[hf_export]") {
  test::TempDir tmp;
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f32, 11);
  const fs::path dir = save_model(model, tmp.path() / "ckpt");

  for (const int64_t shard_bytes : {int64_t{5'000'000'000}, int64_t{8000}}) {
    INFO("max shard bytes " << shard_bytes);
    const fs::path out = tmp.path() / ("hf-" + std::to_string(shard_bytes));
    ckpt::CheckpointReader reader(dir);
    const ckpt::HfExportResult r = ckpt::export_hugging_face(
        reader, config, out, {.dtype = DType::bf16, .max_shard_bytes = shard_bytes, .source_prefix = ""});
    REQUIRE(r.tensors == static_cast<int64_t>(model.parameters().size()));
    REQUIRE(r.parameters == model.parameters().numel());
    std::map<std::string, fs::path> file_of;
    if (r.shards == 1) {
      for (const Parameter& p : model.parameters()) file_of[p.spec.name] = out / "model.safetensors";
    } else {
      REQUIRE(r.shards >= 2);
      const auto index = nlohmann::json::parse(read_text(out / "model.safetensors.index.json"));
      REQUIRE(index["metadata"]["total_size"] == r.bytes);
      for (const auto& [name, file] : index["weight_map"].items()) file_of[name] = out / file.get<std::string>();
    }
    REQUIRE(file_of.size() == model.parameters().size());
    int64_t bytes = 0;
    for (const Parameter& p : model.parameters()) {
      INFO(p.spec.name);
      safetensors::Reader file(file_of.at(p.spec.name));
      const Tensor got = file.read(p.spec.name);
      const bool bias = p.spec.name.ends_with("e_score_correction_bias");
      REQUIRE(same_bytes(got, bias ? p.value : p.value.to(DType::bf16)));  // f32 bias as DeepSeek ships it
      bytes += static_cast<int64_t>(got.nbytes());
    }
    REQUIRE(bytes == r.bytes);
    const auto hf = nlohmann::json::parse(read_text(out / "config.json"));
    REQUIRE(hf["model_type"] == "deepseek_v3");
    REQUIRE(hf["num_hidden_layers"] == config.num_hidden_layers);
    REQUIRE(hf["q_lora_rank"] == config.q_lora_rank);
    REQUIRE(hf["n_routed_experts"] == config.n_routed_experts);
    REQUIRE(hf["num_nextn_predict_layers"] == config.num_nextn_predict_layers);
    REQUIRE(hf["torch_dtype"] == "bfloat16");
  }
  // Without query compression HF's config says q_lora_rank null.
  REQUIRE(ckpt::hugging_face_config(test::tiny_config_direct_q(), DType::f32)["q_lora_rank"].is_null());
  // An output directory that holds something is refused before anything is written.
  ckpt::CheckpointReader reader(dir);
  REQUIRE_THROWS_WITH(ckpt::export_hugging_face(reader, config, tmp.path() / "ckpt"),
                      Contains("not an empty directory"));
  // A checkpoint of another model: the tensor's name and both shapes.
  ModelConfig other = config;
  other.hidden_size *= 2;
  REQUIRE_THROWS_WITH(ckpt::export_hugging_face(reader, other, tmp.path() / "other"),
                      Contains("model.embed_tokens.weight"));
}

TEST_CASE("hf import: an f32 export reads back bit-exactly, FP8 block-scaled weights dequantized", "[hf_export]") {
  test::TempDir tmp;
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f32, 5);
  const fs::path dir = save_model(model, tmp.path() / "ckpt");
  ckpt::CheckpointReader reader(dir);
  ckpt::HfExportOptions f32;
  f32.dtype = DType::f32;
  ckpt::export_hugging_face(reader, config, tmp.path() / "hf", f32);

  // The config round-trips.
  const ModelConfig back = ckpt::config_from_hugging_face(ckpt::hugging_face_config(config, DType::f32), "test");
  REQUIRE(ckpt::hugging_face_config(back, DType::f32) == ckpt::hugging_face_config(config, DType::f32));

  const ckpt::HfImportResult r = ckpt::import_hugging_face(tmp.path() / "hf", tmp.path() / "imported");
  REQUIRE(r.tensors == static_cast<int64_t>(model.parameters().size()));
  REQUIRE(r.dequantized == 0);
  ckpt::CheckpointReader imported(r.checkpoint);
  REQUIRE(imported.step() == 0);
  for (const Parameter& p : model.parameters()) {
    INFO(p.spec.name);
    REQUIRE(same_bytes(imported.read_whole(p.spec.name), p.value));
  }
  REQUIRE_THROWS_WITH(ckpt::import_hugging_face(tmp.path() / "hf", tmp.path() / "imported"),
                      Contains("already holds a checkpoint"));

  // DeepSeek's FP8 format for one weight: E4M3 values and an F32 scale per 128x128 block (here
  // partial blocks only: the tiny matrices are smaller than a block).
  const std::string name = "model.layers.1.mlp.experts.3.down_proj.weight";
  const Tensor& w = model.parameters().at(name).value;
  const Tensor fp8 = w.to(DType::fp8_e4m3);
  const Tensor scale = Tensor::from<float>({0.5f}, {1, 1});
  safetensors::Reader original(tmp.path() / "hf" / "model.safetensors");
  std::vector<safetensors::NamedTensor> tensors;
  for (const safetensors::Entry& e : original.entries()) {
    tensors.push_back({e.name, e.name == name ? fp8 : original.read(e.name)});
  }
  tensors.push_back({name + "_scale_inv", scale});
  fs::create_directories(tmp.path() / "hf-fp8");
  fs::copy_file(tmp.path() / "hf" / "config.json", tmp.path() / "hf-fp8" / "config.json");
  safetensors::write(tmp.path() / "hf-fp8" / "model.safetensors", tensors, {{"format", "pt"}});
  const ckpt::HfImportResult q = ckpt::import_hugging_face(tmp.path() / "hf-fp8", tmp.path() / "imported-fp8");
  REQUIRE(q.dequantized == 1);
  const Tensor got = ckpt::CheckpointReader(q.checkpoint).read_whole(name);
  const std::vector<double> want = fp8.to(DType::f32).to_vector(), v = got.to_vector();
  for (size_t i = 0; i < v.size(); ++i) REQUIRE(v[i] == 0.5 * want[i]);  // exact: scaling by a power of two

  // A directory missing a parameter names it.
  std::vector<safetensors::NamedTensor> missing(tensors.begin() + 1, tensors.end());
  fs::create_directories(tmp.path() / "hf-missing");
  fs::copy_file(tmp.path() / "hf" / "config.json", tmp.path() / "hf-missing" / "config.json");
  safetensors::write(tmp.path() / "hf-missing" / "model.safetensors", missing);
  REQUIRE_THROWS_WITH(ckpt::import_hugging_face(tmp.path() / "hf-missing", tmp.path() / "imported-missing"),
                      Contains("has no tensor " + tensors.front().name));
}

// `dsx convert to-hf --ema` reads the checkpoint's "ema." tensors (HfExportOptions::source_prefix):
// a checkpoint holding two models, the trained weights under their names and other values under
// "ema." + the names, exports each one exactly (f32, imported back).
TEST_CASE("hf export: source_prefix exports the weight EMA instead of the weights", "[hf_export][ema]") {
  test::TempDir tmp;
  const ModelConfig config = test::tiny_config();
  Model trained(config, DType::f32, 5), averaged(config, DType::f32, 6);
  std::vector<ckpt::TensorSlice> slices;
  for (Parameter& p : trained.parameters()) slices.push_back({p.spec.name, p.spec.shape, {}, p.value});
  for (Parameter& p : averaged.parameters()) slices.push_back({"ema." + p.spec.name, p.spec.shape, {}, p.value});
  const fs::path dir = ckpt::save(tmp.path() / "ckpt", {4, nlohmann::json::object(), ""}, slices);
  ckpt::CheckpointReader reader(dir);
  for (const auto& [prefix, model] : {std::pair<std::string, Model*>{"", &trained}, {"ema.", &averaged}}) {
    ckpt::HfExportOptions options;
    options.dtype = DType::f32;
    options.source_prefix = prefix;
    const fs::path hf = tmp.path() / ("hf" + prefix);
    ckpt::export_hugging_face(reader, config, hf, options);
    const ckpt::HfImportResult r = ckpt::import_hugging_face(hf, tmp.path() / ("imported" + prefix));
    ckpt::CheckpointReader imported(r.checkpoint);
    for (const Parameter& p : model->parameters()) {
      INFO(prefix << p.spec.name);
      REQUIRE(same_bytes(imported.read_whole(p.spec.name), p.value));
    }
  }
}

// from-hf streams: each safetensors file of a sharded export becomes one file of the checkpoint,
// written before the next is read, so the import's peak of live tensor memory is about one shard
// (here ~1/8 of the model plus the largest tensor), not the model; the values are the same bits.
TEST_CASE("hf import: a sharded directory imports one file at a time", "[hf_export]") {
  test::TempDir tmp;
  const ModelConfig config = test::tiny_config();
  Model model(config, DType::f32, 5);
  const fs::path dir = save_model(model, tmp.path() / "ckpt");
  int64_t model_bytes = 0;
  for (const Parameter& p : model.parameters()) model_bytes += static_cast<int64_t>(p.value.nbytes());
  ckpt::CheckpointReader reader(dir);
  ckpt::HfExportOptions sharded;
  sharded.dtype = DType::f32;
  sharded.max_shard_bytes = model_bytes / 8;
  const ckpt::HfExportResult exported = ckpt::export_hugging_face(reader, config, tmp.path() / "hf", sharded);
  REQUIRE(exported.shards >= 8);

  const int64_t before = host_tensor_memory().used_bytes;
  reset_host_tensor_peak();
  const ckpt::HfImportResult r = ckpt::import_hugging_face(tmp.path() / "hf", tmp.path() / "imported");
  const int64_t peak = host_tensor_memory().peak_bytes - before;
  INFO("import peak " << peak << " B of a " << model_bytes << " B model in " << exported.shards << " shards");
  REQUIRE(peak < model_bytes / 3);

  ckpt::CheckpointReader imported(r.checkpoint);
  REQUIRE(static_cast<int>(imported.manifest().files.size()) == exported.shards);
  for (const Parameter& p : model.parameters()) {
    INFO(p.spec.name);
    REQUIRE(same_bytes(imported.read_whole(p.spec.name), p.value));
  }
}
