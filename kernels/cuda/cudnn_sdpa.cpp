// cuDNN fused attention through the backend API (cudnn_backend.h / cudnn_graph.h; no frontend).
//
// cuDNN 9.19 has a dedicated SDPA operation (CUDNN_BACKEND_OPERATION_SDPA_FWD/BWD_DESCRIPTOR),
// but it takes no causal mask before 9.21 (only a block mask and sequence lengths), so causal
// attention is expressed the way cuDNN's runtime-fusion flash-attention engine recognises it: an
// operation graph of matmuls, pointwise ops and reductions over [B, H, S, *] tensors.
// - Forward: S = Q·Kᵀ (f32), S·scale, causal mask (row = GEN_INDEX axis 2, col = GEN_INDEX
//   axis 3, row >= col, BINARY_SELECT(S, −inf)), softmax as MAX reduction, SUB, EXP, ADD
//   reduction, Stats = max + LOG(sum) (the natural-log log-sum-exp of the scaled scores: dsx's
//   lse), P = exp / sum (bf16), O = P·V.
// - Backward: softmax_sum = Σ dO∘O (f32, in the workspace), S = Q·Kᵀ·scale − Stats, causal mask,
//   E = EXP(·) (= P), dV = Eᵀ·dO (transpose = RESHAPE with swapped strides), dP = dO·Vᵀ,
//   dS = (dP − softmax_sum)·E·scale, dK = dSᵀ·Q, dQ_accum (f32, in the workspace) = dS·K, then
//   dQ = IDENTITY(dQ_accum).
// dsx's [B, S, H, D] tensors are described as [B, H, S, D] with strides (S·H·D, D, H·D, 1); Kᵀ
// and Vᵀ are the same memory with the last two dims and strides swapped. Each graph is built,
// heuristics queried and an execution plan finalised once per (device, shape, direction) and
// cached with its descriptors; the scale is a by-value scalar bound at execution.
#include "kernels/cuda/cudnn_sdpa.h"

#include <cudnn.h>

#include <array>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "kernels/cuda/runtime.h"

namespace dsx::cuda::cudnn_sdpa {
namespace {

class CudnnError : public std::runtime_error {
 public:
  explicit CudnnError(const std::string& what) : std::runtime_error(what) {}
};

void check_cudnn(cudnnStatus_t status, const char* what) {
  if (status == CUDNN_STATUS_SUCCESS) return;
  std::array<char, 512> detail{};
  cudnnGetLastErrorString(detail.data(), detail.size());
  throw CudnnError(std::string(what) + ": " + cudnnGetErrorString(status) +
                   (detail[0] != '\0' ? std::string(" (") + detail.data() + ")" : std::string()));
}

// An owned backend descriptor.
class Desc {
 public:
  explicit Desc(cudnnBackendDescriptorType_t type) {
    check_cudnn(cudnnBackendCreateDescriptor(type, &desc_), "cudnnBackendCreateDescriptor");
  }
  ~Desc() {
    if (desc_ != nullptr) cudnnBackendDestroyDescriptor(desc_);
  }
  Desc(Desc&& other) noexcept : desc_(other.desc_) { other.desc_ = nullptr; }
  Desc& operator=(Desc&&) = delete;
  Desc(const Desc&) = delete;
  Desc& operator=(const Desc&) = delete;

  cudnnBackendDescriptor_t get() const { return desc_; }
  Desc& set(cudnnBackendAttributeName_t name, cudnnBackendAttributeType_t type, int64_t count, const void* values) {
    check_cudnn(cudnnBackendSetAttribute(desc_, name, type, count, values), "cudnnBackendSetAttribute");
    return *this;
  }
  Desc& set_desc(cudnnBackendAttributeName_t name, cudnnBackendDescriptor_t d) {
    return set(name, CUDNN_TYPE_BACKEND_DESCRIPTOR, 1, &d);
  }
  Desc& set_i64(cudnnBackendAttributeName_t name, int64_t v) { return set(name, CUDNN_TYPE_INT64, 1, &v); }
  Desc& set_dtype(cudnnBackendAttributeName_t name, cudnnDataType_t t) {
    return set(name, CUDNN_TYPE_DATA_TYPE, 1, &t);
  }
  void finalize() { check_cudnn(cudnnBackendFinalize(desc_), "cudnnBackendFinalize"); }

