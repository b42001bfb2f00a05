// Exposed communication of a training step's MoE all-to-alls with parallel.overlap_a2a on and
// off, in the same run. Run under mpirun:
//
//   mpirun -np 4 --oversubscribe --bind-to none build/release/bench/bench_moe_overlap
//
// Every rank builds two Models of the same config and seed (trainer/model/model.h), one per
// setting, with expert parallelism over all ranks (EP = DP = world, so each rank holds E / world
// routed experts of every MoE layer) and a CommTimer each. Each step runs forward + backward of
// one synthetic micro-batch (random token ids, a seed per rank and step) on both models, the order
// alternating per step; both see the same batches. Per step and setting:
//   step      forward + backward, the slowest rank's time (barrier before)
//   exposed   CommTimer::take_exposed(): time blocked waiting on the MoE counts exchange,
//             dispatch and combine (transfers not hidden behind compute, and waiting for slower
//             peers), averaged over the ranks
// Medians over the timed steps are reported, with exposed / step and the step-time ratio.
// The optimizer and the router-bias update are not part of the step (the latter's DP all-reduce
// is blocking in both settings).
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "bench_mpi.h"
#include "kernels/error.h"
#include "parallel/comm_mpi.h"
#include "trainer/model/model.h"

using namespace dsx;
using dsx::bench::median;
using dsx::bench::now_s;
using dsx::bench::timed;

namespace {

struct Options {
  int64_t hidden = 256;
  int64_t experts = 16;
  int64_t top_k = 4;
  int64_t moe_intermediate = 256;
  int64_t layers = 2;
  int64_t vocab = 512;
  int64_t batch = 2;
  int64_t seq = 128;
  int steps = 8;
  int warmup = 1;
  uint64_t seed = 1;
};

double reduce_double(double mine, MPI_Op op) {
  double out = 0;
  MPI_Allreduce(&mine, &out, 1, MPI_DOUBLE, op, MPI_COMM_WORLD);
  return out;
}

// Every layer an MoE layer with one shared expert; the attention part small (2 heads, direct
// query projection), no MTP, no balance loss.
ModelConfig bench_config(const Options& opt) {
  ModelConfig c;
  c.vocab_size = opt.vocab;
  c.hidden_size = opt.hidden;
  c.intermediate_size = opt.moe_intermediate;  // unused: no dense layer
  c.num_hidden_layers = opt.layers;
  c.num_attention_heads = 2;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 32;
  c.qk_nope_head_dim = 16;
  c.qk_rope_head_dim = 16;
  c.v_head_dim = 16;
  c.n_routed_experts = opt.experts;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = opt.top_k;
  c.moe_intermediate_size = opt.moe_intermediate;
  c.first_k_dense_replace = 0;
  c.n_group = 1;
  c.topk_group = 1;
  c.num_nextn_predict_layers = 0;
  c.max_position_embeddings = std::max<int64_t>(opt.seq, 16);
  c.seq_aux_loss_alpha = 0.0;
  return c;
}

Batch random_batch(const Options& opt, int rank, int step) {
  std::mt19937_64 gen(opt.seed * 1000003 + static_cast<uint64_t>(rank) * 7919 + static_cast<uint64_t>(step));
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(opt.vocab - 1));
  std::vector<int32_t> inputs(static_cast<size_t>(opt.batch * opt.seq)), targets(inputs.size());
  for (int32_t& t : inputs) t = token(gen);
  for (int32_t& t : targets) t = token(gen);
  Batch b;
  b.inputs = Tensor::from<int32_t>(inputs, {opt.batch, opt.seq});
  b.targets = Tensor::from<int32_t>(targets, {opt.batch, opt.seq});
  return b;
}

