// bench_cuda_gemm: bf16 TFLOP/s of dsx's linear forward / backward_input / backward_weight on
// the GPU (cuBLASLt with cached plans, bf16 operands, fp32 accumulation and f32 outputs) next to
// a direct cublasGemmEx call (cuBLAS, not Lt) on the same buffers, at DeepSeek-V3 shapes. The
// ratio dsx/cuBLAS is the figure of merit: what dsx's checks, dispatch and plan cache cost.
// tools/bench/torch_gemm.py prints the same rows for torch.matmul. Built in CUDA builds only;
// prints a skip message and exits 0 where there is no device.
#include <cublas_v2.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <limits>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cuda/runtime.h"
#include "kernels/ops/linear.h"
#include "kernels/tensor.h"
#include "tools/bench/bench_common.h"

namespace {

using dsx::Device;
using dsx::DType;
using dsx::Tensor;

struct Shape3 {
  int64_t m, k, n;  // tokens, in, out: x [M, K], W [N, K], y [M, N]
};

// DeepSeek-V3 (hidden 7168, MoE expert intermediate 2048, dense intermediate 18432, q LoRA
// rank 1536, q_b output 128 heads × 192) at 4096 tokens, and a square 8192³.
const std::vector<Shape3> kFullShapes = {{4096, 7168, 2048}, {4096, 2048, 7168},  {4096, 7168, 18432},
                                         {4096, 7168, 1536}, {4096, 1536, 24576}, {8192, 8192, 8192}};
const std::vector<Shape3> kQuickShapes = {{4096, 7168, 2048}, {4096, 2048, 7168}};

void print_help() {
  std::puts(
      "bench_cuda_gemm: bf16 TFLOP/s of dsx linear_forward / linear_backward_input / linear_backward_weight on\n"
      "the GPU (bf16 x, W, dy; f32 y, dx, dW; fp32 accumulation) next to a direct cublasGemmEx on the same\n"
      "buffers (CUDA_R_16BF A/B, CUDA_R_32F C, CUBLAS_COMPUTE_32F), and the ratio dsx/cuBLAS.\n"
      "\n"
      "usage: bench_cuda_gemm [--quick] [--reps N] [--help]\n"
      "  --quick   two shapes, 20 repetitions\n"
      "  --reps N  timed repetitions per measurement (default 30); the median is reported\n"
      "  --help    this text\n"
      "\n"
      "Shapes are M x K x N: x [M, K], weight [N, K], y [M, N]; 2·M·K·N flops per call. Times come from CUDA\n"
      "events around each call after 5 warm-up calls; dsx and cuBLAS calls alternate. Compare with\n"
      "python3 tools/bench/torch_gemm.py (same rows, torch.matmul in bf16).");
}

#define BENCH_CUBLAS_CHECK(call)                                                                   \
  do {                                                                                             \
    const cublasStatus_t status_ = (call);                                                         \
    if (status_ != CUBLAS_STATUS_SUCCESS) {                                                        \
      throw std::runtime_error(std::string(#call) + " failed: " + cublasGetStatusString(status_)); \
    }                                                                                              \
  } while (0)

class CublasHandle {
 public:
  explicit CublasHandle(cudaStream_t stream) {
    BENCH_CUBLAS_CHECK(cublasCreate(&handle_));
    BENCH_CUBLAS_CHECK(cublasSetStream(handle_, stream));
  }
  ~CublasHandle() { cublasDestroy(handle_); }
  CublasHandle(const CublasHandle&) = delete;
  CublasHandle& operator=(const CublasHandle&) = delete;
  cublasHandle_t get() const { return handle_; }

 private:
  cublasHandle_t handle_ = nullptr;
};

// Uniform values in [-1, 1) (xorshift), as a bf16 tensor on the GPU: random data keeps the
// tensor cores' power draw (hence clocks) realistic, unlike zeros.
Tensor random_bf16(int64_t rows, int64_t cols, uint64_t seed) {
  std::vector<float> v(static_cast<size_t>(rows * cols));
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  for (float& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = static_cast<float>(static_cast<double>(s >> 11) * 0x1p-52 - 1.0);
  }
  return Tensor::from<float>(std::span<const float>(v), {rows, cols}).to(DType::bf16).to(Device::cuda);
}

// Milliseconds of one call between two events on the current stream.
float time_call(const std::function<void()>& call, dsx::cuda::Event& start, dsx::cuda::Event& stop) {
  const cudaStream_t stream = dsx::cuda::current_stream();
  start.record(stream);
  call();
  stop.record(stream);
  stop.synchronize();
  return stop.elapsed_ms_since(start);
}

double median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (static_cast<double>(v[n / 2 - 1]) + v[n / 2]);
}

struct Medians {
  double dsx_ms, cublas_ms;
};

Medians measure(int repetitions, const std::function<void()>& dsx_call, const std::function<void()>& cublas_call) {
  for (int i = 0; i < 5; ++i) {  // plans, workspaces, clocks
    dsx_call();
    cublas_call();
  }
  dsx::cuda::Event start(true), stop(true);
  std::vector<float> dsx_ms, cublas_ms;
  for (int r = 0; r < repetitions; ++r) {  // alternating, so drift hits both alike
    dsx_ms.push_back(time_call(dsx_call, start, stop));
    cublas_ms.push_back(time_call(cublas_call, start, stop));
  }
  return {median(dsx_ms), median(cublas_ms)};
}

double tflops(const Shape3& s, double ms) {
  return 2.0 * static_cast<double>(s.m) * static_cast<double>(s.k) * static_cast<double>(s.n) / (ms * 1e-3) * 1e-12;
}

void print_row(const Shape3& s, const char* op, const Medians& t, double& worst) {
  const double dsx = tflops(s, t.dsx_ms), ref = tflops(s, t.cublas_ms);
  worst = std::min(worst, dsx / ref);
  std::printf("| %5lld | %5lld | %5lld | %-15s | %8.3f | %7.1f | %9.3f | %7.1f | %6.3f |\n",
              static_cast<long long>(s.m), static_cast<long long>(s.k), static_cast<long long>(s.n), op, t.dsx_ms, dsx,
              t.cublas_ms, ref, dsx / ref);
}

// C (col-major m × n, ld = ldc, f32) = alpha · op(A) · op(B) + beta · C with bf16 A and B.
void gemm_ex(cublasHandle_t h, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
             const void* a, int64_t lda, const void* b, int64_t ldb, float beta, void* c, int64_t ldc) {
  const float alpha = 1.0f;
  BENCH_CUBLAS_CHECK(cublasGemmEx(h, ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a,
                                  CUDA_R_16BF, static_cast<int>(lda), b, CUDA_R_16BF, static_cast<int>(ldb), &beta, c,
                                  CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

double bench_shape(const Shape3& s, int repetitions, cublasHandle_t h) {
  const Tensor x = random_bf16(s.m, s.k, 1), w = random_bf16(s.n, s.k, 2), dy = random_bf16(s.m, s.n, 3);
  Tensor y = Tensor::zeros({s.m, s.n}, DType::f32, Device::cuda),
         dx = Tensor::zeros({s.m, s.k}, DType::f32, Device::cuda);
  Tensor dw = Tensor::zeros({s.n, s.k}, DType::f32, Device::cuda);
  double worst = std::numeric_limits<double>::infinity();
  // Row-major products as column-major transposed ones (kernels/cuda/cublaslt.h):
  // y [M, N] = x · Wᵀ          ⇔ yᵀ (N × M) = W(op T of its K × N view) · xᵀ
  print_row(
      s, "forward",
      measure(
          repetitions, [&] { dsx::ops::linear_forward(x, w, y); },
          [&] { gemm_ex(h, CUBLAS_OP_T, CUBLAS_OP_N, s.n, s.m, s.k, w.raw(), s.k, x.raw(), s.k, 0.0f, y.raw(), s.n); }),
      worst);
  // dx [M, K] = dy · W         ⇔ dxᵀ (K × M) = Wᵀ (K × N view) · dyᵀ
  print_row(s, "backward_input",
            measure(
                repetitions, [&] { dsx::ops::linear_backward_input(dy, w, dx); },
                [&] {
                  gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_N, s.k, s.m, s.n, w.raw(), s.k, dy.raw(), s.n, 0.0f, dx.raw(), s.k);
                }),
            worst);
  // dW [N, K] += dyᵀ · x       ⇔ dWᵀ (K × N) += xᵀ (K × M view) · dy (op T of its N × M view)
  print_row(s, "backward_weight",
            measure(
                repetitions, [&] { dsx::ops::linear_backward_weight(dy, x, dw); },
                [&] {
                  gemm_ex(h, CUBLAS_OP_N, CUBLAS_OP_T, s.k, s.n, s.m, x.raw(), s.k, dy.raw(), s.n, 1.0f, dw.raw(), s.k);
                }),
            worst);
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  dsx::bench::Options options{.quick = false, .repetitions = 30};
  if (!dsx::bench::parse_options("bench_cuda_gemm", argc, argv, 20, print_help, options)) return 2;
  std::string why;
  if (!dsx::cuda::device_available(&why)) {
    std::printf("bench_cuda_gemm: SKIPPED: no CUDA device (%s); run it on a machine with one\n", why.c_str());
    return 0;
  }
  dsx::cuda::select_device(0);
  std::printf("bench_cuda_gemm on %s: bf16 operands, f32 outputs, fp32 accumulation\n",
              dsx::cuda::device_description(0).c_str());
  std::printf("median of %d timed calls each (CUDA events), after 5 warm-up calls; dsx and cuBLAS alternate\n\n",
              options.repetitions);
  std::printf("| %5s | %5s | %5s | %-15s | %8s | %7s | %9s | %7s | %6s |\n", "M", "K", "N", "op", "dsx ms", "TFLOP/s",
              "cuBLAS ms", "TFLOP/s", "ratio");
  std::printf("|------:|------:|------:|-----------------|---------:|--------:|----------:|--------:|-------:|\n");
  CublasHandle handle(dsx::cuda::current_stream());
  double worst = std::numeric_limits<double>::infinity();
  for (const Shape3& s : options.quick ? kQuickShapes : kFullShapes)
    worst = std::min(worst, bench_shape(s, options.repetitions, handle.get()));
  std::printf("\nlowest dsx/cuBLAS ratio: %.3f (goal >= 0.95)\n", worst);
  return 0;
}
