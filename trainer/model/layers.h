// The small building blocks of the model: linear-layer helpers, RMSNorm, the token embedding,
// the SwiGLU MLP and the output head (final norm, projection to the vocabulary, cross entropy).
//
// Every module follows one pattern (ARCHITECTURE.md principle 2):
//   forward(input, ..., ctx)            computes the output and saves into ctx what backward needs;
//   backward_input(..., dout, ctx)      returns the input gradient and keeps in ctx the output
//                                       gradients its weights need;
//   backward_weight(input, ..., ctx)    accumulates (+=) the weight gradients into the parameter
//                                       store and releases ctx.
// A module's input is owned by its caller, which passes it again to the backward calls (saved
// or recomputed), so the caller decides what stays in memory between forward and backward.
#pragma once
#include <cstdint>

#include "kernels/ops/cross_entropy.h"
#include "kernels/tensor.h"
#include "trainer/model/expert_parallel.h"
#include "trainer/model/parameters.h"

namespace dsx {

// A new tensor with ref's dtype and device.
inline Tensor empty_like(const Tensor& ref, Shape shape) {
  return Tensor::empty(std::move(shape), ref.dtype(), ref.device());
}
// The linear helpers follow weight.precision: the GEMMs in its gemm (fp32, bf16 or FP8), and a
// bf16-rounded output (y only: gradients are not activations) when bf16_output.
// y [N, out] = x [N, in] · Wᵀ
Tensor linear(const Tensor& x, const Parameter& weight);
void linear_into(const Tensor& x, const Parameter& weight, Tensor& y);  // y overwritten
// dx [N, in] = dy [N, out] · W
Tensor linear_input_grad(const Tensor& dy, const Parameter& weight);
void linear_input_grad_into(const Tensor& dy, const Parameter& weight, Tensor& dx);  // dx overwritten
// W.grad += dyᵀ · x
void linear_weight_grad(const Tensor& dy, const Tensor& x, Parameter& weight);
// Rounds a module's stored output to bf16 when its weight's precision says so.
void round_output(const Parameter& weight, Tensor& out);
// a + b as a new tensor
Tensor add(const Tensor& a, const Tensor& b);

struct RmsNormContext {
  Tensor rstd;  // [N] from forward
  Tensor dy;    // kept by backward_input for the weight gradient
};

class RmsNorm {
 public:
  RmsNorm(Parameter& weight, double eps) : weight_(&weight), eps_(eps) {}
  Tensor forward(const Tensor& x, RmsNormContext& ctx) const;
  Tensor backward_input(const Tensor& x, const Tensor& dy, RmsNormContext& ctx) const;
  void backward_weight(const Tensor& x, RmsNormContext& ctx) const;

 private:
  Parameter* weight_;
  double eps_;
};

// Token embedding: no input gradient (ids are integers), so only forward and backward_weight.
// Vocab-parallel under tensor parallelism: a TP rank holds rows [v0, v0 + V/tp) of the table,
// looks up the ids among them (zero rows for the others) and the forward sums over TP.
class Embedding {
 public:
  explicit Embedding(Parameter& table, const ModelParallel& parallel = {}) : table_(&table), parallel_(parallel) {}
  Tensor forward(const Tensor& ids) const;  // ids [N] -> [N, D]
  void backward_weight(const Tensor& ids, const Tensor& dout) const;

 private:
  Parameter* table_;
  ModelParallel parallel_;
};

struct MlpContext {
  Tensor gate, up;             // projections of the input [N, F]
  Tensor act;                  // silu(gate) · up, the down projection's input (dropped when recomputed)
  Tensor d_out, d_gate, d_up;  // kept by backward_input for the weight gradients
};

// SwiGLU MLP: down_proj(silu(gate_proj(x)) · up_proj(x)). Outputs go to caller-provided tensors
// so the MoE can point them at an expert's rows of its permuted buffers.
class Mlp {
 public:
  Mlp(Parameter& gate, Parameter& up, Parameter& down, bool recompute_act)
      : gate_(&gate), up_(&up), down_(&down), recompute_act_(recompute_act) {}
  void forward(const Tensor& x, MlpContext& ctx, Tensor& y) const;           // y [N, D] overwritten
  void backward_input(const Tensor& dy, MlpContext& ctx, Tensor& dx) const;  // dx [N, D] overwritten
  void backward_weight(const Tensor& x, MlpContext& ctx) const;

 private:
  Parameter* gate_;
  Parameter* up_;
  Parameter* down_;
  bool recompute_act_;
};

struct HeadContext {
  RmsNormContext norm;
  Tensor normed;       // norm(h): the projection's input, and the next MTP module's h
  Tensor normed_all;   // sequence parallelism: normed of every TP rank's tokens (else normed)
  Tensor logits, lse;  // [N, V], [N]
  Tensor targets;      // [N]
  ops::CrossEntropyResult ce;
  Tensor d_logits;
};

// logits = head(norm(h)); the loss is the cross entropy against targets (ignore_index -100).
// head_weight is lm_head.weight or, with tied embeddings, model.embed_tokens.weight.
//
// Vocab-parallel under tensor parallelism: a TP rank holds rows [v0, v0 + V/tp) of the head and
// computes those logits only (ctx.logits [N, V/tp]); the cross entropy combines the ranks'
// log-sum-exps (one all-gather of [N] per rank) and loss sums (one scalar), so ctx.ce and ctx.lse
// are the whole vocabulary's; the backward's softmax uses that lse, and the input gradient sums
// over TP. Megatron's vocab-parallel cross entropy; the [N, V] logits never exist on one rank.
// Under sequence parallelism h is this rank's token rows: the norm runs on them, the projection
// on every rank's (gathered), targets cover all the tokens, and the input gradient is this rank's
// rows of the sum (a reduce-scatter).
class OutputHead {
 public:
  static constexpr int64_t kIgnoreIndex = -100;
  OutputHead(Parameter& norm_weight, Parameter& head_weight, double eps, const ModelParallel& parallel = {})
      : norm_(norm_weight, eps), head_(&head_weight), parallel_(parallel) {}
  void forward(const Tensor& h, const Tensor& targets, HeadContext& ctx) const;
  // loss_grad: d(objective)/d(loss_sum), i.e. the loss weight / the counted tokens.
  // d_normed_extra: gradient reaching ctx.normed from elsewhere (the next MTP module) or undefined.
  Tensor backward_input(const Tensor& h, double loss_grad, const Tensor& d_normed_extra, HeadContext& ctx) const;
  void backward_weight(const Tensor& h, HeadContext& ctx) const;
  // The logits of ctx (this rank's vocabulary rows under TP) as the whole [N, V] matrix.
  Tensor gather_logits(const HeadContext& ctx) const;

 private:
  void vocab_parallel_cross_entropy(HeadContext& ctx) const;
  void vocab_parallel_backward(double loss_grad, HeadContext& ctx) const;

  RmsNorm norm_;
  Parameter* head_;
  ModelParallel parallel_;
};

}  // namespace dsx
