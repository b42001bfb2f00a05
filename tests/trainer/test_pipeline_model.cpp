// A model split into pipeline stages (ModelParallel::pp_size, trainer/model/pipeline_stage.h),
// driven in one process by passing each stage's outputs to the next by hand, computes the whole
// model's losses and exactly its gradients: every stage runs the same ops on the same values in
// the same order (the embedding table's gradient included: the MTP rows first, then the main
// input's, as in one stage). Only the balance loss, summed over the stages in another order,
// may differ by one rounding.
#include <catch2/catch.hpp>

#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "tests/trainer/test_model_fixtures.h"
#include "trainer/model/model.h"

using namespace dsx;

namespace {

struct Run {
  std::vector<Losses> losses;  // per micro-batch, the stages' parts summed
  std::map<std::string, std::vector<double>> grads;
  std::map<std::string, int> reports;  // grad-ready reports per parameter
};

// A stage's losses into the micro-batch's sum.
void add_losses(Losses& sum, const Losses& part) {
  sum.total += part.total;
  sum.lm += part.lm;
  sum.mtp += part.mtp;
  sum.balance += part.balance;
  sum.tokens += part.tokens;
}

// Every model's parameter gradients into r.grads; each parameter lives on one model.
void collect_grads(const std::vector<std::unique_ptr<Model>>& models, Run& r) {
  for (const auto& m : models) {
    for (const Parameter& p : m->parameters()) {
      INFO(p.spec.name);
      CHECK(!r.grads.contains(p.spec.name));
      if (p.grad.defined()) r.grads[p.spec.name] = p.grad.to_vector();
    }
  }
}

ModelConfig untied_mtp2_config() {
  ModelConfig c = test::tiny_config_direct_q();
  c.tie_word_embeddings = false;
  return c;
}

// Two micro-batches in flight on every stage: F0 and F1 through all stages, then B0 and B1 back;
// split_weights: the input gradients of both micro-batches first, then the weight gradients
// (W0, W1: a zero-bubble schedule's order).
Run run_stages(const ModelConfig& config, int stages, DType dtype, bool split_weights = false) {
  std::vector<std::unique_ptr<Model>> models;
  Run r;
  for (int s = 0; s < stages; ++s) {
    models.push_back(std::make_unique<Model>(config, dtype, 5, RecomputePolicy{}, PrecisionPolicy{},
                                             ModelParallel{.pp_size = stages, .pp_rank = s}));
    models.back()->set_grad_ready_hook([&r](Parameter& p) { ++r.reports[p.spec.name]; });
  }
  const std::vector<Batch> batches = {test::make_batch(config, 2, 8, 100), test::make_batch(config, 2, 8, 101)};
  for (int64_t mb = 0; mb < 2; ++mb) {
    Losses sum;
    Tensor hidden, mtp;
    for (int s = 0; s < stages; ++s) {
      StageForward out = models[s]->forward_stage(mb, batches[mb], hidden, mtp);
      add_losses(sum, out.losses);
      hidden = out.hidden;
      if (out.mtp_embedded.defined()) mtp = out.mtp_embedded;  // stages between pass it on
    }
    r.losses.push_back(sum);
  }
  for (int64_t mb = 0; mb < 2; ++mb) {
    Tensor d_hidden, d_mtp;
    for (int s = stages - 1; s >= 0; --s) {
      StageBackward out = split_weights ? models[s]->backward_stage_input(mb, 0.5, d_hidden, d_mtp)
                                        : models[s]->backward_stage(mb, 0.5, d_hidden, d_mtp);
      d_hidden = out.d_hidden;
      if (out.d_mtp_embedded.defined()) d_mtp = out.d_mtp_embedded;
    }
  }
  if (split_weights) {
    for (int64_t mb = 0; mb < 2; ++mb) {
      for (const auto& m : models) m->backward_stage_weight(mb);
    }
  }
  collect_grads(models, r);
  return r;
}

}  // namespace

