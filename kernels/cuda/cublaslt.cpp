#include "kernels/cuda/cublaslt.h"

#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "kernels/cuda/runtime.h"
#include "kernels/tensor.h"

namespace dsx::cuda::blas {

void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line) {
  throw CublasError(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                    cublasLtGetStatusName(status) + " (" + cublasLtGetStatusString(status) + ")");
}

MatmulArgs row_major(bool trans_a, const RowMajor& a, bool trans_b, const RowMajor& b, void* c, cudaDataType_t c_type,
                     cublasComputeType_t compute, const void* alpha, const void* beta) {
  // Cᵀ = op(b)ᵀ · op(a)ᵀ column-major (header comment): cuBLAS's A is b, its B is a.
  MatmulArgs args;
  args.m = trans_b ? b.rows : b.cols;  // N
  args.n = trans_a ? a.cols : a.rows;  // M
  args.k = trans_a ? a.rows : a.cols;  // K
  args.trans_a = trans_b;
  args.a = b.data;
  args.lda = b.cols;
  args.a_type = b.type;
  args.trans_b = trans_a;
  args.b = a.data;
  args.ldb = a.cols;
  args.b_type = a.type;
  args.c = c;
  args.ldc = args.m;
  args.c_type = c_type;
  args.compute = compute;
  args.alpha = alpha;
  args.beta = beta;
  return args;
}

namespace {

struct HandleDeleter {
  void operator()(cublasLtContext* h) const { cublasLtDestroy(h); }  // no throw at exit
};
struct DescDeleter {
  void operator()(cublasLtMatmulDescOpaque_t* d) const { cublasLtMatmulDescDestroy(d); }
};
struct LayoutDeleter {
  void operator()(cublasLtMatrixLayoutOpaque_t* l) const { cublasLtMatrixLayoutDestroy(l); }
};
struct PreferenceDeleter {
  void operator()(cublasLtMatmulPreferenceOpaque_t* p) const { cublasLtMatmulPreferenceDestroy(p); }
};
using HandlePtr = std::unique_ptr<cublasLtContext, HandleDeleter>;
using DescPtr = std::unique_ptr<cublasLtMatmulDescOpaque_t, DescDeleter>;
using LayoutPtr = std::unique_ptr<cublasLtMatrixLayoutOpaque_t, LayoutDeleter>;
using PreferencePtr = std::unique_ptr<cublasLtMatmulPreferenceOpaque_t, PreferenceDeleter>;

// The largest power of two (at most 256) dividing the address: what the chosen kernel may assume.
uint32_t alignment_of(const void* p) {
  const auto address = reinterpret_cast<uintptr_t>(p);
  uint32_t align = 256;
  while (align > 1 && address % align != 0) align /= 2;
  return align;
}

struct PlanKey {
  int device;
  bool trans_a, trans_b;
  int64_t m, n, k, lda, ldb, ldc;
  cudaDataType_t a_type, b_type, c_type;
  cublasComputeType_t compute;
  BlockScale a_scaling, b_scaling;
  uint32_t align_a, align_b, align_c;
  bool operator==(const PlanKey&) const = default;
};

struct PlanKeyHash {
  size_t operator()(const PlanKey& k) const {
    size_t h = 0;
    const auto mix = [&h](uint64_t v) { h ^= std::hash<uint64_t>{}(v) + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2); };
    mix(static_cast<uint64_t>(k.device));
    mix((k.trans_a ? 1u : 0u) | (k.trans_b ? 2u : 0u));
    for (int64_t v : {k.m, k.n, k.k, k.lda, k.ldb, k.ldc}) mix(static_cast<uint64_t>(v));
    mix((static_cast<uint64_t>(k.a_type) << 32) | static_cast<uint32_t>(k.b_type));
    mix((static_cast<uint64_t>(k.c_type) << 32) | static_cast<uint32_t>(k.compute));
    mix((static_cast<uint64_t>(k.a_scaling) << 8) | static_cast<uint64_t>(k.b_scaling));
    mix((static_cast<uint64_t>(k.align_a) << 32) | (static_cast<uint64_t>(k.align_b) << 16) | k.align_c);
    return h;
  }
};