 private:
  cudnnBackendDescriptor_t desc_ = nullptr;
};

using Dims4 = std::array<int64_t, 4>;

// Builds an operation graph; owns every descriptor it creates (an execution plan may refer to them).
class GraphBuilder {
 public:
  cudnnBackendDescriptor_t tensor(int64_t uid, cudnnDataType_t type, const Dims4& dims, const Dims4& strides,
                                  bool is_virtual = false, bool by_value = false) {
    Desc t(CUDNN_BACKEND_TENSOR_DESCRIPTOR);
    const int64_t alignment = 16;
    const bool v = is_virtual, bv = by_value;
    t.set_dtype(CUDNN_ATTR_TENSOR_DATA_TYPE, type)
        .set(CUDNN_ATTR_TENSOR_DIMENSIONS, CUDNN_TYPE_INT64, 4, dims.data())
        .set(CUDNN_ATTR_TENSOR_STRIDES, CUDNN_TYPE_INT64, 4, strides.data())
        .set_i64(CUDNN_ATTR_TENSOR_UNIQUE_ID, uid)
        .set_i64(CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, alignment)
        .set(CUDNN_ATTR_TENSOR_IS_VIRTUAL, CUDNN_TYPE_BOOLEAN, 1, &v);
    if (by_value) t.set(CUDNN_ATTR_TENSOR_IS_BY_VALUE, CUDNN_TYPE_BOOLEAN, 1, &bv);
    t.finalize();
    return keep(std::move(t));
  }
  cudnnBackendDescriptor_t virtual_tensor(cudnnDataType_t type, const Dims4& dims, const Dims4& strides) {
    return tensor(next_virtual_uid_++, type, dims, strides, true);
  }
  cudnnBackendDescriptor_t scalar(int64_t uid) {
    return tensor(uid, CUDNN_DATA_FLOAT, {1, 1, 1, 1}, {1, 1, 1, 1}, false, true);
  }

