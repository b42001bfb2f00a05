// Training schedules (trainer/train/schedule.h): gradient accumulation, 1F1B, zero-bubble and DualPipeV, checked as
// data — order, in-flight bounds, and that every set of per-stage 1F1B schedules runs to completion when each run of
// transfers is one group with rendezvous semantics (the trainer's rule).
#include <catch2/catch.hpp>

#include <algorithm>
#include <limits>
#include <map>
#include <set>
#include <string>

#include "trainer/model/pipeline_stage.h"
#include "trainer/train/schedule.h"

using namespace dsx;
using K = Action::Kind;

namespace {

std::vector<std::vector<Action>> all_stages(int64_t n, int stages, bool mtp) {
  std::vector<std::vector<Action>> out;
  for (int s = 0; s < stages; ++s) out.push_back(one_f_one_b_schedule(n, stages, s, mtp));
  return out;
}

}  // namespace

TEST_CASE("one stage of 1F1B is gradient accumulation", "[schedule]") {
  for (int64_t n : {1, 2, 7}) CHECK(one_f_one_b_schedule(n, 1, 0, true) == gradient_accumulation_schedule(n));
}

TEST_CASE("1F1B reads as the textbook schedule", "[schedule]") {
  // Two stages, three micro-batches, MTP: stage 0 warms up with one forward.
  CHECK(to_string(one_f_one_b_schedule(3, 2, 0, true)) ==
        "F0 SA0>1 SE0>1 F1 SA1>1 SE1>1 RG0<1 REG0<1 BW0 F2 SA2>1 SE2>1 RG1<1 REG1<1 BW1 RG2<1 REG2<1 BW2 OPT");
  CHECK(to_string(one_f_one_b_schedule(3, 2, 1, true)) ==
        "RA0<0 RE0<0 F0 BW0 SG0>0 SEG0>0 RA1<0 RE1<0 F1 BW1 SG1>0 SEG1>0 RA2<0 RE2<0 F2 BW2 SG2>0 SEG2>0 OPT");
  // A middle stage of four (warm-up 2): the MTP embeddings pass through with the activations.
  CHECK(to_string(one_f_one_b_schedule(3, 4, 1, true)) ==
        "RA0<0 RE0<0 F0 SA0>2 SE0>2 RA1<0 RE1<0 F1 SA1>2 SE1>2 RA2<0 RE2<0 F2 SA2>2 SE2>2 RG0<2 REG0<2 BW0 SG0>0 "
        "SEG0>0 RG1<2 REG1<2 BW1 SG1>0 SEG1>0 RG2<2 REG2<2 BW2 SG2>0 SEG2>0 OPT");
  CHECK(to_string(one_f_one_b_schedule(2, 3, 1, false)) ==
        "RA0<0 F0 SA0>2 RA1<0 F1 SA1>2 RG0<2 BW0 SG0>0 RG1<2 BW1 SG1>0 OPT");
}

TEST_CASE("1F1B: every micro-batch once forward then backward, at most stages - stage in flight", "[schedule]") {
  for (int stages : {1, 2, 3, 4, 8}) {
    for (int64_t n : {1, 2, 3, 4, 5, 8, 13}) {
      for (int s = 0; s < stages; ++s) {
        INFO("stages " << stages << ", stage " << s << ", micro-batches " << n);
        const std::vector<Action> actions = one_f_one_b_schedule(n, stages, s, true);
        std::set<int64_t> in_flight, done;
        size_t most = 0;
        for (const Action& a : actions) {
          CHECK(a.stage == s);
          if (a.kind == K::forward) {
            CHECK(!in_flight.contains(a.micro_batch));
            CHECK(!done.contains(a.micro_batch));
            in_flight.insert(a.micro_batch);
            most = std::max(most, in_flight.size());
          } else if (a.kind == K::backward) {
            CHECK(in_flight.erase(a.micro_batch) == 1);
            done.insert(a.micro_batch);
          }
        }
        CHECK(in_flight.empty());
        CHECK(done.size() == static_cast<size_t>(n));
        CHECK(most == static_cast<size_t>(std::min<int64_t>(stages - s, n)));
        CHECK(max_in_flight(actions) == std::min<int64_t>(stages - s, n));
        CHECK(actions.back().kind == K::optimizer_step);
      }
    }
  }
}