// The store holds exactly this rank's routed experts, and the ranks together hold all of them
// once. Collective.
bool holds_only_local_experts(const Model& model, const ModelConfig& config, int rank, int n) {
  const LocalExperts local = local_experts(config.n_routed_experts, n, rank);
  int64_t held = 0;
  bool only_local = true;
  for (const Parameter& p : model.parameters()) {
    if (!p.spec.routed_expert) continue;
    ++held;
    only_local = only_local && local.holds(p.spec.shard.expert_index);
  }
  int64_t all_specs = 0;
  for (const ParamSpec& s : model_param_specs(config)) all_specs += s.routed_expert ? 1 : 0;
  int64_t held_by_all = 0;
  MPI_Allreduce(&held, &held_by_all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  const int mine = only_local && held * n == all_specs && held_by_all == all_specs ? 1 : 0;
  int everyone = 0;
  MPI_Allreduce(&mine, &everyone, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
  return everyone == 1;
}

struct Setting {
  const char* name;
  CommTimer timer;
  std::vector<double> step_s, exposed_mean_s, exposed_max_s, fraction;
  double bytes_per_step = 0;
  std::vector<double> losses;  // this rank's loss per step, for the agreement check
};

void run_step(Model& model, Setting& s, const Batch& batch, int n_ranks, bool record) {
  model.parameters().zero_grad();
  s.timer.take_exposed();
  s.timer.bytes_sent = 0;
  MPI_Barrier(MPI_COMM_WORLD);
  const double start = now_s();
  const Losses losses = model.forward(batch);
  model.backward(1.0);
  const double step = reduce_double(now_s() - start, MPI_MAX);
  const double exposed = s.timer.take_exposed();
  const double exposed_mean = reduce_double(exposed, MPI_SUM) / n_ranks;
  const double exposed_max = reduce_double(exposed, MPI_MAX);
  if (!record) return;
  s.step_s.push_back(step);
  s.exposed_mean_s.push_back(exposed_mean);
  s.exposed_max_s.push_back(exposed_max);
  s.fraction.push_back(exposed_mean / step);
  s.bytes_per_step = static_cast<double>(s.timer.bytes_sent);
  s.losses.push_back(losses.total);
}

int run(const Options& opt, int rank, int n) {
  const ModelConfig config = bench_config(opt);
  validate_model_config(config);
  MeshSizes sizes;
  sizes.dp = n;
  sizes.ep = n;
  validate_mesh(sizes, n, config.n_routed_experts);
  MeshComms comms = make_mpi_mesh_comms(build_mesh(sizes, rank), 300.0);

  Setting on{"overlap on", {}, {}, {}, {}, {}, 0, {}}, off{"overlap off", {}, {}, {}, {}, {}, 0, {}};
  auto parallel_for = [&](Setting& s, bool overlap) {
    ModelParallel p;
    p.ep = comms.ep.get();
    p.dp = comms.dp.get();
    p.overlap_a2a = overlap;
    p.timer = &s.timer;
    return p;
  };
  Model model_on(config, DType::f32, opt.seed, {}, {}, parallel_for(on, true));
  Model model_off(config, DType::f32, opt.seed, {}, {}, parallel_for(off, false));
  const bool experts_split = holds_only_local_experts(model_on, config, rank, n);

  for (int i = 0; i < opt.warmup + opt.steps; ++i) {
    const Batch batch = random_batch(opt, rank, i);
    const bool record = i >= opt.warmup;
    if (i % 2 == 0) {
      run_step(model_on, on, batch, n, record);
      run_step(model_off, off, batch, n, record);
    } else {
      run_step(model_off, off, batch, n, record);
      run_step(model_on, on, batch, n, record);
    }
  }
  // Two chunks change only how many rows each expert GEMM sees at once, not the math: the losses
  // agree to f32 rounding (1e-4 relative leaves room for a few ulps over a few hundred terms).
  double worst = 0;
  for (size_t i = 0; i < on.losses.size(); ++i) {
    worst = std::max(worst, std::abs(on.losses[i] - off.losses[i]) / std::max(1e-30, std::abs(off.losses[i])));
  }
  worst = reduce_double(worst, MPI_MAX);
  const bool agree = worst <= 1e-4;

  if (rank == 0) {
    const int64_t T = opt.batch * opt.seq;
    std::printf(
        "ranks %d (EP %d = DP), %lld MoE layers: hidden %lld, %lld experts (%lld per rank) top-%lld, "
        "moe_intermediate %lld, 1 shared expert; %lld tokens per rank per step; %d steps + %d warm-up\n",
        n, n, static_cast<long long>(opt.layers), static_cast<long long>(opt.hidden),
        static_cast<long long>(opt.experts), static_cast<long long>(opt.experts / n), static_cast<long long>(opt.top_k),
        static_cast<long long>(opt.moe_intermediate), static_cast<long long>(T), opt.steps, opt.warmup);
    std::printf("each rank holds only its routed experts: %s; all-to-all payload sent per rank per step: %.1f MB\n",
                experts_split ? "yes" : "NO", on.bytes_per_step / 1e6);
    for (const Setting* s : {&on, &off}) {
      std::printf(
          "%-12s step median %8.1f ms   exposed comm median %7.1f ms (mean of ranks; max rank %7.1f ms)   "
          "exposed/step %5.1f %%\n",
          s->name, median(s->step_s) * 1e3, median(s->exposed_mean_s) * 1e3, median(s->exposed_max_s) * 1e3,
          median(s->fraction) * 100);
    }
    std::printf("step time ratio on/off: %.3f   exposed fraction on/off: %.3f   losses agree: %s (max rel diff %.1e)\n",
                median(on.step_s) / median(off.step_s), median(on.fraction) / std::max(1e-12, median(off.fraction)),
                agree ? "yes" : "NO", worst);
  }
  return experts_split && agree ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  MpiSession mpi;
  Options opt;
  CLI::App app{
      "exposed MoE all-to-all time of forward+backward steps, parallel.overlap_a2a on vs off, expert parallelism "
      "over all ranks (run under mpirun)"};
  app.add_option("--hidden", opt.hidden, "model hidden size")->check(CLI::PositiveNumber);
  app.add_option("--experts", opt.experts, "routed experts per MoE layer (split evenly over the ranks)")
      ->check(CLI::PositiveNumber);
  app.add_option("--top-k", opt.top_k, "experts per token")->check(CLI::PositiveNumber);
  app.add_option("--moe-intermediate", opt.moe_intermediate, "expert MLP intermediate size")
      ->check(CLI::PositiveNumber);
  app.add_option("--layers", opt.layers, "decoder layers, all MoE")->check(CLI::PositiveNumber);
  app.add_option("--vocab", opt.vocab, "vocabulary size")->check(CLI::PositiveNumber);
  app.add_option("--batch", opt.batch, "sequences per rank per step")->check(CLI::PositiveNumber);
  app.add_option("--seq", opt.seq, "tokens per sequence")->check(CLI::PositiveNumber);
  app.add_option("--steps", opt.steps, "timed steps of each setting")->check(CLI::PositiveNumber);
  app.add_option("--warmup", opt.warmup, "untimed steps of each setting first")->check(CLI::NonNegativeNumber);
  app.add_option("--seed", opt.seed, "model and data seed");
  return bench::parse_and_run(app, argc, argv, mpi.world_rank(), "bench_moe_overlap", [&] { return run(opt, mpi.world_rank(), mpi.world_size()); });
}