  // y = mode(x[, b][, t]); axis for GEN_INDEX.
  void pointwise(cudnnPointwiseMode_t mode, cudnnDataType_t math, cudnnBackendDescriptor_t x,
                 cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t t, cudnnBackendDescriptor_t y,
                 int64_t axis = -1) {
    Desc pw(CUDNN_BACKEND_POINTWISE_DESCRIPTOR);
    pw.set(CUDNN_ATTR_POINTWISE_MODE, CUDNN_TYPE_POINTWISE_MODE, 1, &mode)
        .set_dtype(CUDNN_ATTR_POINTWISE_MATH_PREC, math);
    if (axis >= 0) pw.set_i64(CUDNN_ATTR_POINTWISE_AXIS, axis);
    pw.finalize();
    Desc op(CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, pw.get())
        .set_desc(CUDNN_ATTR_OPERATION_POINTWISE_XDESC, x);
    if (b != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_BDESC, b);
    if (t != nullptr) op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_TDESC, t);
    op.set_desc(CUDNN_ATTR_OPERATION_POINTWISE_YDESC, y).finalize();
    keep(std::move(pw));
    add_op(std::move(op));
  }
  void reduction(cudnnReduceTensorOp_t reduce, cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    Desc red(CUDNN_BACKEND_REDUCTION_DESCRIPTOR);
    red.set(CUDNN_ATTR_REDUCTION_OPERATOR, CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, 1, &reduce)
        .set_dtype(CUDNN_ATTR_REDUCTION_COMP_TYPE, CUDNN_DATA_FLOAT)
        .finalize();
    Desc op(CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_REDUCTION_XDESC, x)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_YDESC, y)
        .set_desc(CUDNN_ATTR_OPERATION_REDUCTION_DESC, red.get())
        .finalize();
    keep(std::move(red));
    add_op(std::move(op));
  }
  void matmul(cudnnBackendDescriptor_t a, cudnnBackendDescriptor_t b, cudnnBackendDescriptor_t c) {
    Desc mm(CUDNN_BACKEND_MATMUL_DESCRIPTOR);
    mm.set_dtype(CUDNN_ATTR_MATMUL_COMP_TYPE, CUDNN_DATA_FLOAT).finalize();
    Desc op(CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_MATMUL_ADESC, a)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_BDESC, b)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_CDESC, c)
        .set_desc(CUDNN_ATTR_OPERATION_MATMUL_DESC, mm.get())
        .finalize();
    keep(std::move(mm));
    add_op(std::move(op));
  }
  // y: the same elements as x seen through other dims/strides (used for transposes).
  void reshape(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y) {
    Desc op(CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR);
    op.set_desc(CUDNN_ATTR_OPERATION_RESHAPE_XDESC, x).set_desc(CUDNN_ATTR_OPERATION_RESHAPE_YDESC, y).finalize();
    add_op(std::move(op));
  }

  // Causal mask of a [B, H, S, S] score tensor: y = row >= col ? x : −inf.
  void causal_mask(cudnnBackendDescriptor_t x, cudnnBackendDescriptor_t y, const Dims4& dims, const Dims4& strides,
                   int64_t neg_inf_uid) {
    auto row = virtual_tensor(CUDNN_DATA_INT32, dims, strides);
    auto col = virtual_tensor(CUDNN_DATA_INT32, dims, strides);
    auto keep_mask = virtual_tensor(CUDNN_DATA_BOOLEAN, dims, strides);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, nullptr, nullptr, row, 2);
    pointwise(CUDNN_POINTWISE_GEN_INDEX, CUDNN_DATA_FLOAT, x, nullptr, nullptr, col, 3);
    pointwise(CUDNN_POINTWISE_CMP_GE, CUDNN_DATA_BOOLEAN, row, col, nullptr, keep_mask);
    pointwise(CUDNN_POINTWISE_BINARY_SELECT, CUDNN_DATA_FLOAT, x, scalar(neg_inf_uid), keep_mask, y);
  }

  Desc finalize_graph(cudnnHandle_t handle) {
    std::vector<cudnnBackendDescriptor_t> ops;
    for (const Desc& op : ops_) ops.push_back(op.get());
    Desc graph(CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR);
    graph
        .set(CUDNN_ATTR_OPERATIONGRAPH_OPS, CUDNN_TYPE_BACKEND_DESCRIPTOR, static_cast<int64_t>(ops.size()), ops.data())
        .set(CUDNN_ATTR_OPERATIONGRAPH_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
        .finalize();
    return graph;
  }

 private:
  cudnnBackendDescriptor_t keep(Desc d) {
    owned_.push_back(std::make_unique<Desc>(std::move(d)));
    return owned_.back()->get();
  }
  void add_op(Desc op) { ops_.push_back(std::move(op)); }

  std::vector<std::unique_ptr<Desc>> owned_;
  std::vector<Desc> ops_;
  int64_t next_virtual_uid_ = 1000;
};

// Tensor uids of the two graphs (the variant pack binds pointers to them).
enum Uid : int64_t { kQ = 1, kK, kV, kO, kStats, kDO, kDQ, kDK, kDV, kScale, kOne, kNegInf, kSoftmaxSum, kDQAccum };

// [B, H, S, D] view of a [B, S, H, D] tensor, and its transpose [B, H, D, S].
Dims4 bhsd(const Shape4& s, int64_t d) {
  return {s.batch, s.heads, s.seq, d};
}
Dims4 bhsd_strides(const Shape4& s, int64_t d) {
  return {s.seq * s.heads * d, d, s.heads * d, 1};
}
Dims4 bhds(const Shape4& s, int64_t d) {
  return {s.batch, s.heads, d, s.seq};
}
Dims4 bhds_strides(const Shape4& s, int64_t d) {
  return {s.seq * s.heads * d, d, 1, s.heads * d};
}
// Scores [B, H, S, S] row-major, their transpose, and per-row values [B, H, S, 1].
Dims4 scores(const Shape4& s) {
  return {s.batch, s.heads, s.seq, s.seq};
}
Dims4 scores_strides(const Shape4& s) {
  return {s.heads * s.seq * s.seq, s.seq * s.seq, s.seq, 1};
}
Dims4 scores_t_strides(const Shape4& s) {
  return {s.heads * s.seq * s.seq, s.seq * s.seq, 1, s.seq};
}
Dims4 rows(const Shape4& s) {
  return {s.batch, s.heads, s.seq, 1};
}
Dims4 rows_strides(const Shape4& s) {
  return {s.heads * s.seq, s.seq, 1, 1};
}

