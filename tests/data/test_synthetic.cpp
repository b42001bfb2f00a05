#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>

#include "data/synthetic.h"
#include "kernels/error.h"

using namespace dsx;
using namespace dsx::data;

TEST_CASE("synthetic: windows depend only on (seed, global index)", "[synthetic]") {
  SyntheticSource a({.vocab_size = 64, .seq_len = 16, .branching = 3, .decay = 0.5, .seed = 9});
  SyntheticSource b({.vocab_size = 64, .seq_len = 16, .branching = 3, .decay = 0.5, .seed = 9});
  SyntheticSource c({.vocab_size = 64, .seq_len = 16, .branching = 3, .decay = 0.5, .seed = 10});
  REQUIRE(a.window(5) == b.window(5));
  REQUIRE(a.window(5) != a.window(6));
  REQUIRE(a.window(5) != c.window(5));
  // A batch of rows [3, 7) is the same however it is split (data-parallel sharding).
  const TokenBatch whole = a.batch(3, 4);
  const TokenBatch part = a.batch(5, 2);
  REQUIRE(whole.inputs.slice(2, 4).to_vector() == part.inputs.to_vector());
  REQUIRE(whole.targets.slice(2, 4).to_vector() == part.targets.to_vector());
}

TEST_CASE("synthetic: targets are inputs shifted by one and follow the sparse chain", "[synthetic]") {
  SyntheticSource src({.vocab_size = 32, .seq_len = 24, .branching = 2, .decay = 0.5, .seed = 3});
  const TokenBatch b = src.batch(0, 64);
  const auto in = b.inputs.to_vector();
  const auto tg = b.targets.to_vector();
  std::map<int, std::set<int>> successors;
  for (int r = 0; r < 64; ++r) {
    for (int i = 0; i + 1 < 24; ++i) REQUIRE(tg[r * 24 + i] == in[r * 24 + i + 1]);
    for (int i = 0; i < 24; ++i) successors[static_cast<int>(in[r * 24 + i])].insert(static_cast<int>(tg[r * 24 + i]));
  }
  for (const auto& [tok, next] : successors) REQUIRE(next.size() <= 2);
  // Two successors with p = 2/3, 1/3: entropy 0.6365 nats unless a list repeats a token.
  REQUIRE(src.entropy_floor() <= 0.6366);
  REQUIRE(src.entropy_floor() > 0.5);
  REQUIRE(src.entropy_floor() < std::log(32.0));
}

TEST_CASE("synthetic: bad settings are refused", "[synthetic]") {
  REQUIRE_THROWS_AS(SyntheticSource({.vocab_size = 1}), UserError);
  REQUIRE_THROWS_AS(SyntheticSource({.vocab_size = 8, .seq_len = 4, .branching = 9}), UserError);
  REQUIRE_THROWS_AS(SyntheticSource({.vocab_size = 8, .seq_len = 4, .branching = 2, .decay = 0.0}), UserError);
}

TEST_CASE("synthetic: order-2 chains depend on two tokens of context", "[synthetic]") {
  SyntheticSource src({.vocab_size = 16, .seq_len = 32, .order = 2, .branching = 2, .decay = 1.0, .seed = 5});
  REQUIRE(src.entropy_floor() == Approx(std::log(2.0)));
  std::map<std::pair<int, int>, std::set<int>> next;
  std::map<int, std::set<int>> next_by_last;
  for (int g = 0; g < 200; ++g) {
    const auto w = src.window(g);
    for (size_t i = 2; i < w.size(); ++i) {
      next[{w[i - 2], w[i - 1]}].insert(w[i]);
      next_by_last[w[i - 1]].insert(w[i]);
    }
  }
  size_t widest_by_last = 0;
  for (const auto& [ctx, s] : next) REQUIRE(s.size() <= 2);
  for (const auto& [ctx, s] : next_by_last) widest_by_last = std::max(widest_by_last, s.size());
  REQUIRE(widest_by_last > 2);  // one token of context does not determine the successors
}
