// HDF5 token dataset: writer/reader round trips, shard layout, atomic writes, bad files.
#include <hdf5.h>

#include <catch2/catch.hpp>
#include <cstdio>
#include <cstdlib>
#include <filesystem>

#include "data/dataset.h"
#include "data/permutation.h"
#include "kernels/error.h"
#include "tests/data/dataset_fixtures.h"
#include "tests/support/user_error.h"

using namespace dsx::data;
using namespace dsx::data::testing;
using dsx::test::user_error;
using Catch::Matchers::Contains;
namespace fs = std::filesystem;

namespace {

std::vector<TokenId> concat(const std::vector<std::vector<TokenId>>& docs) {
  std::vector<TokenId> all;
  for (const auto& d : docs) all.insert(all.end(), d.begin(), d.end());
  return all;
}

// Reference segment ids for the stream range [begin, begin + n): document index relative to
// the document holding `begin`.
std::vector<int32_t> reference_segments(const std::vector<std::vector<TokenId>>& docs, int64_t begin, int64_t n) {
  std::vector<int64_t> doc_of;
  for (size_t d = 0; d < docs.size(); ++d) doc_of.insert(doc_of.end(), docs[d].size(), static_cast<int64_t>(d));
  std::vector<int32_t> seg;
  for (int64_t i = 0; i < n; ++i) seg.push_back(static_cast<int32_t>(doc_of[begin + i] - doc_of[begin]));
  return seg;
}

// Overwrites a root attribute of an HDF5 file with an integer or string value.
void set_attribute(const std::string& file, const char* name, int64_t value) {
  hid_t f = H5Fopen(file.c_str(), H5F_ACC_RDWR, H5P_DEFAULT);
  REQUIRE(f >= 0);
  if (H5Aexists(f, name) > 0) H5Adelete(f, name);
  hid_t space = H5Screate(H5S_SCALAR);
  hid_t attr = H5Acreate2(f, name, H5T_STD_I32LE, space, H5P_DEFAULT, H5P_DEFAULT);
  H5Awrite(attr, H5T_NATIVE_INT64, &value);
  H5Aclose(attr);
  H5Sclose(space);
  H5Fclose(f);
}

void write_foreign_hdf5(const std::string& file) {
  hid_t f = H5Fcreate(file.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
  REQUIRE(f >= 0);
  const hsize_t dims[1] = {16};
  hid_t space = H5Screate_simple(1, dims, nullptr);
  hid_t dset = H5Dcreate2(f, "weights", H5T_IEEE_F32LE, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
  std::vector<float> values(16, 1.5f);
  H5Dwrite(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values.data());
  H5Dclose(dset);
  H5Sclose(space);
  H5Fclose(f);
}

}  // namespace

TEST_CASE("dataset: writer and reader round-trip tokens, documents and segment ids across shards", "[dataset]") {
  TempDir tmp;
  const auto docs = numbered_documents(200, 40, 7);
  const std::string dir = tmp / "ds";
  const DatasetIndex written = write_dataset(dir, docs, test_identity(), /*shard_tokens=*/500, /*chunk=*/37);
  const TokenDataset ds = TokenDataset::open(dir);
  const auto all = concat(docs);

  CHECK(ds.tokens() == static_cast<int64_t>(all.size()));
  CHECK(ds.documents() == 200);
  CHECK(ds.num_shards() == written.shards.size());
  CHECK(ds.num_shards() > 3);
  CHECK(ds.identity() == test_identity());

  std::vector<TokenId> out(all.size());
  std::vector<int32_t> seg(all.size());
  ds.read(0, out, seg);
  CHECK(out == all);
  CHECK(seg == reference_segments(docs, 0, ds.tokens()));

  // Ranges that start mid-document and cross shard boundaries.
  for (int64_t begin : {int64_t{1}, int64_t{499}, int64_t{777}, ds.tokens() - 300}) {
    std::vector<TokenId> part(300);
    std::vector<int32_t> part_seg(300);
    ds.read(begin, part, part_seg);
    CHECK(std::equal(part.begin(), part.end(), all.begin() + begin));
    CHECK(part_seg == reference_segments(docs, begin, 300));
  }

  // Per-shard document offsets are local, start at 0 and end at the shard's token count.
  int64_t docs_seen = 0;
  for (size_t s = 0; s < ds.num_shards(); ++s) {
    const auto offsets = ds.document_offsets(s);
    CHECK(offsets.front() == 0);
    CHECK(offsets.back() == ds.index().shards[s].tokens);
    for (size_t i = 1; i < offsets.size(); ++i) {
      CHECK(offsets[i] - offsets[i - 1] == static_cast<int64_t>(docs[docs_seen + i - 1].size()));
    }
    docs_seen += static_cast<int64_t>(offsets.size()) - 1;
  }
  CHECK(docs_seen == 200);
}

TEST_CASE("dataset: shards close once they reach the size and never split a document", "[dataset]") {
  TempDir tmp;
  const auto docs = numbered_documents(100, 30, 3);
  const DatasetIndex index = write_dataset(tmp / "ds", docs, test_identity(), /*shard_tokens=*/200);
  size_t d = 0;
  for (size_t s = 0; s < index.shards.size(); ++s) {
    const ShardEntry& e = index.shards[s];
    char expected_name[32];
    std::snprintf(expected_name, sizeof expected_name, "shard-%05zu.h5", s);
    CHECK(e.file == expected_name);
    int64_t tokens = 0;
    for (int64_t i = 0; i < e.documents; ++i) tokens += static_cast<int64_t>(docs[d++].size());
    CHECK(tokens == e.tokens);
    // Full shards: at least the size, and below size + one document (the last one added).
    if (s + 1 < index.shards.size()) {
      CHECK(e.tokens >= 200);
      CHECK(e.tokens - static_cast<int64_t>(docs[d - 1].size()) < 200);
    }
    const ShardInfo info = inspect_shard(tmp / ("ds/" + e.file));
    CHECK(info.format_version == kDatasetFormatVersion);
    CHECK(info.tokens == e.tokens);
    CHECK(info.documents == e.documents);
    CHECK(info.identity == test_identity());
  }
  CHECK(d == docs.size());
}

TEST_CASE("dataset: an unfinished write leaves no index and no shard files behind", "[dataset]") {
  TempDir tmp;
  const std::string dir = tmp / "ds";
  const auto docs = numbered_documents(60, 30, 5);
  {
    DatasetWriter writer(dir, test_identity(), {200, 16});
    for (const auto& d : docs) writer.add_document(d);
    CHECK(writer.shards_written() >= 2);
    // Mid-way, the finished shards exist but index.json does not: readers refuse the directory.
    CHECK(fs::exists(tmp / "ds/shard-00000.h5"));
    CHECK_FALSE(fs::exists(tmp / "ds/index.json"));
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains("index.json") && Contains("missing"));
  }  // destroyed without finish(): its files and the directory it created are removed
  CHECK_FALSE(fs::exists(dir));
  fs::create_directory(dir);
  write_file(dir + "/notes.txt", "mine");
  {
    DatasetWriter writer(dir, test_identity(), {200, 16});
    for (const auto& d : docs) writer.add_document(d);
  }  // a directory that existed before stays, with what it held
  CHECK(fs::exists(dir + "/notes.txt"));
  CHECK_FALSE(fs::exists(dir + "/shard-00000.h5"));

  {
    ShardWriter shard(tmp / "one.h5", test_identity());
    shard.append_document(docs[0]);
    CHECK(fs::exists(tmp / "one.h5.partial"));
    CHECK_FALSE(fs::exists(tmp / "one.h5"));
  }
  CHECK_FALSE(fs::exists(tmp / "one.h5.partial"));
  CHECK_FALSE(fs::exists(tmp / "one.h5"));
}

TEST_CASE("dataset: a directory that already holds a dataset is not overwritten", "[dataset]") {
  TempDir tmp;
  write_dataset(tmp / "ds", numbered_documents(5, 10, 1), test_identity());
  const std::string before = read_file(tmp / "ds/index.json");
  CHECK_THAT(user_error([&] { DatasetWriter(tmp / "ds", test_identity()); }), Contains("already holds a dataset"));
  CHECK(read_file(tmp / "ds/index.json") == before);
  CHECK_THAT(user_error([&] { DatasetWriter(tmp / "empty", test_identity()).finish(); }), Contains("no documents"));
}

TEST_CASE("dataset: index.json records format, identity and shard counts", "[dataset]") {
  TempDir tmp;
  const auto docs = numbered_documents(30, 20, 2);
  const DatasetIndex written = write_dataset(tmp / "ds", docs, {5000, "abc123", 7}, 100);
  const DatasetIndex loaded = DatasetIndex::load(tmp / "ds");
  CHECK(loaded.identity == TokenizerIdentity{5000, "abc123", 7});
  CHECK(loaded.tokens == total_tokens(docs));
  CHECK(loaded.documents == 30);
  REQUIRE(loaded.shards.size() == written.shards.size());
  const std::string text = read_file(tmp / "ds/index.json");
  CHECK_THAT(text, Contains("\"format\": \"dsx-tokens\"") && Contains("\"format_version\": 1"));
  CHECK_FALSE(fs::exists(tmp / "ds/index.json.partial"));
}

TEST_CASE("dataset: bad directories and index files give one clear error naming the file", "[dataset]") {
  TempDir tmp;
  const std::string dir = tmp / "ds";
  write_dataset(dir, numbered_documents(40, 30, 9), test_identity(), 300);

  SECTION("missing directory") {
    CHECK_THAT(user_error([&] { TokenDataset::open(tmp / "nope"); }), Contains("nope") && Contains("no such"));
  }
  SECTION("missing index.json") {
    fs::remove(dir + "/index.json");
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains(dir + "/index.json") && Contains("missing"));
  }
  SECTION("index.json is not JSON") {
    write_file(dir + "/index.json", "{\"format\": \"dsx-tokens\", ");
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains("index.json") && Contains("invalid JSON"));
  }
  SECTION("index.json lacks a field") {
    std::string text = read_file(dir + "/index.json");
    text.replace(text.find("\"vocab_size\""), 12, "\"vocab_sise\"");
    write_file(dir + "/index.json", text);
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains("index.json") && Contains("'vocab_size'"));
  }
  SECTION("index.json from a newer dsx") {
    std::string text = read_file(dir + "/index.json");
    text.replace(text.find("\"format_version\": 1"), 19, "\"format_version\": 9");
    write_file(dir + "/index.json", text);
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }),
               Contains("index.json") && Contains("version 9") && Contains("newer"));
  }
  SECTION("a listed shard is missing") {
    fs::remove(dir + "/shard-00001.h5");
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains("shard-00001.h5") && Contains("missing"));
  }
  SECTION("index.json counts disagree with a shard") {
    std::string text = read_file(dir + "/index.json");
    const DatasetIndex index = DatasetIndex::load(dir);
    // Swap the first two shards' files: both exist but hold other counts than listed.
    const std::string a = "\"shard-00000.h5\"", b = "\"shard-00001.h5\"";
    text.replace(text.find(a), a.size(), "\"tmp\"");
    text.replace(text.find(b), b.size(), a);
    text.replace(text.find("\"tmp\""), 5, b);
    write_file(dir + "/index.json", text);
    REQUIRE(index.shards[0].tokens != index.shards[1].tokens);
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains("shard-0000") && Contains("index.json' says"));
  }
}