void build_forward(GraphBuilder& g, const Shape4& s) {
  const auto bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  auto q = g.tensor(kQ, bf16, bhsd(s, s.dqk), bhsd_strides(s, s.dqk));
  auto kt = g.tensor(kK, bf16, bhds(s, s.dqk), bhds_strides(s, s.dqk));
  auto v = g.tensor(kV, bf16, bhsd(s, s.dv), bhsd_strides(s, s.dv));
  auto o = g.tensor(kO, bf16, bhsd(s, s.dv), bhsd_strides(s, s.dv));
  auto stats = g.tensor(kStats, f32, rows(s), rows_strides(s));
  const Dims4 sd = scores(s), ss = scores_strides(s), rd = rows(s), rs = rows_strides(s);

  auto raw = g.virtual_tensor(f32, sd, ss);
  g.matmul(q, kt, raw);
  auto scaled = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, raw, g.scalar(kScale), nullptr, scaled);
  auto masked = g.virtual_tensor(f32, sd, ss);
  g.causal_mask(scaled, masked, sd, ss, kNegInf);
  auto row_max = g.virtual_tensor(f32, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_MAX, masked, row_max);
  auto shifted = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, f32, masked, row_max, nullptr, shifted);
  auto exps = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, f32, shifted, nullptr, nullptr, exps);
  auto row_sum = g.virtual_tensor(f32, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, exps, row_sum);
  auto log_sum = g.virtual_tensor(f32, rd, rs);
  g.pointwise(CUDNN_POINTWISE_LOG, f32, row_sum, nullptr, nullptr, log_sum);
  g.pointwise(CUDNN_POINTWISE_ADD, f32, row_max, log_sum, nullptr, stats);
  auto probs = g.virtual_tensor(bf16, sd, ss);  // the second matmul takes its A in the i/o type
  g.pointwise(CUDNN_POINTWISE_DIV, f32, exps, row_sum, nullptr, probs);
  g.matmul(probs, v, o);
}

