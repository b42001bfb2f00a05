// Prompt sets: JSONL parsing, extra fields, errors by file:line, shuffle/shard/resume.
#include <catch2/catch.hpp>
#include <map>

#include "data/prompts.h"
#include "kernels/error.h"
#include "tests/data/dataset_fixtures.h"
#include "tests/support/user_error.h"

using namespace dsx::data;
using namespace dsx::data::testing;
using dsx::test::user_error;
using Catch::Matchers::Contains;

namespace {

std::shared_ptr<const PromptSet> numbered_set(int n) {
  std::vector<Prompt> prompts;
  for (int i = 0; i < n; ++i) prompts.push_back({i, std::to_string(i) + "?", std::to_string(i * i), "{}"});
  return std::make_shared<const PromptSet>(PromptSet::from_prompts(std::move(prompts), "numbered"));
}

// Prompt indices in global sample order for `steps` steps on every rank of a DP group.
std::vector<int64_t> global_order(const std::shared_ptr<const PromptSet>& set, PromptLoaderConfig config, int dp,
                                  int steps, const PromptLoaderState* from = nullptr) {
  std::vector<std::vector<std::vector<int64_t>>> per_rank(dp);
  for (int r = 0; r < dp; ++r) {
    config.dp_size = dp;
    config.dp_rank = r;
    PromptLoader loader(set, config);
    if (from) loader.restore(*from);
    for (int s = 0; s < steps; ++s) {
      const PromptBatch b = loader.next();
      CHECK(b.prompts.size() == static_cast<size_t>(config.global_batch / dp));
      std::vector<int64_t> ids;
      for (const auto& p : b.prompts) ids.push_back(p.index);
      per_rank[r].push_back(ids);
    }
  }
  std::vector<int64_t> order;
  for (int s = 0; s < steps; ++s)
    for (int r = 0; r < dp; ++r) order.insert(order.end(), per_rank[r][s].begin(), per_rank[r][s].end());
  return order;
}

}  // namespace

TEST_CASE("prompts: JSONL lines give prompt, answer and the other fields as JSON", "[prompts]") {
  TempDir tmp;
  write_file(tmp / "p.jsonl",
             "{\"prompt\": \"What is 2+2?\", \"answer\": \"4\", \"source\": \"gsm\", \"level\": 1}\n"
             "\n"
             "{\"prompt\": \"Zähle bis drei 🙂\", \"answer\": 3}\n"
             "   \n"
             "{\"answer\": true, \"prompt\": \"Is water wet?\", \"tags\": [\"a\", \"b\"]}\n");
  const PromptSet set = PromptSet::load(tmp / "p.jsonl");
  REQUIRE(set.size() == 3);
  CHECK(set[0].index == 0);
  CHECK(set[0].prompt == "What is 2+2?");
  CHECK(set[0].answer == "4");
  CHECK(set[0].extra_json == "{\"level\":1,\"source\":\"gsm\"}");
  CHECK(set[1].prompt == "Zähle bis drei 🙂");
  CHECK(set[1].answer == "3");
  CHECK(set[1].extra_json == "{}");
  CHECK(set[2].index == 2);
  CHECK(set[2].answer == "true");
  CHECK(set[2].extra_json == "{\"tags\":[\"a\",\"b\"]}");
}

TEST_CASE("prompts: bad files name the file and the line", "[prompts]") {
  TempDir tmp;
  const std::string f = tmp / "p.jsonl";
  const std::string good = "{\"prompt\": \"a\", \"answer\": \"b\"}\n";
  SECTION("missing prompt") {
    write_file(f, good + good + "{\"question\": \"a\", \"answer\": \"b\"}\n");
    CHECK_THAT(user_error([&] { PromptSet::load(f); }), Contains(f + ":3") && Contains("'prompt' is missing"));
  }
  SECTION("missing answer") {
    write_file(f, good + "\n{\"prompt\": \"a\"}\n");
    CHECK_THAT(user_error([&] { PromptSet::load(f); }), Contains(f + ":3") && Contains("'answer' is missing"));
  }
  SECTION("invalid JSON") {
    write_file(f, good + "{\"prompt\": \"a\", \"answer\": }\n");
    CHECK_THAT(user_error([&] { PromptSet::load(f); }), Contains(f + ":2") && Contains("invalid JSON"));
  }
  SECTION("prompt of the wrong type") {
    write_file(f, "{\"prompt\": 5, \"answer\": \"b\"}\n");
    CHECK_THAT(user_error([&] { PromptSet::load(f); }), Contains(f + ":1") && Contains("must be a string"));
  }
  SECTION("missing or empty file") {
    CHECK_THAT(user_error([&] { PromptSet::load(tmp / "none.jsonl"); }), Contains("none.jsonl"));
    write_file(f, "\n\n");
    CHECK_THAT(user_error([&] { PromptSet::load(f); }), Contains(f) && Contains("no prompts"));
  }
}

TEST_CASE("prompts: every prompt once per epoch, same order on DP 1, 2 and 4", "[prompts]") {
  const auto set = numbered_set(37);
  PromptLoaderConfig config{8, 0, 1, 5};
  const int steps = 10;  // 80 samples: epochs of 37 prompts
  const auto reference = global_order(set, config, 1, steps);
  CHECK(global_order(set, config, 2, steps) == reference);
  CHECK(global_order(set, config, 4, steps) == reference);
  for (int e = 0; e < 2; ++e) {
    std::vector<int64_t> epoch(reference.begin() + e * 37, reference.begin() + (e + 1) * 37);
    std::sort(epoch.begin(), epoch.end());
    for (int i = 0; i < 37; ++i) REQUIRE(epoch[i] == i);
  }
  CHECK(!std::equal(reference.begin(), reference.begin() + 37, reference.begin() + 37));  // reshuffled per epoch
  config.seed = 6;
  CHECK(global_order(set, config, 1, steps) != reference);
}

TEST_CASE("prompts: a restored state continues exactly on another DP size", "[prompts]") {
  const auto set = numbered_set(50);
  const PromptLoaderConfig config{8, 0, 2, 9};
  PromptLoader first(set, config);
  for (int i = 0; i < 9; ++i) first.next();
  const PromptLoaderState state = PromptLoaderState::from_json(first.state().to_json(), "ckpt");
  CHECK(state == first.state());
  CHECK(state.consumed_samples == 72);

  const auto continuous = global_order(set, config, 2, 20);
  const std::vector<int64_t> tail(continuous.begin() + 72, continuous.end());
  CHECK(global_order(set, config, 4, 11, &state) == tail);
  CHECK(global_order(set, config, 1, 11, &state) == tail);

  PromptLoader other(numbered_set(51), config);
  CHECK_THAT(user_error([&] { other.restore(state); }), Contains("does not match") && Contains("51 prompts"));
  CHECK_THAT(user_error([&] { PromptLoader bad(set, {6, 0, 4, 0}); }), Contains("multiple of the DP size"));
}