PlanKey key_of(const MatmulArgs& a, int device) {
  return PlanKey{device,
                 a.trans_a,
                 a.trans_b,
                 a.m,
                 a.n,
                 a.k,
                 a.lda,
                 a.ldb,
                 a.ldc,
                 a.a_type,
                 a.b_type,
                 a.c_type,
                 a.compute,
                 a.a_scaling,
                 a.b_scaling,
                 alignment_of(a.a),
                 alignment_of(a.b),
                 alignment_of(a.c)};
}

std::string describe(const MatmulArgs& a) {
  return "cuBLASLt matmul (column-major) m=" + std::to_string(a.m) + " n=" + std::to_string(a.n) +
         " k=" + std::to_string(a.k) + " op(A)=" + (a.trans_a ? "T" : "N") + " op(B)=" + (a.trans_b ? "T" : "N") +
         " lda=" + std::to_string(a.lda) + " ldb=" + std::to_string(a.ldb) + " ldc=" + std::to_string(a.ldc) +
         " types A/B/C=" + std::to_string(a.a_type) + "/" + std::to_string(a.b_type) + "/" + std::to_string(a.c_type) +
         " compute=" + std::to_string(a.compute) +
         " block scaling A/B=" + std::to_string(static_cast<int>(a.a_scaling)) + "/" +
         std::to_string(static_cast<int>(a.b_scaling));
}

int32_t scale_mode(BlockScale s) {
  return s == BlockScale::vec128 ? CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F
                                 : CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F;
}

template <class T>
void set_attribute(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attribute, const T& value) {
  DSX_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(desc, attribute, &value, sizeof(value)));
}

// The scale pointers change from call to call; they are set on the cached descriptor each time.
void set_scale_pointers(cublasLtMatmulDesc_t desc, const MatmulArgs& args) {
  if (args.a_scaling != BlockScale::none) set_attribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, args.a_scales);
  if (args.b_scaling != BlockScale::none) set_attribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, args.b_scales);
}

LayoutPtr make_layout(cudaDataType_t type, int64_t rows, int64_t cols, int64_t ld) {
  cublasLtMatrixLayout_t layout = nullptr;
  DSX_CUBLAS_CHECK(
      cublasLtMatrixLayoutCreate(&layout, type, static_cast<uint64_t>(rows), static_cast<uint64_t>(cols), ld));
  return LayoutPtr(layout);
}

struct Plan {
  DescPtr desc;
  LayoutPtr a, b, c;
  cublasLtMatmulAlgo_t algo{};
  bool supported = false;
};

DescPtr make_desc(const MatmulArgs& args) {
  cublasLtMatmulDesc_t desc = nullptr;
  const cudaDataType_t scale_type = args.compute == CUBLAS_COMPUTE_64F ? CUDA_R_64F : CUDA_R_32F;
  DSX_CUBLAS_CHECK(cublasLtMatmulDescCreate(&desc, args.compute, scale_type));
  DescPtr owned(desc);
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, args.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N);
  set_attribute(desc, CUBLASLT_MATMUL_DESC_TRANSB, args.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N);
  if (args.a_scaling != BlockScale::none)
    set_attribute(desc, CUBLASLT_MATMUL_DESC_A_SCALE_MODE, scale_mode(args.a_scaling));
  if (args.b_scaling != BlockScale::none)
    set_attribute(desc, CUBLASLT_MATMUL_DESC_B_SCALE_MODE, scale_mode(args.b_scaling));
  set_scale_pointers(desc, args);  // the heuristic sees the problem as it will run
  return owned;
}

PreferencePtr make_preference(const PlanKey& key) {
  cublasLtMatmulPreference_t pref = nullptr;
  DSX_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
  PreferencePtr owned(pref);
  const uint64_t workspace = kWorkspaceBytes;
  DSX_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace,
                                                        sizeof(workspace)));
  const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> alignments[] = {
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align_a},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align_b},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align_c},
      {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align_c}};
  for (const auto& [attribute, bytes] : alignments) {
    DSX_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attribute, &bytes, sizeof(bytes)));
  }
  return owned;
}