void build_backward(GraphBuilder& g, const Shape4& s) {
  const auto bf16 = CUDNN_DATA_BFLOAT16, f32 = CUDNN_DATA_FLOAT;
  auto q = g.tensor(kQ, bf16, bhsd(s, s.dqk), bhsd_strides(s, s.dqk));
  auto kt = g.tensor(kK, bf16, bhds(s, s.dqk), bhds_strides(s, s.dqk));
  auto vt = g.tensor(kV, bf16, bhds(s, s.dv), bhds_strides(s, s.dv));
  auto o = g.tensor(kO, bf16, bhsd(s, s.dv), bhsd_strides(s, s.dv));
  auto d_o = g.tensor(kDO, bf16, bhsd(s, s.dv), bhsd_strides(s, s.dv));
  auto stats = g.tensor(kStats, f32, rows(s), rows_strides(s));
  auto dq = g.tensor(kDQ, bf16, bhsd(s, s.dqk), bhsd_strides(s, s.dqk));
  auto dk = g.tensor(kDK, bf16, bhsd(s, s.dqk), bhsd_strides(s, s.dqk));
  auto dv = g.tensor(kDV, bf16, bhsd(s, s.dv), bhsd_strides(s, s.dv));
  auto softmax_sum = g.tensor(kSoftmaxSum, f32, rows(s), rows_strides(s));
  auto dq_accum = g.tensor(kDQAccum, f32, bhsd(s, s.dqk), {s.heads * s.seq * s.dqk, s.seq * s.dqk, s.dqk, 1});
  const Dims4 sd = scores(s), ss = scores_strides(s), rd = rows(s), rs = rows_strides(s);

  // softmax_sum = Σ_c dO∘O (the softmax Jacobian's correction term), times 1 as cuDNN expects.
  auto do_o = g.virtual_tensor(f32, bhsd(s, s.dv), bhsd_strides(s, s.dv));
  g.pointwise(CUDNN_POINTWISE_MUL, f32, d_o, o, nullptr, do_o);
  auto do_o_sum = g.virtual_tensor(f32, rd, rs);
  g.reduction(CUDNN_REDUCE_TENSOR_ADD, do_o, do_o_sum);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, do_o_sum, g.scalar(kOne), nullptr, softmax_sum);

  // P = exp(scale·Q·Kᵀ − stats), masked.
  auto raw = g.virtual_tensor(f32, sd, ss);
  g.matmul(q, kt, raw);
  auto scaled = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, raw, g.scalar(kScale), nullptr, scaled);
  auto shifted = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, f32, scaled, stats, nullptr, shifted);
  auto masked = g.virtual_tensor(f32, sd, ss);
  g.causal_mask(shifted, masked, sd, ss, kNegInf);
  auto probs = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_EXP, f32, masked, nullptr, nullptr, probs);

  // dV = Pᵀ·dO
  auto probs_t = g.virtual_tensor(bf16, {s.batch, s.heads, s.seq, s.seq}, scores_t_strides(s));
  g.reshape(probs, probs_t);
  g.matmul(probs_t, d_o, dv);

  // dS = P∘(dO·Vᵀ − softmax_sum)·scale
  auto dp = g.virtual_tensor(f32, sd, ss);
  g.matmul(d_o, vt, dp);
  auto dp_centered = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_SUB, f32, dp, softmax_sum, nullptr, dp_centered);
  auto ds_unscaled = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, dp_centered, probs, nullptr, ds_unscaled);
  auto ds = g.virtual_tensor(f32, sd, ss);
  g.pointwise(CUDNN_POINTWISE_MUL, f32, ds_unscaled, g.scalar(kScale), nullptr, ds);

  // dK = dSᵀ·Q
  auto ds_t = g.virtual_tensor(bf16, {s.batch, s.heads, s.seq, s.seq}, scores_t_strides(s));
  g.reshape(ds, ds_t);
  g.matmul(ds_t, q, dk);

  // dQ = dS·K, accumulated in f32 then converted.
  auto k = g.virtual_tensor(bf16, bhsd(s, s.dqk), bhsd_strides(s, s.dqk));
  g.reshape(kt, k);
  g.matmul(ds, k, dq_accum);
  g.pointwise(CUDNN_POINTWISE_IDENTITY, f32, dq_accum, nullptr, nullptr, dq);
}

// An execution plan and everything it was built from (kept alive with it: the backend may
// refer to the graph and engine config descriptors), or why none could be built.
struct Plan {
  GraphBuilder graph;
  std::unique_ptr<Desc> op_graph, heuristics, plan;
  std::vector<Desc> configs;
  int64_t workspace_bytes = 0;
  std::string failure;
};

// One cuDNN handle per device, created on first use.
cudnnHandle_t handle_for(int device) {
  static std::mutex mutex;
  static std::map<int, cudnnHandle_t> handles;  // never destroyed: cuDNN may outlive static teardown order
  std::lock_guard<std::mutex> lock(mutex);
  auto it = handles.find(device);
  if (it != handles.end()) return it->second;
  cudnnHandle_t h = nullptr;
  check_cudnn(cudnnCreate(&h), "cudnnCreate");
  handles.emplace(device, h);
  return h;
}

