// bench_linear: GFLOP/s of dsx's linear forward/backward next to a bare cblas_sgemm of the
// same shape and transposes, measured in the same process. The ratio dsx/BLAS is the figure
// of merit (goal >= 0.9): it shows what dsx's checks, dispatch and layout cost on top of BLAS.
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

#include "kernels/ops/linear.h"
#include "kernels/tensor.h"
#include "tools/bench/bench_common.h"
#include "kernels/threading.h"

namespace {

using dsx::bench::seconds_of;

using dsx::DType;
using dsx::Tensor;

struct Size {
  int64_t rows;  // N tokens
  int64_t in;
  int64_t out;
};

const std::vector<Size> kFullSizes = {{512, 1024, 1024}, {2048, 2048, 2048}, {4096, 512, 2048}, {1024, 7168, 256}};
const std::vector<Size> kQuickSizes = {{512, 1024, 1024}, {1024, 7168, 256}};

void print_help() {
  std::puts(
      "bench_linear: GFLOP/s of dsx linear_forward / linear_backward_input / linear_backward_weight (f32)\n"
      "next to a bare cblas_sgemm of the same shape and transposes, and the ratio dsx/BLAS.\n"
      "\n"
      "usage: bench_linear [--quick] [--reps N] [--help]\n"
      "  --quick   two small shapes, 3 repetitions (a few seconds)\n"
      "  --reps N  timed repetitions per measurement (default 10); the best one is reported\n"
      "  --help    this text\n"
      "\n"
      "Threads: OMP_NUM_THREADS (dsx sets OpenMP and OpenBLAS to the same count).\n"
      "Shapes are N x in x out: x [N, in], weight [out, in], y [N, out]; 2·N·in·out flops per call.");
}

Tensor random_matrix(int64_t rows, int64_t cols, uint64_t seed) {
  Tensor t = Tensor::empty({rows, cols}, DType::f32);
  std::mt19937 gen(static_cast<uint32_t>(seed));
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  float* p = t.data<float>();
  for (int64_t i = 0; i < t.numel(); ++i) p[i] = dist(gen);
  return t;
}

struct Timing {
  double dsx = std::numeric_limits<double>::infinity();
  double blas = std::numeric_limits<double>::infinity();
};

// One warm-up of each, then the two alternate so that drift (other load, clocks) hits both alike.
Timing best_of(int repetitions, const std::function<void()>& dsx_call, const std::function<void()>& blas_call) {
  dsx_call();
  blas_call();
  Timing best;
  for (int r = 0; r < repetitions; ++r) {
    best.dsx = std::min(best.dsx, seconds_of(dsx_call));
    best.blas = std::min(best.blas, seconds_of(blas_call));
  }
  return best;
}

void print_row(const Size& s, const char* op, double flops, const Timing& t, double& worst_ratio) {
  const double dsx_gflops = flops / t.dsx * 1e-9, blas_gflops = flops / t.blas * 1e-9;
  const double ratio = dsx_gflops / blas_gflops;
  worst_ratio = std::min(worst_ratio, ratio);
  const std::string shape = std::to_string(s.rows) + "x" + std::to_string(s.in) + "x" + std::to_string(s.out);
  std::printf("%-16s %-16s %12.1f %12.1f %9.3f\n", shape.c_str(), op, dsx_gflops, blas_gflops, ratio);
}

double bench_size(const Size& s, int repetitions) {
  const int m = static_cast<int>(s.rows), in = static_cast<int>(s.in), out = static_cast<int>(s.out);
  const Tensor x = random_matrix(s.rows, s.in, 1), w = random_matrix(s.out, s.in, 2),
               dy = random_matrix(s.rows, s.out, 3);
  Tensor y = Tensor::zeros({s.rows, s.out}, DType::f32), dx = Tensor::zeros({s.rows, s.in}, DType::f32);
  Tensor dw = Tensor::zeros({s.out, s.in}, DType::f32);
  std::vector<float> y_ref(y.numel()), dx_ref(dx.numel()), dw_ref(dw.numel(), 0.0f);
  const float* xs = x.data<float>();
  const float* ws = w.data<float>();
  const float* dys = dy.data<float>();
  const double flops = 2.0 * static_cast<double>(s.rows) * static_cast<double>(s.in) * static_cast<double>(s.out);
  double worst = std::numeric_limits<double>::infinity();

  // y [N, out] = x [N, in] · Wᵀ
  print_row(s, "forward", flops,
            best_of(
                repetitions, [&] { dsx::ops::linear_forward(x, w, y); },
                [&] {
                  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, out, in, 1.0f, xs, in, ws, in, 0.0f,
                              y_ref.data(), out);
                }),
            worst);
  // dx [N, in] = dy [N, out] · W [out, in]
  print_row(s, "backward_input", flops,
            best_of(
                repetitions, [&] { dsx::ops::linear_backward_input(dy, w, dx); },
                [&] {
                  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, in, out, 1.0f, dys, out, ws, in, 0.0f,
                              dx_ref.data(), in);
                }),
            worst);
  // dW [out, in] += dyᵀ · x
  print_row(s, "backward_weight", flops,
            best_of(
                repetitions, [&] { dsx::ops::linear_backward_weight(dy, x, dw); },
                [&] {
                  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, m, 1.0f, dys, out, xs, in, 1.0f,
                              dw_ref.data(), in);
                }),
            worst);
  return worst;
}

}  // namespace

int main(int argc, char** argv) {
  dsx::bench::Options options{.quick = false, .repetitions = 10};
  if (!dsx::bench::parse_options("bench_linear", argc, argv, 3, print_help, options)) return 2;
  const char* omp_env = std::getenv("OMP_NUM_THREADS");
  std::printf("bench_linear: f32, OMP_NUM_THREADS=%s, dsx threads %d, OpenBLAS threads %d (%s)\n",
              omp_env ? omp_env : "(unset)", dsx::cpu_threads(), openblas_get_num_threads(), openblas_get_config());
  std::printf("best of %d after one warm-up, dsx and BLAS calls alternating\n\n", options.repetitions);
  std::printf("%-16s %-16s %12s %12s %9s\n", "N x in x out", "op", "dsx GFLOP/s", "BLAS GFLOP/s", "dsx/BLAS");
  double worst = std::numeric_limits<double>::infinity();
  for (const Size& s : options.quick ? kQuickSizes : kFullSizes)
    worst = std::min(worst, bench_size(s, options.repetitions));
  std::printf("\nlowest dsx/BLAS ratio: %.3f (goal >= 0.9)\n", worst);
  return 0;
}