TEST_CASE("pipeline stages give the whole model's losses and exactly its gradients, weight passes deferred or not",
          "[model][pipeline]") {
  for (const ModelConfig& config : {test::tiny_config(), untied_mtp2_config()}) {
    for (DType dtype : {DType::f32, DType::f64}) {
      const Run whole = run_stages(config, 1, dtype);
      for (const auto& [stages, split_weights] :
           {std::pair{1, true}, std::pair{2, false}, std::pair{2, true}, std::pair{3, false}, std::pair{3, true}}) {
        INFO("MTP depth " << config.num_nextn_predict_layers << ", " << dtype_name(dtype) << ", " << stages
                          << " stages, weight gradients " << (split_weights ? "deferred" : "with the input's"));
        const Run split = run_stages(config, stages, dtype, split_weights);
        for (size_t mb = 0; mb < 2; ++mb) {
          CHECK(split.losses[mb].lm == whole.losses[mb].lm);
          CHECK(split.losses[mb].mtp == whole.losses[mb].mtp);
          CHECK(split.losses[mb].tokens == whole.losses[mb].tokens);
          CHECK(split.losses[mb].balance == Approx(whole.losses[mb].balance).epsilon(1e-12));
          CHECK(split.losses[mb].total == Approx(whole.losses[mb].total).epsilon(1e-12));
        }
        REQUIRE(split.grads.size() == whole.grads.size());
        for (const auto& [name, grad] : whole.grads) {
          INFO(name);
          CHECK(split.grads.at(name) == grad);
          CHECK(split.reports.at(name) == 2);  // once per backward, on its stage
        }
      }
    }
  }
}

namespace {

// A V-shaped layout (DualPipeV) of `ranks` models, each holding two chunks: micro-batch mb goes
// through stages 0 .. 2·ranks-1 (the model and chunk that hold each), then back; the MTP
// embeddings and their gradients never leave rank 0's model. split_weights as in run_stages.
Run run_v_shape(const ModelConfig& config, int ranks, DType dtype, bool split_weights) {
  const PipelineLayout layout{.ranks = ranks, .v_shape = true};
  std::vector<std::unique_ptr<Model>> models;
  Run r;
  for (int rank = 0; rank < ranks; ++rank) {
    models.push_back(std::make_unique<Model>(config, dtype, 5, RecomputePolicy{}, PrecisionPolicy{},
                                             ModelParallel{.pp_size = ranks, .pp_rank = rank, .pp_v_shape = true}));
    models.back()->set_grad_ready_hook([&r](Parameter& p) { ++r.reports[p.spec.name]; });
  }
  const std::vector<Batch> batches = {test::make_batch(config, 2, 8, 100), test::make_batch(config, 2, 8, 101)};
  for (int64_t mb = 0; mb < 2; ++mb) {
    Losses sum;
    Tensor hidden;
    for (int s = 0; s < layout.stages(); ++s) {
      StageForward out = models[layout.rank_of(s)]->forward_stage(mb, batches[mb], hidden, {}, layout.chunk_of(s));
      CHECK(!out.mtp_embedded.defined());
      add_losses(sum, out.losses);
      hidden = out.hidden;
    }
    r.losses.push_back(sum);
  }
  for (int64_t mb = 0; mb < 2; ++mb) {
    Tensor d_hidden;
    for (int s = layout.stages() - 1; s >= 0; --s) {
      Model& m = *models[layout.rank_of(s)];
      StageBackward out = split_weights ? m.backward_stage_input(mb, 0.5, d_hidden, {}, layout.chunk_of(s))
                                        : m.backward_stage(mb, 0.5, d_hidden, {}, layout.chunk_of(s));
      CHECK(!out.d_mtp_embedded.defined());
      d_hidden = out.d_hidden;
    }
  }
  if (split_weights) {
    for (int64_t mb = 0; mb < 2; ++mb) {
      for (int s = 0; s < layout.stages(); ++s)
        models[layout.rank_of(s)]->backward_stage_weight(mb, layout.chunk_of(s));
    }
  }
  collect_grads(models, r);
  return r;
}

// Four layers (a V over two ranks has four stages), untied head, MTP depth `mtp`.
ModelConfig v_config(int64_t mtp) {
  ModelConfig c = untied_mtp2_config();
  c.num_hidden_layers = 4;
  c.num_nextn_predict_layers = mtp;
  return c;
}

}  // namespace

