#include <catch2/catch.hpp>

#include <cmath>
#include <cstdint>
#include <set>

#include "kernels/error.h"
#include "trainer/model/param_count.h"
#include "trainer/model/parameters.h"

using namespace dsx;

namespace {

// DEEPSEEK_FACTS.md "Model shapes", DeepSeek-V3 671B.
ModelConfig deepseek_v3() {
  ModelConfig c;
  c.vocab_size = 129280;
  c.hidden_size = 7168;
  c.intermediate_size = 18432;
  c.num_hidden_layers = 61;
  c.num_attention_heads = 128;
  c.q_lora_rank = 1536;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.n_routed_experts = 256;
  c.n_shared_experts = 1;
  c.num_experts_per_tok = 8;
  c.moe_intermediate_size = 2048;
  c.first_k_dense_replace = 3;
  c.n_group = 8;
  c.topk_group = 4;
  c.routed_scaling_factor = 2.5;
  c.scoring_func = "sigmoid";
  c.norm_topk_prob = true;
  c.num_nextn_predict_layers = 1;
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 40;
  c.rope_scaling.mscale = 1;
  c.rope_scaling.mscale_all_dim = 1;
  c.max_position_embeddings = 163840;
  return c;
}

// DeepSeek-V2-Lite 16B.
ModelConfig deepseek_v2_lite() {
  ModelConfig c;
  c.vocab_size = 102400;
  c.hidden_size = 2048;
  c.intermediate_size = 10944;
  c.num_hidden_layers = 27;
  c.num_attention_heads = 16;
  c.q_lora_rank = 0;
  c.kv_lora_rank = 512;
  c.qk_nope_head_dim = 128;
  c.qk_rope_head_dim = 64;
  c.v_head_dim = 128;
  c.n_routed_experts = 64;
  c.n_shared_experts = 2;
  c.num_experts_per_tok = 6;
  c.moe_intermediate_size = 1408;
  c.first_k_dense_replace = 1;
  c.n_group = 1;
  c.topk_group = 1;
  c.routed_scaling_factor = 1.0;
  c.scoring_func = "softmax";
  c.norm_topk_prob = false;
  c.num_nextn_predict_layers = 0;
  c.rope_scaling.type = "yarn";
  c.rope_scaling.factor = 40;
  c.rope_scaling.mscale = 0.707;
  c.rope_scaling.mscale_all_dim = 0.707;
  return c;
}

// The same counts written out by hand from the architecture, independently of the spec list.
struct HandCount {
  int64_t total, active, mtp;
};
HandCount count_by_hand(const ModelConfig& c) {
  const int64_t D = c.hidden_size, H = c.num_attention_heads, dqk = c.qk_head_dim();
  const int64_t q = c.q_lora_rank > 0 ? c.q_lora_rank * D + c.q_lora_rank + H * dqk * c.q_lora_rank : H * dqk * D;
  const int64_t kv = (c.kv_lora_rank + c.qk_rope_head_dim) * D + c.kv_lora_rank +
                     H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank;
  const int64_t attention_and_norms = q + kv + D * H * c.v_head_dim + 2 * D;
  const int64_t dense = 3 * D * c.intermediate_size;
  const int64_t expert = 3 * D * c.moe_intermediate_size;
  const int64_t moe_fixed = c.n_routed_experts * D + c.n_routed_experts + c.n_shared_experts * expert;
  const int64_t moe_total = moe_fixed + c.n_routed_experts * expert;
  const int64_t moe_active = moe_fixed + c.num_experts_per_tok * expert;
  const int64_t dense_layers = c.first_k_dense_replace, moe_layers = c.num_hidden_layers - dense_layers;
  const int64_t embedding_and_head = (c.tie_word_embeddings ? 1 : 2) * c.vocab_size * D + D;
  HandCount h;
  h.total = embedding_and_head + dense_layers * (attention_and_norms + dense) +
            moe_layers * (attention_and_norms + moe_total);
  h.active = embedding_and_head + dense_layers * (attention_and_norms + dense) +
             moe_layers * (attention_and_norms + moe_active);
  // MTP: enorm, hnorm, eh_proj, one MoE block, shared_head.norm
  h.mtp = c.num_nextn_predict_layers * (2 * D + 2 * D * D + attention_and_norms + moe_total + D);
  return h;
}

double relative_error(double value, double reference) {
  return std::abs(value - reference) / reference;
}

}  // namespace

