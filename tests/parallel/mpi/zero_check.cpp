// Multi-rank checks of DistributedAdamW (trainer/optim/distributed_optimizer.h), run under mpirun
// by ctest (zero_tests.cmake).
//
//   zero_check equivalence   for every EP size the world allows and a set of configurations (ZeRO-1
//                            on/off, one or many buckets, gradients reported in backward order, in a
//                            rank-dependent order, or never; fp32/bf16 moments): 3 steps against the
//                            single-process AdamW run on the sum of every rank's gradients, which
//                            each rank computes itself (gradients are a function of (world rank,
//                            step, parameter, element))
//   zero_check ckpt DIR      trains 3 steps (ZeRO-1, small buckets), saves the optimizer state with
//                            every rank writing, loads it back into optimizers of other layouts
//                            (ZeRO-1 off; other bucket sizes), checks the moments and one more step;
//                            leaves the checkpoints in DIR/fp32 and DIR/bf16
//   zero_check ckpt-load DIR loads what `ckpt` left with this (different) world size and checks the
//                            same
//
// Tolerance: parameters and moments must match the reference to 1e-6 relative (to the tensor's
// largest magnitude). Gradients are multiples of 2^-10 below 2^-4, so their fp32 sums and the f64
// sums of squares behind the norm are exact in any order; the bound leaves room for the last bits of
// the clip scale should MPI ever sum the norm differently. Observed: identical (reported on rank 0).
//
// Exit status 0 when every check passed on every rank.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <unistd.h>
#include <vector>

#include "kernels/ops/elementwise.h"
#include "parallel/comm_mpi.h"
#include "parallel/mesh.h"
#include "trainer/checkpoint/checkpoint.h"
#include "trainer/optim/distributed_optimizer.h"
#include "trainer/optim/optimizer.h"

using namespace dsx;
namespace fs = std::filesystem;

namespace {

constexpr int64_t kExperts = 4;
constexpr uint64_t kSeed = 7;
constexpr double kTolerance = 1e-6;
constexpr int kSteps = 3;
const double kLr[] = {1e-2, 2e-2, 5e-3, 1e-2};

int g_rank = 0;
int g_checks = 0;
int g_failures = 0;
double g_worst_param_error = 0;

void expect(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr, "rank %d: FAILED %s\n", g_rank, what.c_str());
  }
}

// ---- the model: parameters of odd sizes, dense and expert, decayed or not, one buffer ----

ParamSpec make_spec(std::string name, Shape shape, ShardSpec shard = ShardSpec::replicated(), bool weight_decay = true,
                    bool trainable = true, InitKind init = InitKind::normal) {
  ParamSpec s;
  s.name = std::move(name);
  s.shape = std::move(shape);
  s.shard = shard;
  s.weight_decay = weight_decay;
  s.trainable = trainable;
  s.init = init;
  s.init_std = 0.1;
  s.routed_expert = shard.axis == ShardAxis::expert;
  return s;
}

std::vector<ParamSpec> global_specs() {
  std::vector<ParamSpec> specs;
  specs.push_back(make_spec("model.embed_tokens.weight", {37, 6}));
  for (int layer = 0; layer < 2; ++layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".";
    specs.push_back(make_spec(p + "input_layernorm.weight", {6}, {}, false, true, InitKind::ones));
    specs.push_back(make_spec(p + "self_attn.o_proj.weight", {6, 11}));
    // weight_decay in the spec, but the recipe's "*.bias" pattern turns it off
    specs.push_back(make_spec(p + "self_attn.o_proj.bias", {6}));
    specs.push_back(make_spec(p + "mlp.gate.weight", {kExperts, 6}));
    specs.push_back(make_spec(p + "mlp.gate.e_score_correction_bias", {kExperts}, {}, false, false, InitKind::zeros));
    for (int64_t e = 0; e < kExperts; ++e) {
      const std::string x = p + "mlp.experts." + std::to_string(e) + ".";
      specs.push_back(make_spec(x + "up_proj.weight", {5, 6}, ShardSpec::expert_parallel(e, kExperts)));
      specs.push_back(make_spec(x + "down_proj.weight", {6, 5}, ShardSpec::expert_parallel(e, kExperts)));
    }
  }
  specs.push_back(make_spec("model.norm.weight", {6}, {}, false, true, InitKind::ones));
  specs.push_back(make_spec("lm_head.weight", {101, 13}));
  return specs;
}