std::unique_ptr<Plan> make_plan(cublasLtHandle_t handle, const MatmulArgs& args, const PlanKey& key) {
  auto plan = std::make_unique<Plan>();
  plan->desc = make_desc(args);
  // Stored (pre-op) shapes: op(A) is m × k, so A is k × m when transposed.
  plan->a = make_layout(args.a_type, args.trans_a ? args.k : args.m, args.trans_a ? args.m : args.k, args.lda);
  plan->b = make_layout(args.b_type, args.trans_b ? args.n : args.k, args.trans_b ? args.k : args.n, args.ldb);
  plan->c = make_layout(args.c_type, args.m, args.n, args.ldc);
  const PreferencePtr pref = make_preference(key);
  cublasLtMatmulHeuristicResult_t result{};
  int returned = 0;
  const cublasStatus_t status =
      cublasLtMatmulAlgoGetHeuristic(handle, plan->desc.get(), plan->a.get(), plan->b.get(), plan->c.get(),
                                     plan->c.get(), pref.get(), 1, &result, &returned);
  // "No algorithm" is an answer, cached like any other; block-scaled FP8 on a GPU or shape that
  // cuBLASLt does not cover may also be refused as an invalid value.
  const bool scaled = args.a_scaling != BlockScale::none || args.b_scaling != BlockScale::none;
  if (status == CUBLAS_STATUS_NOT_SUPPORTED || (scaled && status == CUBLAS_STATUS_INVALID_VALUE)) return plan;
  check_status(status, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__);
  if (returned > 0 && result.state == CUBLAS_STATUS_SUCCESS) {
    plan->algo = result.algo;
    plan->supported = true;
  }
  return plan;
}

struct State {
  std::mutex mutex;
  std::unordered_map<int, HandlePtr> handles;
  std::map<std::pair<int, cudaStream_t>, Tensor> workspaces;
  std::unordered_map<PlanKey, std::unique_ptr<Plan>, PlanKeyHash> plans;
};

State& state() {
  // The workspaces are device tensors freed when State is destroyed at exit, which needs the
  // runtime's own statics (compute streams, the allocator): touching them first constructs them
  // first, so they are destroyed after State.
  (void)device_allocator();
  (void)current_stream();
  static State s;
  return s;
}

cublasLtHandle_t handle_for(State& s, int device) {
  auto& handle = s.handles[device];
  if (!handle) {
    cublasLtHandle_t h = nullptr;
    DSX_CUBLAS_CHECK(cublasLtCreate(&h));
    handle.reset(h);
  }
  return handle.get();
}

void* workspace_for(State& s, int device, cudaStream_t stream) {
  // One per stream: a workspace is scratch of the kernels in flight, so two streams running
  // GEMMs at once must not share it. Allocated on `stream`, which is the only one using it.
  auto [it, added] = s.workspaces.try_emplace({device, stream});
  if (added) {
    try {
      it->second = Tensor::empty({static_cast<int64_t>(kWorkspaceBytes / sizeof(float))}, DType::f32, Device::cuda);
    } catch (...) {
      s.workspaces.erase(it);
      throw;
    }
  }
  return it->second.raw();
}

Plan& plan_for(State& s, const MatmulArgs& args, int device) {
  const PlanKey key = key_of(args, device);
  auto it = s.plans.find(key);
  if (it == s.plans.end()) it = s.plans.emplace(key, make_plan(handle_for(s, device), args, key)).first;
  return *it->second;
}

bool run(const MatmulArgs& args, bool required) {
  const int device = current_device();
  const cudaStream_t stream = current_stream();
  State& s = state();
  std::lock_guard lock(s.mutex);
  Plan& plan = plan_for(s, args, device);
  if (!plan.supported) {
    if (required) throw CublasError(describe(args) + ": cuBLASLt has no algorithm for this problem on this GPU");
    return false;
  }
  void* workspace = workspace_for(s, device, stream);
  set_scale_pointers(plan.desc.get(), args);
  DSX_CUBLAS_CHECK(cublasLtMatmul(handle_for(s, device), plan.desc.get(), args.alpha, args.a, plan.a.get(), args.b,
                                  plan.b.get(), args.beta, args.c, plan.c.get(), args.c, plan.c.get(), &plan.algo,
                                  workspace, kWorkspaceBytes, stream));
  return true;
}

}  // namespace

void matmul(const MatmulArgs& args) {
  run(args, true);
}

bool try_matmul(const MatmulArgs& args) {
  return run(args, false);
}

bool supported(const MatmulArgs& args) {
  const int device = current_device();
  State& s = state();
  std::lock_guard lock(s.mutex);
  return plan_for(s, args, device).supported;
}

size_t cached_plan_count() {
  State& s = state();
  std::lock_guard lock(s.mutex);
  return s.plans.size();
}

}  // namespace dsx::cuda::blas
