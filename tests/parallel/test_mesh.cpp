#include <catch2/catch.hpp>

#include <algorithm>
#include <set>

#include "kernels/error.h"
#include "parallel/mesh.h"

using namespace dsx;

namespace {
// Every group kind partitions the world: each rank is in exactly one group of each kind, and
// all members of a group agree on the group.
void check_partition(const MeshSizes& s, std::vector<int> Mesh::*group, int expected_size) {
  std::set<std::vector<int>> groups;
  for (int r = 0; r < s.world(); ++r) {
    const Mesh m = build_mesh(s, r);
    const auto& g = m.*group;
    REQUIRE(static_cast<int>(g.size()) == expected_size);
    REQUIRE(std::find(g.begin(), g.end(), r) != g.end());
    for (int other : g) REQUIRE(build_mesh(s, other).*group == g);
    groups.insert(g);
  }
  REQUIRE(static_cast<int>(groups.size()) * expected_size == s.world());
}
}  // namespace

TEST_CASE("mesh: coordinates and ranks are inverse, TP fastest then EP, EDP, PP", "[mesh]") {
  const MeshSizes s{.pp = 2, .dp = 4, .tp = 2, .ep = 2};
  REQUIRE(s.world() == 16);
  for (int r = 0; r < s.world(); ++r) REQUIRE(mesh_rank(s, mesh_coords(s, r)) == r);
  const MeshCoords c = mesh_coords(s, 1);
  REQUIRE((c.tp == 1 && c.ep == 0 && c.edp == 0 && c.pp == 0));
  const MeshCoords d = mesh_coords(s, 2);
  REQUIRE((d.tp == 0 && d.ep == 1 && d.dp == 1));
  const MeshCoords e = mesh_coords(s, 4);
  REQUIRE((e.edp == 1 && e.dp == 2));
  REQUIRE(mesh_coords(s, 8).pp == 1);
}

TEST_CASE("mesh: every group kind partitions the world", "[mesh]") {
  const MeshSizes s{.pp = 2, .dp = 4, .tp = 2, .ep = 2};
  check_partition(s, &Mesh::tp_group, 2);
  check_partition(s, &Mesh::dp_group, 4);
  check_partition(s, &Mesh::ep_group, 4);  // EP × TP: the routed experts are split over both
  check_partition(s, &Mesh::edp_group, 2);
  check_partition(s, &Mesh::pp_group, 2);
  check_partition(s, &Mesh::model_group, 4);
}

TEST_CASE("mesh: explicit groups of an 8-rank DP4 x EP2 x TP2 layout", "[mesh]") {
  const MeshSizes s{.pp = 1, .dp = 4, .tp = 2, .ep = 2};
  const Mesh m = build_mesh(s, 5);  // tp 1, ep 0, edp 1
  REQUIRE(m.tp_group == std::vector<int>{4, 5});
  REQUIRE(m.dp_group == std::vector<int>{1, 3, 5, 7});
  REQUIRE(m.ep_group == std::vector<int>{4, 5, 6, 7});  // EP × TP ranks, TP fastest: expert index tp + TP · ep
  REQUIRE(m.edp_group == std::vector<int>{1, 5});
  REQUIRE(m.pp_group == std::vector<int>{5});
  REQUIRE(describe_mesh(s) == "PP1 x DP4 (EP2 x EDP2) x TP2 = 8 ranks, routed experts over EP x TP = 4 ranks");
}

TEST_CASE("mesh: DeepSeek-V3's PP16 x EP64 layout on 2048 ranks", "[mesh]") {
  const MeshSizes s{.pp = 16, .dp = 128, .tp = 1, .ep = 64};
  REQUIRE_NOTHROW(validate_mesh(s, 2048, 256));
  const Mesh m = build_mesh(s, 2047);
  REQUIRE(m.coords.pp == 15);
  REQUIRE(m.ep_group.size() == 64);
  REQUIRE(m.ep_group.front() == 2047 - 63);  // EP neighbours are adjacent ranks (8 nodes of 8)
  REQUIRE(m.edp_group == std::vector<int>{2047 - 64, 2047});
  REQUIRE(m.pp_group.size() == 16);
  REQUIRE(m.pp_group[0] == 2047 - 15 * 128);
  REQUIRE(m.dp_group.size() == 128);
}

TEST_CASE("mesh: rejected layouts name the problem", "[mesh]") {
  auto message = [](const MeshSizes& s, int world, int64_t experts) {
    try {
      validate_mesh(s, world, experts);
    } catch (const UserError& e) {
      return std::string(e.what());
    }
    return std::string("accepted");
  };
  REQUIRE_THAT(message({.pp = 1, .dp = 2, .tp = 1, .ep = 1}, 3, 8), Catch::Contains("started 3 ranks"));
  REQUIRE_THAT(message({.pp = 1, .dp = 6, .tp = 1, .ep = 4}, 6, 8), Catch::Contains("ep=4 must divide dp=6"));
  REQUIRE_THAT(message({.pp = 1, .dp = 4, .tp = 1, .ep = 4}, 4, 6), Catch::Contains("n_routed_experts=6"));
  REQUIRE_THAT(message({.pp = 0, .dp = 1, .tp = 1, .ep = 1}, 0, 8), Catch::Contains(">= 1"));
  REQUIRE_THAT(message({.pp = 1, .dp = 4, .tp = 2, .ep = 4}, 8, 12), Catch::Contains("ep=4 x parallel.tp=2"));
  REQUIRE(message({.pp = 2, .dp = 4, .tp = 2, .ep = 2}, 16, 8) == "accepted");
  REQUIRE_THROWS_AS(build_mesh({.pp = 1, .dp = 2, .tp = 1, .ep = 1}, 2), UserError);
}