// Whether world rank r of a mesh holds the parameter (experts live on one EP rank each).
bool holds(const MeshSizes& sizes, int r, const ParamSpec& spec) {
  if (spec.shard.axis != ShardAxis::expert) return true;
  const int64_t per_rank = spec.shard.num_experts / sizes.ep;
  return spec.shard.expert_index / per_rank == mesh_coords(sizes, r).ep;
}

void add_specs(ParameterStore& store, const MeshSizes* sizes, int rank) {
  for (const ParamSpec& s : global_specs()) {
    if (sizes == nullptr || holds(*sizes, rank, s)) store.add(s);
  }
}

uint64_t name_hash(const std::string& name) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h;
}

// World rank r's gradient of element i at step t: k / 1024 with |k| <= 30, scaled down 64-fold on
// step 1 so that step runs unclipped and the later ones clipped.
double gradient(int t, const std::string& name, int64_t i, int r) {
  const uint64_t k = (name_hash(name) % 97 + 131 * static_cast<uint64_t>(i) + 977 * static_cast<uint64_t>(t) +
                      389 * static_cast<uint64_t>(r)) %
                     61;
  const double g = (static_cast<double>(k) - 30.0) / 1024.0;
  return t == 1 ? g / 64.0 : g;
}

// The sum over every world rank holding the parameter (exact: see the tolerance note).
void fill_gradients(ParameterStore& store, const MeshSizes& sizes, int t, const std::vector<int>& ranks) {
  for (Parameter& p : store) {
    if (!p.spec.trainable) continue;
    std::vector<double> g(static_cast<size_t>(p.value.numel()), 0.0);
    for (int r : ranks) {
      if (!holds(sizes, r, p.spec)) continue;
      for (size_t i = 0; i < g.size(); ++i) g[i] += gradient(t, p.spec.name, static_cast<int64_t>(i), r);
    }
    p.grad.copy_from(Tensor::from<double>(std::span<const double>(g), p.value.shape()));
  }
}

std::vector<int> all_ranks(const MeshSizes& sizes) {
  std::vector<int> r(static_cast<size_t>(sizes.world()));
  for (int i = 0; i < sizes.world(); ++i) r[static_cast<size_t>(i)] = i;
  return r;
}

OptimSection optim_config(MomentPrecision moments) {
  OptimSection c;
  c.beta1 = 0.9;
  c.beta2 = 0.95;
  c.eps = 1e-8;
  c.weight_decay = 0.1;
  c.grad_clip = 0.5;
  c.moments = moments;
  return c;
}

// The single-process AdamW on the whole model (every expert), fed the sums.
struct Reference {
  ParameterStore store{DType::f32};
  std::unique_ptr<AdamW> adamw;
  std::vector<double> norms;

  explicit Reference(MomentPrecision moments) {
    add_specs(store, nullptr, 0);
    store.initialize(kSeed);
    adamw = std::make_unique<AdamW>(store, optim_config(moments));
  }
  void step(const MeshSizes& sizes, int t) {
    store.zero_grad();
    fill_gradients(store, sizes, t, all_ranks(sizes));
    norms.push_back(adamw->step(kLr[t - 1]));
  }
  Tensor moment(const std::string& name) {
    for (const auto& s : adamw->state_tensors()) {
      if (s.name == name) return *s.tensor;
    }
    throw std::logic_error("no reference moment " + name);
  }
};

// max |a - b| / max |b|, over tensors of equal numel.
double relative_error(const Tensor& got, const Tensor& want) {
  const std::vector<double> a = got.to_vector(), b = want.to_vector();
  if (a.size() != b.size()) return INFINITY;
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(a[i] - b[i]));
    scale = std::max(scale, std::abs(b[i]));
  }
  return scale > 0 ? diff / scale : diff;
}

void expect_params_match(ParameterStore& local, Reference& ref, const std::string& what) {
  for (Parameter& p : local) {
    const double err = relative_error(p.value, ref.store.at(p.spec.name).value);
    g_worst_param_error = std::max(g_worst_param_error, err);
    expect(err <= kTolerance, what + ": parameter " + p.spec.name + " relative error " + std::to_string(err));
  }
}

// The box of a whole (1-D or 2-D) tensor that a checkpoint slice holds.
Tensor box_of(const Tensor& whole, const ckpt::TensorSlice& s) {
  const Tensor rows = whole.slice(s.offset[0], s.offset[0] + s.data.dim(0));
  if (s.data.ndim() == 1) return rows;
  Tensor out = Tensor::empty(s.data.shape(), whole.dtype());
  ops::copy_columns(rows, s.offset[1], out);
  return out;
}