TEST_CASE("dataset: truncated, foreign, too-new and non-HDF5 shard files are refused by name", "[dataset]") {
  TempDir tmp;
  const std::string dir = tmp / "ds";
  write_dataset(dir, numbered_documents(40, 30, 9), test_identity(), 300);
  const std::string shard = dir + "/shard-00001.h5";

  SECTION("truncated") {
    fs::resize_file(shard, fs::file_size(shard) / 2);
    const std::string msg = user_error([&] { TokenDataset::open(dir); });
    CHECK_THAT(msg, Contains(shard) && Contains("truncated"));
  }
  SECTION("foreign HDF5 file") {
    write_foreign_hdf5(shard);
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }),
               Contains(shard) && Contains("not a dsx token shard") && Contains("'format'"));
  }
  SECTION("format version too new") {
    set_attribute(shard, "format_version", 2);
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }),
               Contains(shard) && Contains("version 2") && Contains("newer"));
  }
  SECTION("not HDF5 at all") {
    write_file(shard, "this is a text file that someone named .h5\n");
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains(shard) && Contains("not an HDF5 file"));
  }
  SECTION("shard of another tokenizer") {
    const auto other = tmp / "other";
    write_dataset(other, numbered_documents(40, 30, 9), test_identity(1 << 20, "other-hash"), 300);
    fs::copy_file(other + "/shard-00001.h5", shard, fs::copy_options::overwrite_existing);
    CHECK_THAT(user_error([&] { TokenDataset::open(dir); }), Contains(shard) && Contains("other-hash"));
  }
  SECTION("direct shard inspection names the file too") {
    CHECK_THAT(user_error([&] { inspect_shard(tmp / "absent.h5"); }), Contains("absent.h5") && Contains("no such"));
  }
}

