// cuBLASLt for dsx: one handle per device, a workspace per (device, stream), and matmul plans
// (descriptors + the algorithm cublasLtMatmulAlgoGetHeuristic chose) cached per problem, so a
// training step asks the heuristic only on the first call of each GEMM shape.
//
// ## Row-major dsx tensors on column-major cuBLAS
//
// cuBLAS reads matrices column-major. A row-major [r, c] buffer read column-major (ld = c) is
// its transpose, a c × r matrix. dsx wants, row-major,
//     C [M, N] = op(A) [M, K] · op(B) [K, N]
// and computes the transposed product column-major instead,
//     Cᵀ (N × M, ld N) = op(B)ᵀ · op(A)ᵀ,
// which is the same buffer. So cuBLAS's first operand is dsx's B and its second is dsx's A:
//     cuBLAS m = N, n = M, k = K
//     cuBLAS A = B's buffer, a col-major [B.cols × B.rows] matrix (ld = B.cols), op = trans_b
//     cuBLAS B = A's buffer, a col-major [A.cols × A.rows] matrix (ld = A.cols), op = trans_a
//     cuBLAS C = D = C's buffer, col-major N × M (ld = N)
// The column-major view of B's buffer is Bᵀ, and op(B)ᵀ is Bᵀ (no trans_b: cuBLAS op N) or B
// (trans_b: cuBLAS op T of Bᵀ); either way cuBLAS's op(A) is op(B)ᵀ, N × K. Likewise for A.
// row_major() below builds these arguments; nothing else in dsx needs to think about it.
//
// The FP8 GEMM d [M, N] = a [M, K] · b [N, K]ᵀ becomes cuBLAS's "TN" GEMM: A = b (op T,
// stored K × N, K contiguous), B = a (op N, stored K × M): the only layout cuBLASLt FP8 takes.
//
// ## Plan cache
//
// A plan is keyed by everything the heuristic sees: device, transposes, m/n/k, leading
// dimensions, the four data types, compute and scale types, the block-scaling modes of A and B
// and the alignment (power of two up to 256 bytes) of the four pointers — cuBLASLt may pick
// kernels that need 16-byte-aligned operands, so an offset view (Tensor::slice) with a smaller
// alignment gets its own plan, queried with CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES. A
// problem the heuristic rejects is cached as unsupported too. Plans live for the process.
// Calls are serialised by one mutex (the per-call scale pointers are set on the cached
// descriptor); the work itself is enqueued on current_stream() and never waited for.
#pragma once
#include <cublasLt.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace dsx::cuda::blas {

// A failed cuBLAS call: the message names the call, its file and line, and cuBLAS's status.
class CublasError : public std::runtime_error {
 public:
  explicit CublasError(const std::string& what) : std::runtime_error(what) {}
};

[[noreturn]] void throw_cublas_error(cublasStatus_t status, const char* call, const char* file, int line);
inline void check_status(cublasStatus_t status, const char* call, const char* file, int line) {
  if (status != CUBLAS_STATUS_SUCCESS) throw_cublas_error(status, call, file, line);
}
// DSX_CUBLAS_CHECK(cublasLtMatmul(...)) throws CublasError("cublasLtMatmul(...) failed at
// kernels/cuda/cublaslt.cpp:12: CUBLAS_STATUS_INVALID_VALUE (an invalid value ...)").
#define DSX_CUBLAS_CHECK(call) ::dsx::cuda::blas::check_status((call), #call, __FILE__, __LINE__)

// Block scaling of an FP8 operand (cuBLASLt's A/B scale modes); none = no scale pointer.
enum class BlockScale : int8_t { none, vec128, blk128x128 };

// One cuBLASLt matmul, column-major: D = C = alpha · op(A) · op(B) + beta · C, in place.
struct MatmulArgs {
  bool trans_a = false, trans_b = false;  // cuBLAS's op(A), op(B)
  int64_t m = 0, n = 0, k = 0;            // op(A) is m × k, op(B) is k × n, C is m × n
  const void* a = nullptr;
  int64_t lda = 0;
  cudaDataType_t a_type = CUDA_R_32F;
  const void* b = nullptr;
  int64_t ldb = 0;
  cudaDataType_t b_type = CUDA_R_32F;
  void* c = nullptr;
  int64_t ldc = 0;
  cudaDataType_t c_type = CUDA_R_32F;
  cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
  // Host scalars of the scale type: float for CUBLAS_COMPUTE_32F, double for CUBLAS_COMPUTE_64F.
  const void* alpha = nullptr;
  const void* beta = nullptr;
  // FP8 block scales (device f32, in cuBLASLt's layouts: see kernels/cuda/gemm_fp8.cu).
  BlockScale a_scaling = BlockScale::none, b_scaling = BlockScale::none;
  const float* a_scales = nullptr;
  const float* b_scales = nullptr;
};

// A dsx row-major matrix [rows, cols] (contiguous) as one operand of row_major().
struct RowMajor {
  const void* data;
  cudaDataType_t type;
  int64_t rows, cols;
};

// The MatmulArgs of C [M, N] = alpha · op(a) · op(b) + beta · C with row-major a, b and C
// (op(x) = xᵀ when trans_x), following the mapping in the header comment. M, N, K > 0.
MatmulArgs row_major(bool trans_a, const RowMajor& a, bool trans_b, const RowMajor& b, void* c, cudaDataType_t c_type,
                     cublasComputeType_t compute, const void* alpha, const void* beta);

// Enqueues the matmul on current_stream(). Throws CublasError when cuBLASLt has no algorithm
// for the problem (naming it) or a call fails.
void matmul(const MatmulArgs& args);
// As matmul, but returns false (enqueuing nothing) where the heuristic finds no algorithm —
// for paths with a fallback (FP8 block scaling needs Hopper and 16-aligned shapes).
bool try_matmul(const MatmulArgs& args);
// Whether the heuristic has an algorithm for the problem (queried once, then cached); enqueues
// nothing. The pointers in args only matter through their alignment.
bool supported(const MatmulArgs& args);

// Bytes of each workspace (one per device and stream, allocated on first use).
inline constexpr size_t kWorkspaceBytes = size_t(32) << 20;
// Number of plans cached so far (all devices): tests check that repeated calls add none.
size_t cached_plan_count();

}  // namespace dsx::cuda::blas