// Every moment slice (a box of its parameter's shape) equals the reference's moment there
// (exact when `exact`).
void expect_moments_match(DistributedAdamW& opt, Reference& ref, bool exact, const std::string& what) {
  for (const ckpt::TensorSlice& s : opt.state_slices()) {
    const Tensor want = box_of(ref.moment(s.name), s);
    const double err = relative_error(s.data, want);
    expect(exact ? err == 0 : err <= kTolerance, what + ": " + s.name + " relative error " + std::to_string(err));
  }
}

// Each moment element is in exactly one rank's slices: per tensor, the slice lengths add up over
// the world to numel (ckpt::save additionally refuses overlaps).
void expect_slices_cover(DistributedAdamW& opt, Communicator& world, const std::string& what) {
  const std::vector<ParamSpec> specs = global_specs();
  std::map<std::string, size_t> index;
  for (size_t i = 0; i < specs.size(); ++i) {
    index["optim.exp_avg." + specs[i].name] = 2 * i;
    index["optim.exp_avg_sq." + specs[i].name] = 2 * i + 1;
  }
  Tensor counts = Tensor::zeros({2 * static_cast<int64_t>(specs.size())}, DType::i64);
  for (const ckpt::TensorSlice& s : opt.state_slices()) counts.data<int64_t>()[index.at(s.name)] += s.data.numel();
  world.all_reduce(counts).wait();
  for (size_t i = 0; i < specs.size(); ++i) {
    const int64_t want = specs[i].trainable ? specs[i].numel() : 0;
    for (int k = 0; k < 2; ++k) {
      const int64_t got = counts.data<int64_t>()[2 * i + k];
      expect(got == want, what + ": moments of " + specs[i].name + " cover " + std::to_string(got) + " of " +
                              std::to_string(want) + " elements over the world");
    }
  }
}

enum class Report { backward, scrambled, never };

// This rank's gradients of step t, reported as the model would (or not at all), then the step.
double distributed_step(DistributedAdamW& opt, ParameterStore& local, const MeshSizes& sizes, int rank, int t,
                        Report report) {
  local.zero_grad();
  fill_gradients(local, sizes, t, {rank});
  std::vector<Parameter*> order;
  for (Parameter& p : local) order.push_back(&p);
  std::reverse(order.begin(), order.end());  // the backward's order; includes the buffer (ignored)
  if (report == Report::scrambled) {
    // A different order on every rank: buckets must still start in the same order everywhere.
    std::rotate(order.begin(), order.begin() + (5 * rank) % static_cast<int>(order.size()), order.end());
    if (rank % 2 == 1) std::reverse(order.begin(), order.end());
  }
  if (report != Report::never) {
    for (Parameter* p : order) {
      opt.grad_ready(*p);
      opt.progress();
    }
    Parameter& first = **std::find_if(order.begin(), order.end(), [](Parameter* p) { return p->spec.trainable; });
    bool threw = false;
    try {
      opt.grad_ready(first);
    } catch (const std::logic_error&) {
      threw = true;
    }
    expect(threw, "grad_ready twice in a step throws std::logic_error");
  }
  return opt.step(kLr[t - 1]);
}

struct RunConfig {
  std::string label;
  bool zero1;
  int64_t bucket_bytes;
  Report report;
  MomentPrecision moments;
};

void check_equivalence(const MeshSizes& sizes, MeshComms& comms, const RunConfig& rc) {
  const int rank = comms.world->rank();
  const std::string what = rc.label + " (ep " + std::to_string(sizes.ep) + ")";
  Reference ref(rc.moments);
  ParameterStore local(DType::f32);
  add_specs(local, &sizes, rank);
  local.initialize(kSeed);
  DistributedAdamW opt(local, optim_config(rc.moments), *comms.dp, *comms.edp, *comms.world,
                       {.zero1 = rc.zero1, .bucket_bytes = rc.bucket_bytes});
  // The dense parameters alone fill 4 buckets of 128 elements; experts add at least one.
  if (rc.bucket_bytes < 1024) expect(opt.bucket_count() >= 5, what + ": several buckets");
  for (int t = 1; t <= kSteps; ++t) {
    const double norm = distributed_step(opt, local, sizes, rank, t, rc.report);
    ref.step(sizes, t);
    const double want = ref.norms.back();
    expect(std::abs(norm - want) <= 1e-12 * want, what + ": step " + std::to_string(t) + " norm " +
                                                     std::to_string(norm) + " vs " + std::to_string(want));
    expect_params_match(local, ref, what + " step " + std::to_string(t));
  }
  // The steps exercised both sides of the clip.
  const double clip = optim_config(rc.moments).grad_clip;
  expect(ref.norms[0] < clip && ref.norms[1] > clip && ref.norms[2] > clip, what + ": norms straddle the clip");
  expect(opt.steps_taken() == kSteps, what + ": steps_taken");
  expect_moments_match(opt, ref, false, what);
  expect_slices_cover(opt, *comms.world, what);
  expect(opt.take_exposed_comm_s() >= 0, what + ": exposed comm time");
  expect(opt.take_exposed_comm_s() == 0, what + ": take_exposed_comm_s resets");
}