// Queries heuristics for p.op_graph and keeps the first engine config that finalises.
void make_plan(cudnnHandle_t handle, Plan& p) {
  p.heuristics = std::make_unique<Desc>(CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR);
  const cudnnBackendHeurMode_t mode = CUDNN_HEUR_MODE_A;
  p.heuristics->set_desc(CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, p.op_graph->get())
      .set(CUDNN_ATTR_ENGINEHEUR_MODE, CUDNN_TYPE_HEUR_MODE, 1, &mode)
      .finalize();
  int64_t count = 0;
  check_cudnn(cudnnBackendGetAttribute(p.heuristics->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &count, nullptr),
              "engine heuristics count");
  if (count <= 0) throw CudnnError("cuDNN heuristics found no engine for the attention graph");
  std::vector<cudnnBackendDescriptor_t> raw;
  for (int64_t i = 0; i < count; ++i) {
    p.configs.emplace_back(CUDNN_BACKEND_ENGINECFG_DESCRIPTOR);
    raw.push_back(p.configs.back().get());  // the handle survives the vector's moves
  }
  int64_t returned = 0;
  check_cudnn(cudnnBackendGetAttribute(p.heuristics->get(), CUDNN_ATTR_ENGINEHEUR_RESULTS,
                                       CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &returned, raw.data()),
              "engine heuristics results");
  std::string errors;
  for (int64_t i = 0; i < returned; ++i) {
    try {
      auto plan = std::make_unique<Desc>(CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR);
      plan->set(CUDNN_ATTR_EXECUTION_PLAN_HANDLE, CUDNN_TYPE_HANDLE, 1, &handle)
          .set_desc(CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, raw[static_cast<size_t>(i)]);
      plan->finalize();
      int64_t returned_sizes = 0;
      check_cudnn(cudnnBackendGetAttribute(plan->get(), CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, CUDNN_TYPE_INT64, 1,
                                           &returned_sizes, &p.workspace_bytes),
                  "plan workspace size");
      p.plan = std::move(plan);
      return;
    } catch (const CudnnError& e) {
      errors += std::string(errors.empty() ? "" : "; ") + e.what();
    }
  }
  throw CudnnError("no engine config of the attention graph finalised: " + errors);
}

std::shared_ptr<Plan> build_plan(const Shape4& shape, bool backward, int device) {
  auto p = std::make_shared<Plan>();
  try {
    const cudnnHandle_t handle = handle_for(device);
    if (backward) {
      build_backward(p->graph, shape);
    } else {
      build_forward(p->graph, shape);
    }
    p->op_graph = std::make_unique<Desc>(p->graph.finalize_graph(handle));
    make_plan(handle, *p);
  } catch (const CudnnError& e) {
    p->failure = e.what();
  }
  return p;
}

std::shared_ptr<Plan> plan_for(const Shape4& s, bool backward) {
  static std::mutex mutex;
  static std::map<std::tuple<int, bool, int64_t, int64_t, int64_t, int64_t, int64_t>, std::shared_ptr<Plan>> cache;
  const int device = current_device();
  const auto key = std::make_tuple(device, backward, s.batch, s.seq, s.heads, s.dqk, s.dv);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, build_plan(s, backward, device)).first;
  return it->second;
}

constexpr int64_t kAlign = 256;
int64_t round_up(int64_t n) {
  return (n + kAlign - 1) / kAlign * kAlign;
}

// One device buffer for the plan's workspace and the backward's f32 intermediates.
Tensor workspace(int64_t bytes) {
  return Tensor::empty({std::max<int64_t>(1, (bytes + 3) / 4)}, DType::f32, Device::cuda);
}

void execute(const Plan& p, const std::vector<int64_t>& uids, const std::vector<void*>& pointers, void* work) {
  const cudnnHandle_t handle = handle_for(current_device());
  Desc pack(CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR);
  pack.set(CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, CUDNN_TYPE_INT64, static_cast<int64_t>(uids.size()), uids.data())
      .set(CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, CUDNN_TYPE_VOID_PTR, static_cast<int64_t>(pointers.size()),
           pointers.data())
      .set(CUDNN_ATTR_VARIANT_PACK_WORKSPACE, CUDNN_TYPE_VOID_PTR, 1, &work)
      .finalize();
  static std::mutex mutex;  // the handle's stream is shared state
  std::lock_guard<std::mutex> lock(mutex);
  check_cudnn(cudnnSetStream(handle, current_stream()), "cudnnSetStream");
  check_cudnn(cudnnBackendExecute(handle, p.plan->get(), pack.get()), "cudnnBackendExecute (attention)");
}

