// Pipeline parallelism (ARCHITECTURE.md §4d): which part of the model a pipeline stage holds.
//
// The num_hidden_layers decoder layers are split into pp contiguous runs; the first
// num_hidden_layers % pp stages take one layer more, because the last stage also runs the final
// norm, the output head and the MTP modules (each a whole decoder block plus the shared head).
// The first stage holds the embedding table; the last stage the final norm, lm_head and the MTP
// modules. The MTP modules need Emb(t_{i+k}) of the shifted tokens: the first stage looks them up
// with the table only it holds and they travel to the last stage with the activations (one
// [D·T, hidden] tensor per micro-batch, passed on by the stages between), their gradients back
// with the activations' gradients. No weight is duplicated across stages and no gradient needs
// summing between them; the price is D more activation-sized messages per hop and micro-batch
// (Megatron instead keeps a copy of the table on the last stage and all-reduces its gradient).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "trainer/model/config.h"
#include "trainer/model/param_count.h"

namespace dsx {

struct PipelineStage {
  int index = 0;            // this stage, 0 = the embedding's
  int count = 1;            // pp
  int64_t first_layer = 0;  // decoder layers [first_layer, end_layer) of the main model
  int64_t end_layer = 0;

  bool is_first() const { return index == 0; }
  bool is_last() const { return index == count - 1; }
  int64_t layers() const { return end_layer - first_layer; }
};

// Stage `index` of `count` over num_layers decoder layers (the even split). Throws
// std::invalid_argument when a stage would get no layer (count > num_layers) or index is outside
// [0, count).
PipelineStage pipeline_stage(int64_t num_layers, int count, int index);

// Decoder layers per stage, stage 0 first (they sum to num_hidden_layers, each at least 1).
// even: as above, the first num_layers % stages stages one layer more. balanced: contiguous runs
// minimising the most expensive stage by model FLOPs per token (module_flops_per_token at
// seq_len; the last stage also pays the head and the MTP modules) — among the optimal splits the
// one whose earlier stages take the most layers. Throws std::invalid_argument like pipeline_stage.
std::vector<int64_t> even_split(int64_t num_layers, int stages);
std::vector<int64_t> balanced_split(const ModelConfig& config, int stages, int64_t seq_len);
// The cost the balanced split minimises, per stage (FLOPs per token).
std::vector<double> stage_flops_per_token(const ModelConfig& config, const std::vector<int64_t>& split,
                                          int64_t seq_len);
// The same from module_flops_per_token computed once (building the costs walks every parameter
// spec: ~47K for DeepSeek-V3, too many to repeat for each candidate split).
std::vector<int64_t> balanced_split(const ModuleFlops& flops, int stages);
std::vector<double> stage_flops_per_token(const ModuleFlops& flops, const std::vector<int64_t>& split);
// Stage `index` of a split.
PipelineStage pipeline_stage(const std::vector<int64_t>& split, int index);

// "stage 1/4: layers 8-15" (and the embedding / head + MTP where the stage holds them).
std::string describe(const PipelineStage& stage, int64_t mtp_depth);
// Every stage of the split, "stage 0/2: embedding, layers 0-1 | stage 1/2: layers 2-3, head + 1 MTP".
std::string describe_pipeline(int64_t num_layers, int64_t mtp_depth, int count);

// Where the stages sit. Sequential: one stage per rank, stage = rank. V-shape (DualPipeV): the
// model is cut into 2P stages for P ranks and rank r holds two chunks, stage r (chunk 0, on the
// way down) and stage 2P-1-r (chunk 1, on the way back up). So rank 0 holds both the embedding
// and the head + MTP modules (the MTP embeddings never leave it), rank P-1 hands its chunk 0's
// output to its own chunk 1, and every other hop is between neighbouring ranks with the chunk
// unchanged (a send from chunk c arrives at the peer's chunk c).
// Interleaved (Megatron's virtual pipeline, interleaved 1F1B): the model is cut into v·P stages
// and rank r holds chunks c = 0..v-1, stage c·P + r. A micro-batch goes round the ranks v times:
// every hop is to the next rank, from rank P-1's chunk c to rank 0's chunk c + 1 at a turn; the
// embedding sits on rank 0, the head and MTP modules on rank P-1 (the MTP embeddings travel
// with the activations through every stage between).
struct PipelineLayout {
  int ranks = 1;
  bool v_shape = false;
  int interleave = 1;  // chunks per rank of an interleaved layout (1: sequential)

  int chunks() const { return v_shape ? 2 : interleave; }
  int stages() const { return ranks * chunks(); }
  int stage_of(int rank, int chunk) const {
    if (v_shape) return chunk == 0 ? rank : 2 * ranks - 1 - rank;
    return chunk * ranks + rank;
  }
  int rank_of(int stage) const {
    if (v_shape) return stage < ranks ? stage : 2 * ranks - 1 - stage;
    return stage % ranks;
  }
  int chunk_of(int stage) const {
    if (v_shape) return stage < ranks ? 0 : 1;
    return stage / ranks;
  }
};

// The balanced split for a layout: sequential, balanced_split above; V-shaped or interleaved,
// where a rank runs several stages, the split that minimises the costliest rank (its stages' costs summed), found
// by local search from the stage-balanced and the even splits — one layer across one boundary at
// a time while that lowers the costliest rank, or at equal cost the sum of squared rank costs.
std::vector<int64_t> balanced_split(const ModelConfig& config, const PipelineLayout& layout, int64_t seq_len);
std::vector<int64_t> balanced_split(const ModuleFlops& flops, const PipelineLayout& layout);
// FLOPs per token of each rank's stages under a split (stage_flops_per_token summed per rank).
std::vector<double> rank_flops_per_token(const ModelConfig& config, const std::vector<int64_t>& split,
                                         const PipelineLayout& layout, int64_t seq_len);
std::vector<double> rank_flops_per_token(const ModuleFlops& flops, const std::vector<int64_t>& split,
                                         const PipelineLayout& layout);

// Each rank's stages of a split (layout.stages() entries), "rank 0: stage 0/4: embedding, layers
// 0-0 + stage 3/4: layers 3-3, head | rank 1: ..." (as describe_pipeline for a sequential layout).
std::string describe_pipeline(const std::vector<int64_t>& split, int64_t mtp_depth, const PipelineLayout& layout);

}  // namespace dsx