TEST_CASE("dataset: writer rejects empty documents and tokens outside the vocabulary", "[dataset]") {
  TempDir tmp;
  DatasetWriter writer(tmp / "ds", test_identity(100));
  const std::vector<TokenId> empty, too_big{5, 100};
  CHECK_THROWS_AS(writer.add_document(empty), std::invalid_argument);
  CHECK_THROWS_AS(writer.add_document(too_big), std::invalid_argument);
  CHECK_THAT(user_error([&] { DatasetWriter(tmp / "x", TokenizerIdentity{0, "h", -1}); }), Contains("vocab_size"));
}

TEST_CASE("permutation: seeded permutations are bijections and differ by key", "[dataset]") {
  for (uint64_t n : {1ull, 2ull, 3ull, 5ull, 16ull, 17ull, 255ull, 1000ull, 4099ull}) {
    const SeededPermutation p(n, 42);
    std::vector<char> seen(n, 0);
    for (uint64_t i = 0; i < n; ++i) {
      const uint64_t v = p(i);
      REQUIRE(v < n);
      REQUIRE_FALSE(seen[v]);
      seen[v] = 1;
    }
  }
  const SeededPermutation a(1000, 1), b(1000, 2);
  int same = 0;
  for (uint64_t i = 0; i < 1000; ++i) same += a(i) == b(i);
  // Two independent random permutations agree in Poisson(1) places; 10 or more has
  // probability ~1e-7.
  CHECK(same < 10);
  // Not the identity either: a shuffle moves almost everything.
  int fixed = 0;
  for (uint64_t i = 0; i < 1000; ++i) fixed += a(i) == i;
  CHECK(fixed < 10);
}

TEST_CASE("permutation: where element 0 lands is close to uniform over keys", "[dataset]") {
  // 8 buckets of n = 64 positions, 8000 keys: each bucket expects 1000 with sd ~30;
  // a tolerance of 150 is 5 sd.
  constexpr uint64_t n = 64;
  std::vector<int> buckets(8, 0);
  for (uint64_t key = 0; key < 8000; ++key) buckets[SeededPermutation(n, mix_key(key, 99))(0) / 8] += 1;
  for (int b : buckets) CHECK(std::abs(b - 1000) < 150);
}