const Plan& ready_plan(const Shape4& s, bool backward) {
  const auto p = plan_for(s, backward);
  if (!p->failure.empty()) throw CudnnError("cuDNN attention: " + p->failure);
  return *p;  // cached for the process's lifetime
}

void* ptr(const Tensor& t) {
  return const_cast<void*>(static_cast<const void*>(t.data<bf16>()));
}

}  // namespace

bool aligned(const Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.raw()) % 16 == 0;
}

bool shape_supported(const Shape4& s, std::string* why_not) {
  auto fail = [&](const std::string& why) {
    if (why_not) *why_not = why;
    return false;
  };
  // Before 9.6 the backward's dQ accumulator had to be zeroed by the caller (cuDNN frontend's
  // SDPA node memsets it there); 9.10.0 and 9.10.1 have known SDPA bugs (the frontend refuses them).
  const size_t version = cudnnGetVersion();
  if (version < 90600) return fail("cuDNN older than 9.6");
  if (version == 91000 || version == 91001) return fail("cuDNN 9.10.0/9.10.1 have known attention bugs");
  if (s.dqk % 8 != 0 || s.dv % 8 != 0 || s.dqk > 256 || s.dv > 256) {
    return fail("head dims must be multiples of 8 up to 256 for cuDNN");
  }
  int major = 0;  // an attribute query is cheap, unlike cudaGetDeviceProperties (called per op)
  DSX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, current_device()));
  if (major < 8) return fail("cuDNN flash attention needs compute capability 8.0 or later");
  return true;
}

bool available(const Shape4& s, bool backward, std::string* why_not) {
  if (!shape_supported(s, why_not)) return false;
  // The backward limits cuDNN frontend's SDPA node enforces for this graph: no single-token
  // sequences, and through 9.15 a sequence length that is a multiple of 128 (otherwise the
  // frontend adds a padding mask as a workaround, which this graph does not have).
  if (backward && s.seq == 1) {
    if (why_not) *why_not = "cuDNN attention backward does not support a sequence of length 1";
    return false;
  }
  if (backward && cudnnGetVersion() <= 91500 && s.seq % 128 != 0) {
    if (why_not) *why_not = "cuDNN 9.15 or older needs a sequence length multiple of 128 for the backward";
    return false;
  }
  const auto p = plan_for(s, backward);
  if (!p->failure.empty()) {
    if (why_not) *why_not = p->failure;
    return false;
  }
  return true;
}

void forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, Tensor& out, Tensor& lse) {
  const Shape4 s{q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)};
  const Plan& p = ready_plan(s, false);
  float scale_value = static_cast<float>(scale), neg_inf = -std::numeric_limits<float>::infinity();
  Tensor work = workspace(p.workspace_bytes);
  execute(p, {kQ, kK, kV, kO, kStats, kScale, kNegInf},
          {ptr(q), ptr(k), ptr(v), ptr(out), lse.data<float>(), &scale_value, &neg_inf}, work.raw());
}

void backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
              const Tensor& dout, double scale, Tensor& dq, Tensor& dk, Tensor& dv) {
  const Shape4 s{q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)};
  const Plan& p = ready_plan(s, true);
  float scale_value = static_cast<float>(scale), one = 1.f, neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t sum_bytes = round_up(s.batch * s.heads * s.seq * 4);
  const int64_t accum_bytes = round_up(s.batch * s.heads * s.seq * s.dqk * 4);
  Tensor work = workspace(sum_bytes + accum_bytes + p.workspace_bytes);
  char* base = static_cast<char*>(work.raw());
  execute(p, {kQ, kK, kV, kO, kDO, kStats, kDQ, kDK, kDV, kScale, kOne, kNegInf, kSoftmaxSum, kDQAccum},
          {ptr(q), ptr(k), ptr(v), ptr(out), ptr(dout), const_cast<float*>(lse.data<float>()), ptr(dq), ptr(dk),
           ptr(dv), &scale_value, &one, &neg_inf, base, base + sum_bytes},
          base + sum_bytes + accum_bytes);
}

}  // namespace dsx::cuda::cudnn_sdpa