TEST_CASE("V-shaped chunks (DualPipeV) give the whole model's losses and exactly its gradients", "[model][pipeline]") {
  for (const ModelConfig& config : {v_config(0), v_config(1), v_config(2)}) {
    const Run whole = run_stages(config, 1, DType::f64);
    for (const auto& [ranks, split_weights] : {std::pair{1, false}, std::pair{2, false}, std::pair{2, true}}) {
      INFO("MTP depth " << config.num_nextn_predict_layers << ", " << ranks << " ranks, weight gradients "
                        << (split_weights ? "deferred" : "with the input's"));
      const Run v = run_v_shape(config, ranks, DType::f64, split_weights);
      for (size_t mb = 0; mb < 2; ++mb) {
        CHECK(v.losses[mb].lm == whole.losses[mb].lm);
        CHECK(v.losses[mb].mtp == whole.losses[mb].mtp);
        CHECK(v.losses[mb].total == Approx(whole.losses[mb].total).epsilon(1e-12));
      }
      REQUIRE(v.grads.size() == whole.grads.size());
      for (const auto& [name, grad] : whole.grads) {
        INFO(name);
        CHECK(v.grads.at(name) == grad);
        CHECK(v.reports.at(name) == 2);
      }
    }
  }
}

TEST_CASE("a V-shaped rank 0 holds the embedding, the head and the MTP modules; its chunks keep their order",
          "[model][pipeline]") {
  const ModelConfig config = v_config(2);
  Model rank0(config, DType::f64, 5, {}, {}, ModelParallel{.pp_size = 2, .pp_rank = 0, .pp_v_shape = true});
  REQUIRE(rank0.chunks().size() == 2);
  CHECK(rank0.chunks()[0].index == 0);
  CHECK(rank0.chunks()[1].index == 3);
  CHECK(rank0.parameters().contains("model.embed_tokens.weight"));
  CHECK(rank0.parameters().contains("lm_head.weight"));
  CHECK_FALSE(rank0.parameters().contains("model.layers.1.input_layernorm.weight"));
  const Batch batch = test::make_batch(config, 2, 8, 1);
  const Tensor hidden = Tensor::zeros({16, config.hidden_size}, DType::f64);
  // the last chunk's forward reads the MTP embeddings its first chunk's forward of that micro-batch made
  CHECK_THROWS_WITH(rank0.forward_stage(0, batch, hidden, {}, 1),
                    Catch::Contains("micro-batch 0 of chunk 0 has no forward"));
  rank0.forward_stage(1, batch, {}, {}, 0);
  rank0.forward_stage(1, batch, hidden, {}, 1);
  // and the first chunk's backward needs the MTP gradients of the last chunk's backward
  CHECK_THROWS_WITH(rank0.backward_stage(1, 1.0, hidden, {}, 0),
                    Catch::Contains("the MTP gradients of the last chunk's backward (which comes first)"));
  CHECK_THROWS_WITH(rank0.forward_stage(0, batch, {}, {}, 2), Catch::Contains("chunk 2 of a model holding 2"));
}