TEST_CASE("1F1B runs to completion on every layout, with and without MTP", "[schedule]") {
  for (int stages : {1, 2, 3, 4, 5, 8, 16}) {
    for (int64_t n : {1, 2, 3, 4, 7, 8, 16, 33}) {
      for (bool mtp : {false, true}) {
        INFO("stages " << stages << ", micro-batches " << n << ", mtp " << mtp);
        CHECK(pipeline_runs_to_completion(all_stages(n, stages, mtp)).empty());
      }
    }
  }
}

TEST_CASE("the deadlock check finds a stuck schedule", "[schedule]") {
  // Each stage posts a receive, then a send its peer waits for; a stage's groups complete in
  // order (one communication stream), so each send waits behind a receive nobody will serve.
  std::vector<std::vector<Action>> stuck = {
      {{K::recv_grad, 0, 0, 1}, {K::forward, 0, 0}, {K::send_activation, 0, 0, 1}},
      {{K::recv_activation, 0, 1, 0}, {K::forward, 0, 1}, {K::send_grad, 0, 1, 0}}};
  CHECK(pipeline_runs_to_completion(stuck) == "stage 0 waits at the end, RG0<1 in flight; stage 1 waits at F0");
  // A send nobody receives.
  CHECK(pipeline_runs_to_completion({{{K::send_activation, 0, 0, 1}}, {{K::forward, 0, 1}}}) ==
        "stage 0 waits at the end, SA0>1 in flight");
  CHECK(pipeline_runs_to_completion({{{K::send_activation, 0, 0, 0}}}) == "stage 0: SA0>0 has no valid peer");
  // Two sends received in the other order: non-blocking MPI matches them by tag, NCCL by order
  // (the 1F1B, zero-bubble and DualPipeV tests above run with this check under the in-order rule).
  const std::vector<std::vector<Action>> crossed = {
      {{K::forward, 0, 0}, {K::send_activation, 0, 0, 1}, {K::send_mtp_embedding, 0, 0, 1}},
      {{K::recv_mtp_embedding, 0, 1, 0}, {K::recv_activation, 0, 1, 0}, {K::forward, 0, 1}}};
  CHECK(pipeline_runs_to_completion(crossed, TransferRule::in_order) ==
        "stage 0 posts its sends to stage 1 in another order than stage 1 posts the receives (SA0>1 against SE0>1): "
        "NCCL, which pairs them by order, would mix them up");
  CHECK(pipeline_runs_to_completion(crossed, TransferRule::independent).empty());
}