int run_equivalence(Communicator& world_comm) {
  const int world = world_comm.size();
  const std::vector<RunConfig> configs = {
      {"zero1, one bucket per group, backward order", true, 1 << 20, Report::backward, MomentPrecision::fp32},
      {"zero1, small buckets, backward order", true, 512, Report::backward, MomentPrecision::fp32},
      {"zero1, small buckets, never reported", true, 512, Report::never, MomentPrecision::fp32},
      {"zero1, small buckets, rank-dependent order, bf16 moments", true, 300, Report::scrambled,
       MomentPrecision::bf16},
      {"no zero, small buckets, backward order", false, 512, Report::backward, MomentPrecision::fp32},
      {"no zero, one bucket, never reported", false, 1 << 20, Report::never, MomentPrecision::fp32},
      {"no zero, small buckets, rank-dependent order, bf16 moments", false, 400, Report::scrambled,
       MomentPrecision::bf16},
  };
  for (int ep = 1; ep <= world; ep *= 2) {
    if (world % ep != 0 || kExperts % ep != 0) continue;
    const MeshSizes sizes{.pp = 1, .dp = world, .tp = 1, .ep = ep};
    MeshComms comms = make_mpi_mesh_comms(build_mesh(sizes, world_comm.rank()), 30.0);
    for (const RunConfig& rc : configs) check_equivalence(sizes, comms, rc);
  }
  return 0;
}

// ---- checkpoints ----

const char* moments_name(MomentPrecision m) { return m == MomentPrecision::bf16 ? "bf16" : "fp32"; }

std::string shared_attempt_id(Communicator& world) {
  Tensor id = Tensor::full({1}, static_cast<double>(::getpid()), DType::i64);
  world.broadcast(id, 0).wait();
  return std::to_string(static_cast<int64_t>(id.item()));
}

// A fresh optimizer of another layout over a store holding the reference's current values loads
// the checkpoint: its moments must be the reference's exactly, and one more step must match.
void check_load(const fs::path& dir, const MeshSizes& sizes, MeshComms& comms, Reference& ref,
                DistributedOptimizerOptions layout, MomentPrecision moments, const std::string& what) {
  const int rank = comms.world->rank();
  ParameterStore local(DType::f32);
  add_specs(local, &sizes, rank);
  for (Parameter& p : local) p.value.copy_from(ref.store.at(p.spec.name).value);
  DistributedAdamW opt(local, optim_config(moments), *comms.dp, *comms.edp, *comms.world, layout);
  ckpt::CheckpointReader reader(dir);
  reader.read(opt.state_requests());
  opt.set_steps_taken(reader.step());
  expect_moments_match(opt, ref, true, what + ": loaded moments");
  const int t = static_cast<int>(reader.step()) + 1;
  const double norm = distributed_step(opt, local, sizes, rank, t, Report::backward);
  ref.step(sizes, t);
  expect(std::abs(norm - ref.norms.back()) <= 1e-12 * ref.norms.back(), what + ": norm after loading");
  expect_params_match(local, ref, what + ": step after loading");
}

std::vector<DistributedOptimizerOptions> load_layouts() {
  return {{.zero1 = false, .bucket_bytes = 1 << 20}, {.zero1 = true, .bucket_bytes = 200}};
}

std::string layout_name(const DistributedOptimizerOptions& o) {
  return std::string(o.zero1 ? "zero1" : "no zero") + ", buckets of " + std::to_string(o.bucket_bytes) + " B";
}

