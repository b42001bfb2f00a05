// bench_fp8: the CPU cost of emulating DeepSeek-V3's FP8 GEMMs and the bf16 GEMM. Quantization
// throughput (1×128 tiles, 128×128 blocks, transposed 1×128 tiles), and fp8_gemm and bf16_gemm
// GFLOP/s next to a bare cblas_sgemm of the same shape, measured in the same process; the ratio
// to sgemm is the figure of merit (the emulation's slowdown over the f32 GEMM it replaces on the
// CPU).
#include <cblas.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "kernels/ops/bf16_gemm.h"
#include "kernels/ops/fp8.h"
#include "kernels/tensor.h"
#include "tools/bench/bench_common.h"
#include "kernels/threading.h"

namespace {

using dsx::bench::seconds_of;

using dsx::DType;
using dsx::Tensor;
using dsx::ops::Fp8Matrix;
using dsx::ops::Fp8Scaling;

struct Size {
  int64_t m;  // tokens
  int64_t k;  // reduction (in features)
  int64_t n;  // out features
};

const std::vector<Size> kFullSizes = {{512, 1024, 1024}, {2048, 2048, 2048}, {1024, 7168, 2048}};
const std::vector<Size> kQuickSizes = {{512, 1024, 1024}};

void print_help() {
  std::puts(
      "bench_fp8: CPU cost of the FP8 (E4M3, DeepSeek-V3 fine-grained) and bf16 GEMM emulations.\n"
      "  quantize: GB/s of f32 input read by fp8_quantize (1x128 tiles, 128x128 blocks) and\n"
      "            fp8_quantize_transposed (1x128 tiles of the transpose).\n"
      "  gemm:     GFLOP/s of fp8_gemm d[M,N] = a[M,K]·b[N,K]^T (a 1x128 tiles, b 128x128 blocks or\n"
      "            1x128 tiles, f32 out) and of bf16_gemm (f32 operands rounded to bf16 per call,\n"
      "            fp32 sums, f32 out) next to cblas_sgemm of the same shape, and the ratio.\n"
      "\n"
      "usage: bench_fp8 [--quick] [--reps N] [--help]\n"
      "  --quick   one small shape, 2 repetitions\n"
      "  --reps N  timed repetitions per measurement (default 5); the best one is reported\n"
      "  --help    this text\n"
      "\n"
      "Threads: OMP_NUM_THREADS (dsx sets OpenMP and OpenBLAS to the same count).\n"
      "Shapes are M x K x N; 2·M·K·N flops per GEMM.");
}

Tensor random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  Tensor t = Tensor::empty({rows, cols}, DType::f32);
  std::mt19937 gen(static_cast<uint32_t>(seed));
  std::normal_distribution<float> dist(0.0f, 1.0f);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

// Best of `repetitions` after one warm-up.
double best_seconds(int repetitions, const std::function<void()>& call) {
  call();
  double best = std::numeric_limits<double>::infinity();
  for (int r = 0; r < repetitions; ++r) best = std::min(best, seconds_of(call));
  return best;
}

std::string shape_name(const Size& s) {
  return std::to_string(s.m) + "x" + std::to_string(s.k) + "x" + std::to_string(s.n);
}

void bench_quantize(const Size& s, int repetitions) {
  const Tensor x = random_matrix(s.m, s.k, 1);
  const double bytes = static_cast<double>(x.nbytes());
  Fp8Matrix tiles = Fp8Matrix::empty(s.m, s.k, Fp8Scaling::tile_1x128);
  Fp8Matrix blocks = Fp8Matrix::empty(s.m, s.k, Fp8Scaling::block_128x128);
  Fp8Matrix transposed = Fp8Matrix::empty(s.k, s.m, Fp8Scaling::tile_1x128);
  const auto row = [&](const char* what, double seconds) {
    std::printf("%-18s %-22s %10.2f GB/s %10.1f Melem/s\n", shape_name(s).c_str(), what, bytes / seconds * 1e-9,
                static_cast<double>(x.numel()) / seconds * 1e-6);
  };
  row("quantize 1x128", best_seconds(repetitions, [&] { dsx::ops::fp8_quantize(x, tiles); }));
  row("quantize 128x128", best_seconds(repetitions, [&] { dsx::ops::fp8_quantize(x, blocks); }));
  row("quantize transposed", best_seconds(repetitions, [&] { dsx::ops::fp8_quantize_transposed(x, transposed); }));
}

struct Ratios {
  double fp8 = std::numeric_limits<double>::infinity();   // lowest fp8 / sgemm
  double bf16 = std::numeric_limits<double>::infinity();  // lowest bf16 / sgemm
};

Ratios bench_gemm(const Size& s, int repetitions) {
  const Tensor x = random_matrix(s.m, s.k, 2), w = random_matrix(s.n, s.k, 3);
  Fp8Matrix a = Fp8Matrix::empty(s.m, s.k, Fp8Scaling::tile_1x128);
  Fp8Matrix b_blocks = Fp8Matrix::empty(s.n, s.k, Fp8Scaling::block_128x128);
  Fp8Matrix b_tiles = Fp8Matrix::empty(s.n, s.k, Fp8Scaling::tile_1x128);
  dsx::ops::fp8_quantize(x, a);
  dsx::ops::fp8_quantize(w, b_blocks);
  dsx::ops::fp8_quantize(w, b_tiles);
  Tensor d = Tensor::empty({s.m, s.n}, DType::f32);
  std::vector<float> d_ref(static_cast<size_t>(s.m * s.n));
  const int m = static_cast<int>(s.m), n = static_cast<int>(s.n), k = static_cast<int>(s.k);
  const double flops = 2.0 * static_cast<double>(s.m) * static_cast<double>(s.k) * static_cast<double>(s.n);

  const double sgemm = best_seconds(repetitions, [&] {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, n, k, 1.0f, x.data<float>(), k, w.data<float>(), k, 0.0f,
                d_ref.data(), n);
  });
  const double sgemm_gflops = flops / sgemm * 1e-9;
  Ratios ratios;
  const auto row = [&](const char* what, double seconds, double& worst) {
    const double gflops = flops / seconds * 1e-9;
    worst = std::min(worst, gflops / sgemm_gflops);
    std::printf("%-18s %-22s %10.1f GFLOP/s %10.1f GFLOP/s %8.3f\n", shape_name(s).c_str(), what, gflops, sgemm_gflops,
                gflops / sgemm_gflops);
  };
  row("gemm 1x128 x 128x128", best_seconds(repetitions, [&] { dsx::ops::fp8_gemm(a, b_blocks, d); }), ratios.fp8);
  row("gemm 1x128 x 1x128", best_seconds(repetitions, [&] { dsx::ops::fp8_gemm(a, b_tiles, d); }), ratios.fp8);
  // A whole Fprop as the emulation runs it: activations quantized per call, weights cached.
  row("quantize x + gemm", best_seconds(repetitions, [&] {
        dsx::ops::fp8_quantize(x, a);
        dsx::ops::fp8_gemm(a, b_blocks, d);
      }),
      ratios.fp8);
  // precision.gemm: bf16 Fprop: both f32 operands rounded to bf16 on every call, one sgemm.
  row("bf16 (round + sgemm)", best_seconds(repetitions, [&] { dsx::ops::bf16_gemm(false, true, x, w, d); }),
      ratios.bf16);
  return ratios;
}

}  // namespace