TEST_CASE("parameter counts equal the hand count of the architecture", "[param_count]") {
  for (const ModelConfig& c : {deepseek_v3(), deepseek_v2_lite()}) {
    const ParameterCounts counts = count_parameters(c);
    const HandCount hand = count_by_hand(c);
    CHECK(counts.total == hand.total);
    CHECK(counts.active == hand.active);
    CHECK(counts.mtp == hand.mtp);
    CHECK(counts.active_non_embedding == hand.active - c.vocab_size * c.hidden_size);
  }
  ModelConfig tied = deepseek_v2_lite();
  tied.tie_word_embeddings = true;
  CHECK(count_parameters(tied).total == count_by_hand(tied).total);
  CHECK(count_parameters(tied).total == count_parameters(deepseek_v2_lite()).total - 102400 * 2048);
  CHECK(count_parameters(tied).active_non_embedding == count_parameters(tied).active);
}

TEST_CASE("DeepSeek-V3 671B: published parameter counts", "[param_count]") {
  const ParameterCounts c = count_parameters(deepseek_v3());
  INFO("total " << c.total << " active " << c.active << " active_non_embedding " << c.active_non_embedding << " mtp "
                << c.mtp);
  // Published (TR): 671B total. Ours: 671.03e9.
  CHECK(relative_error(static_cast<double>(c.total), 671e9) < 0.01);
  // Published: 37B activated, a 2-digit figure. Counting the embedding table gives 37.55e9
  // (+1.5%; it rounds to 38B), leaving it out (a token reads one row of it) gives 36.63e9 (-1.01%,
  // rounds to 37B). Neither convention is within 1% of 37e9 exactly, so the test asserts that the
  // non-embedding count rounds to the published figure and the full count is within 2%.
  CHECK(c.active_non_embedding >= 36'500'000'000);
  CHECK(c.active_non_embedding < 37'500'000'000);
  CHECK(relative_error(static_cast<double>(c.active), 37e9) < 0.02);
  // Published (DeepSeek-V3 README_WEIGHTS): MTP modules 11.5B unique parameters, excluding the
  // shared embedding and output head (0.9B each). Ours: 11.61e9 (enorm, hnorm, eh_proj, one MoE
  // block, shared_head.norm) — the shared embedding and head are counted in the main model.
  CHECK(relative_error(static_cast<double>(c.mtp), 11.5e9) < 0.01);
}

TEST_CASE("DeepSeek-V2-Lite 16B: published parameter counts", "[param_count]") {
  const ParameterCounts c = count_parameters(deepseek_v2_lite());
  INFO("total " << c.total << " active " << c.active << " active_non_embedding " << c.active_non_embedding);
  // Published (V2 paper): 15.7B total. Ours: 15.706e9.
  CHECK(relative_error(static_cast<double>(c.total), 15.7e9) < 0.01);
  CHECK(c.mtp == 0);
  // Published: 2.4B activated. Non-embedding count: 2.451e9 (+2.1%; the full count, with the
  // 0.21e9 embedding table, is 2.66e9). The published figure is the 2-digit truncation of the
  // non-embedding count; the 1% target is not reachable by any counting convention here (the
  // layers alone are 2.24e9), so the assertion is the truncation interval [2.4e9, 2.5e9).
  CHECK(c.active_non_embedding >= 2'400'000'000);
  CHECK(c.active_non_embedding < 2'500'000'000);
}

TEST_CASE("parameter specs: Hugging Face names, shard specs and weight-decay groups", "[param_count]") {
  ModelConfig c = deepseek_v3();
  const std::vector<ParamSpec> specs = model_param_specs(c);
  std::set<std::string> names;
  for (const ParamSpec& s : specs) names.insert(s.name);
  CHECK(names.size() == specs.size());  // unique
  for (const char* expected :
       {"model.embed_tokens.weight", "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight", "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.2.mlp.down_proj.weight", "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.60.mlp.experts.255.up_proj.weight", "model.layers.60.mlp.shared_experts.gate_proj.weight",
        "model.norm.weight", "lm_head.weight", "model.layers.61.eh_proj.weight",
        "model.layers.61.mlp.experts.0.gate_proj.weight", "model.layers.61.shared_head.norm.weight"}) {
    INFO(expected);
    CHECK(names.count(expected) == 1);
  }
  CHECK(names.count("model.layers.3.mlp.gate_proj.weight") == 0);  // MoE layer: no dense MLP
  CHECK(names.count("model.layers.0.self_attn.q_proj.weight") == 0);
  for (const ParamSpec& s : specs) {
    INFO(s.name);
    const bool is_norm = s.name.find("norm") != std::string::npos;
    const bool is_bias = s.name.find("bias") != std::string::npos;
    CHECK(s.weight_decay == !(is_norm || is_bias));
    CHECK(s.trainable == !is_bias);
    CHECK(s.mtp == (s.layer == 61));
    if (s.name.find(".experts.") != std::string::npos) {
      CHECK(s.shard.axis == ShardAxis::expert);
      CHECK(s.shard.num_experts == 256);
      CHECK(s.routed_expert);
    }
  }
  const auto find = [&](const std::string& name) {
    for (const ParamSpec& s : specs) {
      if (s.name == name) return s;
    }
    FAIL("no spec " << name);
    return ParamSpec{};
  };
  CHECK(find("model.layers.5.mlp.experts.17.down_proj.weight").shard.expert_index == 17);
  CHECK(find("model.layers.0.self_attn.q_b_proj.weight").shape == Shape{128 * 192, 1536});
  CHECK(find("model.layers.0.self_attn.q_b_proj.weight").shard.axis == ShardAxis::tensor);
  CHECK(find("model.layers.0.self_attn.q_b_proj.weight").shard.dim == 0);
  CHECK(find("model.layers.0.self_attn.o_proj.weight").shard.dim == 1);
  CHECK(find("model.layers.0.self_attn.kv_a_proj_with_mqa.weight").shape == Shape{512 + 64, 7168});
  CHECK(find("model.layers.9.mlp.shared_experts.up_proj.weight").shape == Shape{2048, 7168});
  CHECK(find("model.layers.61.eh_proj.weight").shape == Shape{7168, 2 * 7168});

  ModelConfig v2 = deepseek_v2_lite();
  const std::vector<ParamSpec> v2_specs = model_param_specs(v2);
  bool has_q_proj = false;
  for (const ParamSpec& s : v2_specs) has_q_proj |= s.name == "model.layers.0.self_attn.q_proj.weight";
  CHECK(has_q_proj);
}

TEST_CASE("impossible model configs are refused with the field's name", "[param_count]") {
  const auto message_of = [](const ModelConfig& c) {
    try {
      count_parameters(c);
    } catch (const UserError& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  ModelConfig c = deepseek_v3();
  c.n_group = 7;
  CHECK(message_of(c).find("model.n_group") != std::string::npos);
  c = deepseek_v3();
  c.topk_group = 9;
  CHECK(message_of(c).find("model.topk_group") != std::string::npos);
  c = deepseek_v3();
  c.num_experts_per_tok = 129;  // 4 groups of 32 hold 128
  CHECK(message_of(c).find("model.num_experts_per_tok") != std::string::npos);
  c = deepseek_v3();
  c.qk_rope_head_dim = 63;
  CHECK(message_of(c).find("model.qk_rope_head_dim") != std::string::npos);
  c = deepseek_v3();
  c.scoring_func = "relu";
  CHECK(message_of(c).find("model.scoring_func") != std::string::npos);
}