int run_checkpoint(Communicator& world_comm, const fs::path& root) {
  const int world = world_comm.size();
  const MeshSizes sizes{.pp = 1, .dp = world, .tp = 1, .ep = 2};
  MeshComms comms = make_mpi_mesh_comms(build_mesh(sizes, world_comm.rank()), 30.0);
  const int rank = comms.world->rank();
  for (MomentPrecision moments : {MomentPrecision::fp32, MomentPrecision::bf16}) {
    const std::string what = std::string("checkpoint, ") + moments_name(moments) + " moments";
    Reference ref(moments);
    ParameterStore local(DType::f32);
    add_specs(local, &sizes, rank);
    local.initialize(kSeed);
    DistributedAdamW opt(local, optim_config(moments), *comms.dp, *comms.edp, *comms.world,
                         {.zero1 = true, .bucket_bytes = 512});
    for (int t = 1; t <= kSteps; ++t) {
      distributed_step(opt, local, sizes, rank, t, Report::backward);
      ref.step(sizes, t);
    }
    const ckpt::CheckpointState state{
        .step = opt.steps_taken(), .metadata = {{"world", world}, {"ep", sizes.ep}}, .recipe_yaml = ""};
    const std::vector<ckpt::TensorSlice> slices = opt.state_slices();
    const fs::path dir = ckpt::save(root / moments_name(moments), state, slices,
                                    {.writer_index = rank,
                                     .n_writers = world,
                                     .barrier = [&] { comms.world->barrier().wait(); },
                                     .keep_last = 1,
                                     .attempt_id = shared_attempt_id(*comms.world)});
    for (const DistributedOptimizerOptions& layout : load_layouts()) {
      Reference again(moments);
      for (int t = 1; t <= kSteps; ++t) again.step(sizes, t);
      check_load(dir, sizes, comms, again, layout, moments, what + ", loaded as " + layout_name(layout));
    }
  }
  return 0;
}

// Loads what run_checkpoint saved with another world size.
int run_checkpoint_load(Communicator& world_comm, const fs::path& root) {
  for (MomentPrecision moments : {MomentPrecision::fp32, MomentPrecision::bf16}) {
    const auto dir = ckpt::latest(root / moments_name(moments));
    if (!dir) throw std::runtime_error("no checkpoint under " + (root / moments_name(moments)).string());
    const nlohmann::json meta = ckpt::read_manifest(*dir).metadata;
    const MeshSizes saved{.pp = 1, .dp = meta.at("world").get<int>(), .tp = 1, .ep = meta.at("ep").get<int>()};
    const MeshSizes sizes{.pp = 1, .dp = world_comm.size(), .tp = 1, .ep = saved.ep};
    expect(saved.world() != sizes.world(), "the checkpoint was written by another world size");
    MeshComms comms = make_mpi_mesh_comms(build_mesh(sizes, world_comm.rank()), 30.0);
    for (const DistributedOptimizerOptions& layout : load_layouts()) {
      Reference ref(moments);
      for (int t = 1; t <= kSteps; ++t) ref.step(saved, t);
      check_load(*dir, sizes, comms, ref, layout, moments,
                 std::string("checkpoint of ") + std::to_string(saved.world()) + " ranks, " + moments_name(moments) +
                     " moments, loaded by " + std::to_string(sizes.world()) + " as " + layout_name(layout));
    }
  }
  return 0;
}

int usage() {
  std::fprintf(stderr, "usage: zero_check equivalence | ckpt DIR | ckpt-load DIR\n");
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession session;
  g_rank = session.world_rank();
  const std::string mode = argc > 1 ? argv[1] : "";
  int failures = 0;
  {
    auto world = make_mpi_world_communicator(30.0);
    try {
      if (mode == "equivalence" && argc == 2) {
        run_equivalence(*world);
      } else if (mode == "ckpt" && argc == 3) {
        run_checkpoint(*world, argv[2]);
      } else if (mode == "ckpt-load" && argc == 3) {
        run_checkpoint_load(*world, argv[2]);
      } else {
        return usage();
      }
    } catch (const std::exception& e) {
      expect(false, std::string("exception: ") + e.what());
    }
    Tensor total = Tensor::full({1}, static_cast<double>(g_failures), DType::f64);
    world->all_reduce(total).wait();
    Tensor worst = Tensor::full({1}, g_worst_param_error, DType::f64);
    Tensor all_worst = Tensor::empty({world->size()}, DType::f64);
    world->all_gather(worst, all_worst).wait();
    failures = static_cast<int>(total.item());
    if (g_rank == 0) {
      const std::vector<double> w = all_worst.to_vector();
      std::printf("zero_check %s: %d checks on rank 0, %d failures over %d ranks, worst parameter relative error %.3g\n",
                  mode.c_str(), g_checks, failures, world->size(), *std::max_element(w.begin(), w.end()));
    }
  }
  return failures == 0 ? 0 : 1;
}
