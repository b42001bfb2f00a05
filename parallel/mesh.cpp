#include "parallel/mesh.h"

#include <sstream>

#include "kernels/error.h"

namespace dsx {

int mesh_rank(const MeshSizes& s, const MeshCoords& c) {
  return c.tp + s.tp * (c.ep + s.ep * (c.edp + s.edp() * c.pp));
}

MeshCoords mesh_coords(const MeshSizes& s, int rank) {
  MeshCoords c;
  c.tp = rank % s.tp;
  rank /= s.tp;
  c.ep = rank % s.ep;
  rank /= s.ep;
  c.edp = rank % s.edp();
  c.pp = rank / s.edp();
  c.dp = c.ep + s.ep * c.edp;
  return c;
}

void validate_mesh(const MeshSizes& s, int world_size, int64_t n_routed_experts) {
  auto fail = [](const std::string& msg) { throw UserError("parallel: " + msg); };
  if (s.pp < 1 || s.dp < 1 || s.tp < 1 || s.ep < 1) {
    fail("pp, dp, tp and ep must all be >= 1 (got pp=" + std::to_string(s.pp) + " dp=" + std::to_string(s.dp) +
         " tp=" + std::to_string(s.tp) + " ep=" + std::to_string(s.ep) + ")");
  }
  if (s.dp % s.ep != 0) {
    fail("ep=" + std::to_string(s.ep) + " must divide dp=" + std::to_string(s.dp) +
         " (the expert-parallel group is carved out of data parallel)");
  }
  if (n_routed_experts > 0 && n_routed_experts % (s.ep * s.tp) != 0) {
    fail("model.n_routed_experts=" + std::to_string(n_routed_experts) +
         " is not divisible by parallel.ep=" + std::to_string(s.ep) +
         (s.tp > 1 ? " x parallel.tp=" + std::to_string(s.tp) + " (the routed experts are split over both)" : ""));
  }
  if (world_size != s.world()) {
    fail("the launcher started " + std::to_string(world_size) + " ranks but the recipe's layout " + describe_mesh(s) +
         " needs " + std::to_string(s.world()));
  }
}

Mesh build_mesh(const MeshSizes& s, int rank) {
  validate_mesh(s, s.world(), 0);
  if (rank < 0 || rank >= s.world()) {
    throw UserError("parallel: rank " + std::to_string(rank) + " is outside a world of " + std::to_string(s.world()));
  }
  Mesh m;
  m.sizes = s;
  m.rank = rank;
  m.coords = mesh_coords(s, rank);
  const MeshCoords me = m.coords;
  auto at = [&](int tp, int ep, int edp, int pp) { return mesh_rank(s, MeshCoords{tp, ep, edp, pp, 0}); };
  for (int t = 0; t < s.tp; ++t) m.tp_group.push_back(at(t, me.ep, me.edp, me.pp));
  for (int d = 0; d < s.dp; ++d) m.dp_group.push_back(at(me.tp, d % s.ep, d / s.ep, me.pp));
  for (int e = 0; e < s.ep; ++e) {
    for (int t = 0; t < s.tp; ++t) m.ep_group.push_back(at(t, e, me.edp, me.pp));
  }
  for (int r = 0; r < s.edp(); ++r) m.edp_group.push_back(at(me.tp, me.ep, r, me.pp));
  for (int p = 0; p < s.pp; ++p) m.pp_group.push_back(at(me.tp, me.ep, me.edp, p));
  for (int p = 0; p < s.pp; ++p) {
    for (int t = 0; t < s.tp; ++t) m.model_group.push_back(at(t, me.ep, me.edp, p));
  }
  return m;
}

std::string describe_mesh(const MeshSizes& s) {
  std::ostringstream os;
  os << "PP" << s.pp << " x DP" << s.dp << " (EP" << s.ep << " x EDP" << s.edp() << ") x TP" << s.tp << " = "
     << s.world() << " ranks";
  if (s.tp > 1) os << ", routed experts over EP x TP = " << s.ep * s.tp << " ranks";
  return os.str();
}

}  // namespace dsx
