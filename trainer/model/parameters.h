// Model parameters: what each one is (ParamSpec) and where its value and gradient live
// (ParameterStore).
//
// Every parameter is registered under its Hugging Face DeepseekV3 name with its global shape
// and a shard spec (ARCHITECTURE.md principle 3); that list, built by model_param_specs from
// the config alone, drives allocation, initialisation, parameter counting, the optimizer's
// weight-decay groups and (later) ZeRO sharding, gradient reduction groups and checkpoints.
#pragma once
#include <cstdint>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "kernels/tensor.h"
#include "trainer/model/config.h"
#include "trainer/model/precision.h"

namespace dsx {

// How a parameter is split across ranks.
//  none:   replicated (norms, the router, the MLA down-projections, eh_proj).
//  tensor: dimension `dim` of the global shape is split over the TP group.
//  expert: the tensor belongs to routed expert `expert_index` of `num_experts` in its layer;
//          the EP group splits a layer's experts evenly, so it lives on EP rank
//          expert_index / (num_experts / ep_size), whole.
enum class ShardAxis : uint8_t { none, tensor, expert };
struct ShardSpec {
  ShardAxis axis = ShardAxis::none;
  int dim = -1;
  int64_t expert_index = -1;
  int64_t num_experts = 0;

  static ShardSpec replicated() { return {}; }
  static ShardSpec tensor_parallel(int dim) { return {ShardAxis::tensor, dim, -1, 0}; }
  static ShardSpec expert_parallel(int64_t expert, int64_t n) { return {ShardAxis::expert, -1, expert, n}; }
};

enum class InitKind : uint8_t { normal, ones, zeros };

struct ParamSpec {
  std::string name;  // Hugging Face name, e.g. "model.layers.3.mlp.experts.17.up_proj.weight"
  Shape shape;       // global shape
  ShardSpec shard;
  bool weight_decay = true;  // false for norms and biases
  bool trainable = true;     // false for buffers (the router's e_score_correction_bias)
  InitKind init = InitKind::normal;
  double init_std = 0.02;  // for InitKind::normal
  // Classification for counting, derived when the spec is made (not parsed from the name):
  int64_t layer = -1;          // decoder layer index (MTP modules continue after the main layers); -1: none
  bool mtp = false;            // belongs to an MTP module
  bool routed_expert = false;  // weight of a routed expert (active for top_k of n_routed_experts tokens)

  int64_t numel() const { return shape_numel(shape); }
};

// The complete, ordered list of the model's parameters for a config (validated first).
std::vector<ParamSpec> model_param_specs(const ModelConfig& config);

// Which part of a tensor-parallel (ShardAxis::tensor) parameter a rank holds: part `rank` of
// `size` equal parts along the spec's dim. Other parameters are held whole whatever it says.
struct TensorShard {
  int size = 1;
  int rank = 0;
};

// One parameter: its spec, its value and its gradient (undefined when not trainable).
struct Parameter {
  ParamSpec spec;
  // value and grad hold the box [offset, offset + value.shape()) of the global tensor spec.shape:
  // the whole tensor (offset all zeros) unless the parameter is split over tensor parallelism.
  Shape offset;
  Tensor value;
  Tensor grad;
  LinearPrecision precision;  // how the owning module computes (trainer/model/precision.h); set by Model
  // Under sequence parallelism a replicated weight of a module that runs on this rank's tokens
  // only (a norm, MTP's eh_proj) gets this rank's part of its gradient: the trainer sums it over
  // TP once per step, before the optimizer sees it. Set by Model.
  bool grad_partial_over_tp = false;
  // value rounded to bf16 for its bf16 GEMMs, made once for the micro-batches of a step instead
  // of by every GEMM call; defined only while a GemmWeightCopies scope is open (below).
  Tensor gemm_copy;
  // The weight operand of this parameter's GEMMs: the bf16 copy when one is held, else value
  // (rounded by the bf16 GEMM itself; both give the same bits).
  const Tensor& gemm_operand() const { return gemm_copy.defined() ? gemm_copy : value; }
};

// Values and gradients by name, kept in registration order. References to entries stay valid
// while the store lives (modules hold them).
class ParameterStore {
 public:
  // Values and gradients live on `device`; initialisation is computed on the host and copied.
  explicit ParameterStore(DType dtype, Device device = Device::cpu) : dtype_(dtype), device_(device) {}
  ParameterStore(const ParameterStore&) = delete;
  ParameterStore& operator=(const ParameterStore&) = delete;

  // Allocates the value (zeros until initialize) and, for a trainable parameter, a zero gradient:
  // the whole tensor, or the shard's box of a ShardAxis::tensor parameter (its dim must divide
  // evenly; throws std::invalid_argument otherwise).
  Parameter& add(ParamSpec spec, TensorShard shard = {});
  Parameter& at(std::string_view name);
  const Parameter& at(std::string_view name) const;
  bool contains(std::string_view name) const;

  // Sets every value from its spec: normal(0, init_std) from Philox keyed by (seed, hash of
  // the name) and the global element index, ones or zeros. Independent of registration order
  // and of how the tensor is sharded (a shard draws the values of its box of the global tensor). Every matrix, output
  // projections included, uses the same init_std = initializer_range (Hugging Face DeepseekV3's _init_weights; no
  // depth-scaled init for o_proj/down_proj), norms start at 1 and the router bias at 0.
  void initialize(uint64_t seed);
  void zero_grad();

  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t size() const { return params_.size(); }
  int64_t numel() const;  // elements over all parameters
  auto begin() { return params_.begin(); }
  auto end() { return params_.end(); }
  auto begin() const { return params_.begin(); }
  auto end() const { return params_.end(); }

 private:
  DType dtype_;
  Device device_;
  std::deque<Parameter> params_;  // deque: push_back keeps references to earlier entries valid
  std::unordered_map<std::string, size_t> index_;
};

// While alive, every weight whose GEMMs run in bf16 (precision.gemm / exceptions) holds a bf16
// copy of its value (Parameter::gemm_copy), so the forward and backward GEMMs of all the
// micro-batches of a step convert it once instead of once per call (on a GPU the conversions of
// every weight per call cost ~10% of a step). The values must not change while the copies live:
// open the scope after the optimizer step, close it before the next (trainer/train/trainer.cpp).
class GemmWeightCopies {
 public:
  explicit GemmWeightCopies(ParameterStore& params);
  ~GemmWeightCopies();
  GemmWeightCopies(const GemmWeightCopies&) = delete;
  GemmWeightCopies& operator=(const GemmWeightCopies&) = delete;

 private:
  ParameterStore& params_;
};

// The value of element `index` (row-major, global) of a parameter initialised with `spec`.
double initial_value(const ParamSpec& spec, uint64_t seed, int64_t index);

// Row-major index in `global` of element `local_index` of the box [offset, offset + local).
int64_t global_element_index(const Shape& global, const Shape& offset, const Shape& local, int64_t local_index);

}  // namespace dsx
