// The process mesh: which ranks a rank shares each parallel group with.
//
// World = PP × DP × TP ranks. Experts are split over an EP group carved out of DP
// (EP divides DP; expert weights are replicated over EDP = DP / EP). Rank order, fastest-
// varying first: TP, EP, EDP, PP — so TP and EP neighbours are adjacent ranks (same node):
//
//   rank = tp + TP · (ep + EP · (edp + EDP · pp)),   dp = ep + EP · edp
//
// The routed experts are split over the TP ranks too: the expert-parallel group is the EP × TP
// ranks of one EDP replica (each TP rank dispatches its own share of the tokens), so expert
// weights are replicated over EDP only and n_routed_experts must divide by EP · TP.
//
// A pure function of (sizes, rank): no MPI here; communicators are built from these lists.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsx {

struct MeshSizes {
  int pp = 1;
  int dp = 1;
  int tp = 1;
  int ep = 1;
  int edp() const { return ep > 0 ? dp / ep : 0; }
  int world() const { return pp * dp * tp; }
};

struct MeshCoords {
  int tp = 0, ep = 0, edp = 0, pp = 0;
  int dp = 0;  // = ep + EP · edp
};

struct Mesh {
  MeshSizes sizes;
  int rank = 0;
  MeshCoords coords;
  // Each group lists its ranks in increasing order of the varying coordinate(s); a rank's
  // index in a group's list is its rank within that group.
  std::vector<int> tp_group;     // same pp, dp
  std::vector<int> dp_group;     // same pp, tp (dense gradients reduce here)
  std::vector<int> ep_group;     // same pp, edp: EP × TP ranks (all-to-all dispatch/combine)
  std::vector<int> edp_group;    // same pp, tp, ep (expert gradients reduce here)
  std::vector<int> pp_group;     // same tp, dp
  std::vector<int> model_group;  // same dp: the TP × PP ranks holding one model replica
};

int mesh_rank(const MeshSizes& sizes, const MeshCoords& coords);
MeshCoords mesh_coords(const MeshSizes& sizes, int rank);

// Throws dsx::UserError naming what is wrong (sizes not positive, world size not the product,
// EP not dividing DP, experts not divisible by EP, rank out of range). n_routed_experts = 0
// skips the expert check (dense models).
void validate_mesh(const MeshSizes& sizes, int world_size, int64_t n_routed_experts);
Mesh build_mesh(const MeshSizes& sizes, int rank);

// "PP16 x DP128 (EP64 x EDP2) x TP1 = 2048 ranks"; with TP: ", routed experts over EP x TP = N ranks"
std::string describe_mesh(const MeshSizes& sizes);

}  // namespace dsx