TEST_CASE("zero-bubble: input passes then weight passes in micro-batch order, 1F1B's memory bound", "[schedule]") {
  CHECK(to_string(zero_bubble_schedule(3, 2, 0, false)) ==
        "F0 SA0>1 F1 SA1>1 RG0<1 B0 W0 F2 SA2>1 RG1<1 B1 RG2<1 W1 B2 W2 OPT");
  CHECK(to_string(zero_bubble_schedule(3, 2, 1, false)) ==
        "RA0<0 F0 B0 SG0>0 RA1<0 W0 F1 B1 SG1>0 RA2<0 W1 F2 B2 SG2>0 W2 OPT");
  for (int stages : {1, 2, 3, 4, 8}) {
    for (int64_t n : {1, 2, 3, 8, 13}) {
      for (int s = 0; s < stages; ++s) {
        INFO("stages " << stages << ", stage " << s << ", micro-batches " << n);
        const std::vector<Action> actions = zero_bubble_schedule(n, stages, s, true);
        std::vector<int64_t> forwards, inputs, weights;
        for (const Action& a : actions) {
          if (a.kind == K::forward) forwards.push_back(a.micro_batch);
          if (a.kind == K::backward_input) {
            CHECK(std::count(forwards.begin(), forwards.end(), a.micro_batch) == 1);
            inputs.push_back(a.micro_batch);
          }
          if (a.kind == K::backward_weight) {
            CHECK(std::count(inputs.begin(), inputs.end(), a.micro_batch) == 1);
            weights.push_back(a.micro_batch);
          }
          CHECK(a.kind != K::backward);
        }
        std::vector<int64_t> order(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = i;
        CHECK(forwards == order);
        CHECK(inputs == order);
        CHECK(weights == order);  // each weight sees its micro-batches in order: 1F1B's bits
        CHECK(max_in_flight(actions) == std::min<int64_t>(stages - s, n));
      }
    }
  }
}

TEST_CASE("zero-bubble on the clock: each stage after the first hides one weight pass", "[schedule]") {
  // The weight passes fill what 1F1B's stages spend waiting for gradients in the cool-down:
  // (n + P - 1)(F + B + W) - (P - 1) W, for any costs; deadlock-free on every layout.
  for (const ActionCosts& costs : {ActionCosts{1, 1, 1}, ActionCosts{1, 2, 2}, ActionCosts{2, 1, 0.5}}) {
    for (int stages : {1, 2, 3, 4, 8, 16}) {
      for (int64_t n : {1, 3, 8, 33}) {
        for (bool mtp : {false, true}) {
          INFO("stages " << stages << ", micro-batches " << n << ", mtp " << mtp << ", costs " << costs.forward << "/"
                         << costs.backward_input << "/" << costs.backward_weight);
          std::vector<std::vector<Action>> schedules;
          for (int s = 0; s < stages; ++s) schedules.push_back(zero_bubble_schedule(n, stages, s, mtp));
          const PipelineRun run = run_pipeline(schedules, costs);
          CHECK(run.stuck.empty());
          const double per_micro_batch = costs.forward + costs.backward_input + costs.backward_weight;
          CHECK(run.makespan == Approx(static_cast<double>(n + stages - 1) * per_micro_batch -
                                       static_cast<double>(stages - 1) * costs.backward_weight));
        }
      }
    }
  }
}

TEST_CASE("pipeline stages split the layers contiguously, extra layers first", "[schedule]") {
  const PipelineStage a = pipeline_stage(61, 16, 0), b = pipeline_stage(61, 16, 12), c = pipeline_stage(61, 16, 15);
  CHECK(a.first_layer == 0);
  CHECK(a.end_layer == 4);     // 61 = 13·4 + 3·3
  CHECK(b.first_layer == 48);  // stage 12 is the last with 4
  CHECK(b.end_layer == 52);
  CHECK(c.first_layer == 58);
  CHECK(c.end_layer == 61);
  int64_t next = 0;
  for (int s = 0; s < 16; ++s) {
    const PipelineStage st = pipeline_stage(61, 16, s);
    CHECK(st.first_layer == next);
    CHECK(st.layers() >= 3);
    next = st.end_layer;
  }
  CHECK(next == 61);
  CHECK_THROWS_WITH(pipeline_stage(4, 5, 0), Catch::Contains("4 decoder layers cannot fill 5 pipeline stages"));
  CHECK_THROWS_AS(pipeline_stage(4, 2, 2), std::invalid_argument);
  CHECK(describe_pipeline(4, 1, 2) == "stage 0/2: embedding, layers 0-1 | stage 1/2: layers 2-3, head + 1 MTP");
}

TEST_CASE("1F1B on the clock: makespan (n + P - 1)(F + B + W), bubble (P - 1) / (n + P - 1)", "[schedule]") {
  // The textbook figures of 1F1B with equal stages, for uneven F/B/W costs too: the clocked run
  // of the very action lists the trainer executes reproduces them, transfers included.
  for (const ActionCosts& costs : {ActionCosts{1, 1, 1}, ActionCosts{1, 2, 2}, ActionCosts{2, 1, 0.5}}) {
    for (int stages : {1, 2, 4, 8}) {
      for (int64_t n : {1, 3, 8, 32}) {
        INFO("stages " << stages << ", micro-batches " << n << ", costs " << costs.forward << "/"
                       << costs.backward_input << "/" << costs.backward_weight);
        std::vector<std::vector<Action>> schedules;
        for (int s = 0; s < stages; ++s) schedules.push_back(one_f_one_b_schedule(n, stages, s, true));
        const PipelineRun run = run_pipeline(schedules, costs);
        const double per_micro_batch = costs.forward + costs.backward_input + costs.backward_weight;
        CHECK(run.stuck.empty());
        CHECK(run.makespan == Approx(static_cast<double>(n + stages - 1) * per_micro_batch));
        CHECK(run.bubble ==
              Approx(static_cast<double>(stages - 1) / static_cast<double>(n + stages - 1)).margin(1e-12));
      }
    }
  }
}

TEST_CASE("the timeline of 1F1B draws as the textbook picture", "[schedule]") {
  std::vector<std::vector<Action>> schedules;
  for (int s = 0; s < 3; ++s) schedules.push_back(one_f_one_b_schedule(4, 3, s, false));
  // forward 1 unit, backward 2 (input 1 + weight 1): warm-up, steady 1F1B, cool-down
  CHECK(draw_timeline(run_pipeline(schedules)) ==
        "stage  0 |012....aa3bb.cc.dd|\n"
        "stage  1 |.01..aa2bb3cc.dd..|\n"
        "stage  2 |..0aa1bb2cc3dd....|\n");
}

namespace {

std::vector<std::vector<Action>> dualpipev_ranks(int64_t n, int ranks) {
  std::vector<std::vector<Action>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(dualpipev_schedule(n, ranks, r));
  return out;
}

}  // namespace

TEST_CASE("DualPipeV: each chunk runs its micro-batches in order, every weight pass once after its input pass",
          "[schedule]") {
  for (int ranks : {1, 2, 3, 4, 8}) {
    for (int64_t n : {int64_t{2} * ranks, int64_t{2} * ranks + 1, int64_t{3} * ranks, int64_t{33}}) {
      for (int r = 0; r < ranks; ++r) {
        INFO("rank " << r << " of " << ranks << ", micro-batches " << n);
        const std::vector<Action> a = dualpipev_schedule(n, ranks, r);
        for (int chunk : {0, 1}) {
          std::vector<int64_t> forwards, backwards, weights;  // in order of appearance
          std::set<int64_t> input_only;
          for (const Action& x : a) {
            if (x.chunk != chunk) continue;
            if (x.kind == K::forward) forwards.push_back(x.micro_batch);
            if (x.kind == K::backward || x.kind == K::backward_input) {
              CHECK(std::count(forwards.begin(), forwards.end(), x.micro_batch) == 1);  // forward first
              backwards.push_back(x.micro_batch);
              if (x.kind == K::backward_input) input_only.insert(x.micro_batch);
            }
            if (x.kind == K::backward_weight) {
              CHECK(input_only.erase(x.micro_batch) == 1);  // after its input pass, once
              weights.push_back(x.micro_batch);
            }
          }
          std::vector<int64_t> all(static_cast<size_t>(n));
          for (int64_t i = 0; i < n; ++i) all[static_cast<size_t>(i)] = i;
          CHECK(forwards == all);
          CHECK(backwards == all);
          CHECK(input_only.empty());
          CHECK(std::is_sorted(weights.begin(), weights.end()));
        }
        CHECK(a.back().kind == K::optimizer_step);
      }
    }
  }
  CHECK_THROWS_WITH(dualpipev_schedule(7, 4, 0), Catch::Contains("at least 2 x ranks = 8"));
}

TEST_CASE("DualPipeV on the clock: deadlock-free with independent transfers, fewer idle units than zero-bubble",
          "[schedule]") {
  // A V-shaped rank holds two chunks of half a 1F1B stage each: chunk costs are halved. The
  // figures are the clock's (deterministic), for F = B = W per stage: 4 ranks x 8 micro-batches
  // take 25.5 units against zero-bubble's 30 and 1F1B's 33.
  for (int ranks : {1, 2, 3, 4, 8, 16}) {
    for (int64_t n : {int64_t{2} * ranks, int64_t{2} * ranks + 3, int64_t{4} * ranks}) {
      INFO("ranks " << ranks << ", micro-batches " << n);
      const PipelineRun v = run_pipeline(dualpipev_ranks(n, ranks), {0.5, 0.5, 0.5}, TransferRule::independent);
      CHECK(v.stuck.empty());
      std::vector<std::vector<Action>> zb;
      for (int s = 0; s < ranks; ++s) zb.push_back(zero_bubble_schedule(n, ranks, s, false));
      const PipelineRun z = run_pipeline(zb, {1, 1, 1});
      if (ranks > 1) CHECK(v.makespan < z.makespan);
      // a rank's own work, 2 chunks x n x (F + B + W), plus P - 1 chunk forwards of idle time
      // (1F1B idles (P - 1)(F + B + W) of a stage, zero-bubble (P - 1)(F + B))
      CHECK(v.makespan == 2.0 * static_cast<double>(n) * 1.5 + (ranks - 1) * 0.5);
    }
  }
  const PipelineRun v = run_pipeline(dualpipev_ranks(8, 4), {0.5, 0.5, 0.5}, TransferRule::independent);
  CHECK(v.makespan == 25.5);
  CHECK(run_pipeline(all_stages(8, 4, false), {1, 1, 1}).makespan == 33);
  // Rank 0 stores at most 2P + 1 chunk micro-batches (half a stage each) against 1F1B's P stage ones.
  CHECK(max_in_flight(dualpipev_schedule(8, 4, 0)) == 9);
  // With one communication stream per rank (NCCL), a receive posted for one neighbour holds back
  // the sends to the other behind it: two ranks still run (their messages paired in order), four
  // do not.
  CHECK(pipeline_runs_to_completion(dualpipev_ranks(4, 2), TransferRule::in_order).empty());
  CHECK_FALSE(pipeline_runs_to_completion(dualpipev_ranks(8, 4), TransferRule::in_order).empty());
}

TEST_CASE("the V-shaped layout puts the embedding and the head on rank 0", "[schedule]") {
  const PipelineLayout v{.ranks = 3, .v_shape = true};
  CHECK(v.stages() == 6);
  for (int s = 0; s < 6; ++s) CHECK(v.stage_of(v.rank_of(s), v.chunk_of(s)) == s);
  CHECK(v.rank_of(0) == 0);
  CHECK(v.rank_of(5) == 0);
  CHECK(v.rank_of(2) == 2);
  CHECK(v.rank_of(3) == 2);
  CHECK(describe_pipeline(even_split(6, 6), 1, v) ==
        "rank 0: stage 0/6: embedding, layers 0-0 + stage 5/6: layers 5-5, head + 1 MTP | rank 1: stage 1/6: layers "
        "1-1 + stage 4/6: layers 4-4 | rank 2: stage 2/6: layers 2-2 + stage 3/6: layers 3-3");
  // one rank: (F0 F1) once, the steady (F0 B1 F1 B0) once, (B1 B0) with B0 split, its W
  CHECK(to_string(dualpipev_schedule(2, 1, 0)) == "F0 F0' F1 BW0' F1' BW0 BW1' B1 W1 OPT");
}

namespace {

// Every split of L layers into S non-empty contiguous stages, stage 0 first.
void all_splits(int64_t layers, int stages, std::vector<int64_t>& prefix, std::vector<std::vector<int64_t>>& out) {
  if (stages == 1) {
    prefix.push_back(layers);
    out.push_back(prefix);
    prefix.pop_back();
    return;
  }
  for (int64_t n = 1; n + stages - 1 <= layers; ++n) {
    prefix.push_back(n);
    all_splits(layers - n, stages - 1, prefix, out);
    prefix.pop_back();
  }
}

double costliest(const std::vector<double>& costs) {
  return *std::max_element(costs.begin(), costs.end());
}

}  // namespace

TEST_CASE("the even split gives the first num_layers % stages stages one layer more", "[schedule]") {
  const std::vector<int64_t> v3 = even_split(61, 16);
  CHECK(std::count(v3.begin(), v3.end(), 4) == 13);
  CHECK(std::count(v3.begin(), v3.end(), 3) == 3);
  CHECK(v3.front() == 4);
  CHECK(v3.back() == 3);
  for (int s = 0; s < 16; ++s) CHECK(pipeline_stage(v3, s).first_layer == pipeline_stage(61, 16, s).first_layer);
  CHECK_THROWS_WITH(even_split(3, 4), Catch::Contains("3 decoder layers cannot fill 4 pipeline stages"));
}

TEST_CASE("the balanced split minimises the costliest stage, head and MTP on the last", "[schedule]") {
  // Against every split of small models: a dense first layer, MoE layers, a large head, MTP or not.
  const Recipe tiny = load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/tiny.yaml");
  for (int64_t layers : {4, 6, 8}) {
    for (int64_t mtp : {0, 1, 2}) {
      ModelConfig c = tiny.model;
      c.num_hidden_layers = layers;
      c.num_nextn_predict_layers = mtp;
      for (int stages = 1; stages <= 4; ++stages) {
        INFO(layers << " layers, MTP depth " << mtp << ", " << stages << " stages");
        const std::vector<int64_t> split = balanced_split(c, stages, 64);
        const double got = costliest(stage_flops_per_token(c, split, 64));
        std::vector<std::vector<int64_t>> candidates;
        std::vector<int64_t> prefix;
        all_splits(layers, stages, prefix, candidates);
        double best = std::numeric_limits<double>::infinity();
        std::vector<int64_t> first_best;  // the lexicographically largest optimum (earlier stages longer)
        for (const auto& candidate : candidates) {
          const double cost = costliest(stage_flops_per_token(c, candidate, 64));
          if (cost < best * (1 - 1e-12))
            best = cost, first_best = candidate;
          else if (cost <= best * (1 + 1e-12) && candidate > first_best)
            first_best = candidate;
        }
        CHECK(got == Approx(best).epsilon(1e-12));
        CHECK(split == first_best);
        CHECK(got <= costliest(stage_flops_per_token(c, even_split(layers, stages), 64)) * (1 + 1e-12));
      }
    }
  }
  // The shipped tiny model on two stages: the head and the MTP block weigh about a layer and a
  // half, so the first stage takes three of the four layers.
  CHECK(balanced_split(tiny.model, 2, tiny.train.seq_len) == std::vector<int64_t>{3, 1});
  // DeepSeek-V3 on 16 stages: the last stage's head + MTP module cost more than a layer, so it
  // keeps fewer layers than the even split's 3 and the costliest stage gets cheaper.
  const Recipe v3 = load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/deepseek-v3-671b.yaml");
  const std::vector<int64_t> balanced = balanced_split(v3.model, 16, v3.train.seq_len);
  const std::vector<int64_t> even = even_split(61, 16);
  CHECK(balanced.back() < even.back());
  CHECK(costliest(stage_flops_per_token(v3.model, balanced, 4096)) <
        costliest(stage_flops_per_token(v3.model, even, 4096)));
}

TEST_CASE("a V-shaped balanced split lowers the costliest rank to the optimum on small models", "[schedule]") {
  const Recipe tiny = load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/tiny.yaml");
  for (int64_t layers : {4, 6, 8, 9}) {
    for (int64_t mtp : {0, 1}) {
      ModelConfig c = tiny.model;
      c.num_hidden_layers = layers;
      c.num_nextn_predict_layers = mtp;
      for (int ranks = 1; 2 * ranks <= layers && ranks <= 4; ++ranks) {
        INFO(layers << " layers, MTP depth " << mtp << ", " << ranks << " ranks");
        const PipelineLayout v{.ranks = ranks, .v_shape = true};
        const std::vector<int64_t> split = balanced_split(c, v, 64);
        const double got = costliest(rank_flops_per_token(c, split, v, 64));
        std::vector<std::vector<int64_t>> candidates;
        std::vector<int64_t> prefix;
        all_splits(layers, v.stages(), prefix, candidates);
        double best = std::numeric_limits<double>::infinity();
        for (const auto& candidate : candidates)
          best = std::min(best, costliest(rank_flops_per_token(c, candidate, v, 64)));
        CHECK(got == Approx(best).epsilon(1e-12));
      }
    }
  }
  // DeepSeek-V3 under DualPipeV (16 ranks, 32 stages): rank 0 keeps the head and MTP module
  // with one layer in each of its stages; its cost falls from the even split's.
  const Recipe v3 = load_recipe(std::string(DSX_SOURCE_DIR) + "/recipes/deepseek-v3-671b.yaml");
  const PipelineLayout v{.ranks = 16, .v_shape = true};
  const std::vector<int64_t> balanced = balanced_split(v3.model, v, 4096);
  CHECK(balanced.front() == 1);
  CHECK(balanced.back() == 1);
  CHECK(costliest(rank_flops_per_token(v3.model, balanced, v, 4096)) <
        costliest(rank_flops_per_token(v3.model, even_split(61, 32), v, 4096)));
}

namespace {

std::vector<std::vector<Action>> interleaved_ranks(int64_t n, int ranks, int chunks, bool mtp) {
  std::vector<std::vector<Action>> out;
  for (int r = 0; r < ranks; ++r) out.push_back(interleaved_1f1b_schedule(n, ranks, r, chunks, mtp));
  return out;
}

}  // namespace

TEST_CASE("the interleaved layout deals the stages round the ranks", "[schedule]") {
  const PipelineLayout layout{.ranks = 2, .interleave = 3};
  CHECK(layout.stages() == 6);
  for (int s = 0; s < 6; ++s) CHECK(layout.stage_of(layout.rank_of(s), layout.chunk_of(s)) == s);
  CHECK(layout.stage_of(1, 2) == 5);
  CHECK(layout.rank_of(4) == 0);
  CHECK(layout.chunk_of(3) == 1);
  CHECK(describe_pipeline(even_split(6, 6), 1, layout) ==
        "rank 0: stage 0/6: embedding, layers 0-0 + stage 2/6: layers 2-2 + stage 4/6: layers 4-4 | rank 1: stage "
        "1/6: layers 1-1 + stage 3/6: layers 3-3 + stage 5/6: layers 5-5, head + 1 MTP");
}

TEST_CASE("interleaved 1F1B reads as Megatron's virtual pipeline", "[schedule]") {
  // Two ranks, two chunks, two micro-batches: rank 0 warms up with 2(P - r - 1) + (v - 1)P = 4
  // forwards (every one), rank 1 with 2; the turn from rank 1's chunk 0 to rank 0's chunk 1 is
  // a message naming the peer's chunk.
  CHECK(to_string(interleaved_1f1b_schedule(2, 2, 0, 2, false)) ==
        "F0 SA0>1 F1 SA1>1 RA0'<1 F0' SA0'>1 RA1'<1 F1' SA1'>1 RG0'<1 BW0' SG0'>1 RG1'<1 BW1' SG1'>1 RG0<1 BW0 "
        "RG1<1 BW1 OPT");
  CHECK(to_string(interleaved_1f1b_schedule(2, 2, 1, 2, false)) ==
        "RA0<0 F0 SA0>0' RA1<0 F1 SA1>0' RA0'<0 F0' BW0' SG0'>0 RA1'<0 F1' BW1' SG1'>0 RG0<0' BW0 SG0>0 RG1<0' BW1 "
        "SG1>0 OPT");
  CHECK_THROWS_WITH(interleaved_1f1b_schedule(3, 2, 0, 2, false), Catch::Contains("not a multiple of the 2 ranks"));
}

TEST_CASE("interleaved 1F1B: each chunk runs its micro-batches in order, each forward before its backward",
          "[schedule]") {
  for (int ranks : {1, 2, 3, 4, 8}) {
    for (int chunks : {1, 2, 3, 4}) {
      for (int64_t rounds : {1, 2, 3, 5}) {
        const int64_t n = rounds * ranks;
        for (int r = 0; r < ranks; ++r) {
          INFO("rank " << r << " of " << ranks << ", " << chunks << " chunks, micro-batches " << n);
          const std::vector<Action> a = interleaved_1f1b_schedule(n, ranks, r, chunks, true);
          for (int chunk = 0; chunk < chunks; ++chunk) {
            std::vector<int64_t> forwards, backwards;
            for (const Action& x : a) {
              if (x.chunk != chunk || x.is_transfer()) continue;
              if (x.kind == K::forward) forwards.push_back(x.micro_batch);
              if (x.kind == K::backward) {
                CHECK(std::count(forwards.begin(), forwards.end(), x.micro_batch) == 1);
                backwards.push_back(x.micro_batch);
              }
            }
            std::vector<int64_t> all(static_cast<size_t>(n));
            for (int64_t i = 0; i < n; ++i) all[static_cast<size_t>(i)] = i;
            CHECK(forwards == all);
            CHECK(backwards == all);
          }
          CHECK(a.back().kind == K::optimizer_step);
        }
      }
    }
  }
}

TEST_CASE("interleaved 1F1B on the clock: the bubble of 1F1B divided by the chunks", "[schedule]") {
  // A rank's chunk costs a v-th of a 1F1B stage. With F = 1, B = 2 per stage, one rank's work is
  // 3n; 1F1B idles (P - 1) x 3, the interleaved schedule (P - 1) x 3 / v (Narayanan et al.,
  // eq. for t_pb / t_id), MTP or not, with transfers completing independently (non-blocking MPI)
  // or in order on one stream per rank (NCCL): Megatron's pairing of each steady forward with a
  // backward into one unit, one group of transfers per unit, keeps both free of deadlock.
  for (int ranks : {2, 3, 4, 8}) {
    for (int chunks : {2, 3, 4}) {
      for (int64_t rounds : {1, 2, 4}) {
        for (bool mtp : {false, true}) {
          const int64_t n = rounds * ranks;
          INFO(ranks << " ranks, " << chunks << " chunks, " << n << " micro-batches, mtp " << mtp);
          const double share = 1.0 / chunks;
          for (const TransferRule rule : {TransferRule::independent, TransferRule::in_order}) {
            const PipelineRun run = run_pipeline(interleaved_ranks(n, ranks, chunks, mtp), {share, share, share}, rule);
            CHECK(run.stuck.empty());
            CHECK(run.makespan == Approx(3.0 * n + 3.0 * (ranks - 1) / chunks));
          }
        }
      }
    }
  }
}

TEST_CASE("interleaved 1F1B holds (1 + (P - 1)/(P v)) of 1F1B's activations on rank 0", "[schedule]") {
  // Rank 0 holds at most P·v + P - 1 chunk micro-batches (a v-th of a stage each): its warm-up of
  // 2(P - 1) + (v - 1)P forwards plus one (Narayanan et al. §2.2: the price of the smaller bubble).
  for (int ranks : {2, 3, 4, 8}) {
    for (int chunks : {2, 3, 4}) {
      INFO(ranks << " ranks, " << chunks << " chunks");
      CHECK(max_in_flight(interleaved_1f1b_schedule(4 * ranks, ranks, 0, chunks, false)) == ranks * chunks + ranks - 1);
      CHECK(max_in_flight(interleaved_1f1b_schedule(ranks, ranks, 0, chunks, false)) == ranks * chunks);
    }
  }
}