int main(int argc, char** argv) {
  dsx::bench::Options options{.quick = false, .repetitions = 5};
  if (!dsx::bench::parse_options("bench_fp8", argc, argv, 2, print_help, options)) return 2;
  const char* omp_env = std::getenv("OMP_NUM_THREADS");
  std::printf("bench_fp8: OMP_NUM_THREADS=%s, dsx threads %d, OpenBLAS threads %d (%s)\n",
              omp_env ? omp_env : "(unset)", dsx::cpu_threads(), openblas_get_num_threads(), openblas_get_config());
  std::printf("best of %d after one warm-up; M x K x N: a [M, K], b [N, K], d [M, N]\n\n", options.repetitions);
  const std::vector<Size>& sizes = options.quick ? kQuickSizes : kFullSizes;
  std::printf("%-18s %-22s %15s %18s\n", "M x K x N", "quantize (x [M, K])", "f32 read", "elements");
  for (const Size& s : sizes) bench_quantize(s, options.repetitions);
  std::printf("\n%-18s %-22s %18s %18s %8s\n", "M x K x N", "op", "emulated", "cblas_sgemm", "/sgemm");
  Ratios worst;
  for (const Size& s : sizes) {
    const Ratios r = bench_gemm(s, options.repetitions);
    worst.fp8 = std::min(worst.fp8, r.fp8);
    worst.bf16 = std::min(worst.bf16, r.bf16);
  }
  std::printf("\nlowest fp8/sgemm ratio: %.3f, bf16/sgemm ratio: %.3f (the CPU emulations' throughput relative to "
              "f32 BLAS)\n",
              worst.fp8, worst.bf16);
  return 0;
}