TEST_CASE("pipeline stages refuse what they cannot run", "[model][pipeline]") {
  const ModelConfig config = test::tiny_config();
  Model first(config, DType::f64, 5, {}, {}, ModelParallel{.pp_size = 2, .pp_rank = 0});
  Model last(config, DType::f64, 5, {}, {}, ModelParallel{.pp_size = 2, .pp_rank = 1});
  const Batch batch = test::make_batch(config, 2, 8, 1);
  CHECK(first.stage().first_layer == 0);
  CHECK(first.stage().end_layer == 2);
  CHECK(last.stage().first_layer == 2);
  CHECK_THROWS_WITH(first.forward(batch), Catch::Contains("Model::forward: this model holds pipeline stage 0/2"));
  CHECK_THROWS_AS(last.logits(batch), std::logic_error);
  CHECK_THROWS_AS(last.policy_forward(batch), std::logic_error);
  // the last stage needs the previous stage's output and the MTP embeddings, of the right shape
  CHECK_THROWS_WITH(last.forward_stage(0, batch),
                    Catch::Contains("hidden_in (the previous stage's output) must be [16, 16]"));
  CHECK_THROWS_WITH(last.forward_stage(0, batch, Tensor::zeros({16, 16}, DType::f64)),
                    Catch::Contains("mtp_embedded_in (the first stage's MTP embeddings) must be [16, 16]"));
  CHECK_THROWS_WITH(last.forward_stage(0, batch, Tensor::zeros({16, 8}, DType::f64)), Catch::Contains("got"));
  CHECK_THROWS_WITH(first.backward_stage(3, 1.0), Catch::Contains("micro-batch 3 has no forward"));
  // the weight pass needs the input pass first, and each runs once
  ModelConfig no_mtp = config;
  no_mtp.num_nextn_predict_layers = 0;
  Model whole(no_mtp, DType::f64, 5);
  whole.forward_stage(0, batch);
  CHECK_THROWS_WITH(whole.backward_stage_weight(0), Catch::Contains("no input gradients yet"));
  whole.backward_stage_input(0, 1.0);
  CHECK_THROWS_WITH(whole.backward_stage_input(0, 1.0), Catch::Contains("already has its input gradients"));
  whole.backward_stage_weight(0);
  CHECK_THROWS_WITH(whole.backward_stage_weight(0), Catch::Contains("micro-batch 0 has no forward"));
  // the embedding table is the first stage's only: a tied head cannot live on the last
  ModelConfig tied = config;
  tied.tie_word_embeddings = true;
  CHECK_THROWS_WITH(Model(tied, DType::f64, 5, {}, {}, ModelParallel{.pp_size = 2, .pp_rank = 1}),
                    Catch::Contains("tie_word_embeddings: false"));
  ModelConfig shallow = config;
  shallow.num_hidden_layers = 1;
  shallow.first_k_dense_replace = 1;
  CHECK_THROWS_WITH(Model(shallow, DType::f64, 5, {}, {}, ModelParallel{.pp_size = 2, .pp_rank = 0}),
                    Catch::Contains("1 decoder layers cannot fill 2 pipeline stages"));
}

TEST_CASE("the fused backward releases each module's context as it goes, the split one keeps them",
          "[model][pipeline]") {
  // backward_stage runs each module's weight pass right after its input pass, so what a module
  // kept for its weight gradients is freed before the next module's backward; the split passes
  // hold every module's until backward_stage_weight. The fused backward's peak must stay lower.
  const ModelConfig config = test::tiny_config();
  const Batch batch = test::make_batch(config, 2, 8, 3);
  const auto backward_peak = [&](bool split) {
    Model model(config, DType::f32, 5);
    model.forward_stage(0, batch);
    reset_host_tensor_peak();
    const int64_t before = host_tensor_memory().used_bytes;
    if (split) {
      model.backward_stage_input(0, 1.0);
      model.backward_stage_weight(0);
    } else {
      model.backward_stage(0, 1.0);
    }
    return host_tensor_memory().peak_bytes - before;
  };
  const int64_t fused = backward_peak(false), split = backward_peak(true);
  INFO("backward peak above the forward's state: fused " << fused << " B, split " << split << " B");
  CHECK(fused < split);
}
