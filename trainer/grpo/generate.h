// In-process generation for the GRPO stage and `dsx generate`: batched autoregressive decoding
// of the training Model's own weights (no weight sync, no inference server).
//
// KV cache: per layer and token only MLA's compressed latent c_kv (kv_lora_rank values, after
// kv_a_layernorm) and the shared rope key k_rope (qk_rope_head_dim values) are stored. Decode
// uses the absorbed-weight form: q_nope is multiplied by W_UK (from kv_b_proj) so that scores
// are taken directly against c_kv, and the attention output over c_kv is multiplied by W_UV
// before o_proj; the per-head keys and values are never materialised.
//
// Prefill runs each prompt's tokens through the model in one pass (filling the cache; identical
// prompts, e.g. a GRPO group, are run once and their cache copied); decode then adds one token per
// active sequence per step, the active sequences' rows sharing every linear layer (attention is
// per sequence). Sampling: temperature (0 = greedy argmax, ties to the lowest id), then top-k,
// then top-p (nucleus) filtering; token t of request i uses the Philox number (seed_i, t), so a
// completion does not depend on which other requests share its batch (up to the rounding of the
// batched GEMMs, far below any sampling boundary in practice).
//
// The math is the training modules' (trainer/grpo/generate_engine.h): tests hold cached_logits
// to Model::logits within 1e-13 (f64) and 1e-5 (f32) relative to the largest logit. Weights are
// read when generate is called, so in-place optimizer updates are seen by the next call.
#pragma once
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "kernels/tensor.h"
#include "trainer/model/config.h"

namespace dsx {

class Model;
namespace data {
class Tokenizer;
}

namespace grpo {

struct SamplingParams {
  double temperature = 1.0;  // 0 = greedy
  int64_t top_k = 0;         // 0 = off
  double top_p = 1.0;        // 1 = off
  int64_t max_new_tokens = 256;
  // Stop once the decoded completion contains one of these; the token completing it is kept
  // (also when its text runs past the stop string). Needs the Generator's tokenizer.
  std::vector<std::string> stop_strings;
  int32_t eos_token_id = -1;  // -1 = none; the EOS token is kept in the completion
};

struct GenerationRequest {
  std::vector<int32_t> prompt;  // token ids, non-empty
  uint64_t seed = 0;
};

enum class FinishReason { eos, stop_string, length };

struct Completion {
  std::vector<int32_t> tokens;   // generated tokens only (not the prompt)
  std::vector<double> logprobs;  // log π(token) under the sampling distribution's model
                                 // logits at temperature 1 (what the GRPO ratio needs)
  FinishReason finish = FinishReason::length;
};

struct GenerationStats {
  int64_t prompt_tokens = 0;
  int64_t generated_tokens = 0;
  double prefill_s = 0;
  double decode_s = 0;
};

class Generator {
 public:
  // tokenizer is used only for stop strings (may be null when there are none).
  Generator(Model& model, const data::Tokenizer* tokenizer = nullptr);

  // One completion per request, in order. Bad sampling parameters or prompts (empty, ids outside
  // the vocabulary) throw dsx::UserError; stop strings without a tokenizer std::invalid_argument.
  std::vector<Completion> generate(std::span<const GenerationRequest> requests, const SamplingParams& params);
  // Of the last generate: prefill_s covers the prompts' pass and each first token, decode_s the rest.
  const GenerationStats& last_stats() const { return stats_; }

  // Logits [n_tokens, vocab] of every position of `tokens` computed with the KV cache: the first
  // `prefill` tokens in one pass, then the rest one token at a time (tests compare this with the
  // model's full forward).
  Tensor cached_logits(std::span<const int32_t> tokens, int64_t prefill);

 private:
  Model* model_;
  const data::Tokenizer* tokenizer_;
  GenerationStats stats_;
};

// Bytes of KV cache per token (all layers, MTP modules excluded) in dtype: the MLA latent
// cache, (kv_lora_rank + qk_rope_head_dim) · layers, vs a plain cache of per-head keys and
// values, (qk_nope + qk_rope + v_head_dim) · heads · layers.
int64_t latent_kv_bytes_per_token(const ModelConfig& config, DType dtype);
int64_t plain_kv_bytes_per_token(const ModelConfig& config, DType dtype);

}  // namespace grpo
}  // namespace dsx
