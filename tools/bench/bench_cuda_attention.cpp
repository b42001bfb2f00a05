// Causal MLA attention on the GPU: forward and forward+backward TFLOP/s of dsx's own kernels and
// cuDNN's fused flash attention, bf16, S = 4096, Dqk 192, Dv 128, B = 1, 2, 4 and H = 16, 128.
// FLOPs count the causal half of the dense products: forward 2·B·H·S²·(Dqk + Dv)/2, backward
// 2.5× that (five products instead of two), forward+backward 3.5×. Times are medians of CUDA
// event pairs around each call on the compute stream. Exits 0 with a message without a GPU.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_common.h"
#include "kernels/ops/attention.h"
#include "kernels/tensor.h"
#if DSX_HAVE_CUDA
#include "kernels/cuda/ops_attention.h"
#include "kernels/cuda/runtime.h"
#endif

namespace {

void print_help() {
  std::printf(
      "bench_cuda_attention [--quick] [--reps N]\n"
      "  Causal attention TFLOP/s (bf16, S 4096, Dqk 192, Dv 128, B 1/2/4, H 16/128) of dsx's own\n"
      "  CUDA kernels and cuDNN's fused attention: forward and forward+backward, CUDA-event medians.\n"
      "  --quick: 2 repetitions and only B = 1 (default 10 repetitions).\n");
}

}  // namespace

#if DSX_HAVE_CUDA
namespace {

using namespace dsx;

struct Problem {
  int64_t batch, seq, heads, dqk, dv;
};

struct Buffers {
  Tensor q, k, v, out, lse, dout, dq, dk, dv;
};

Buffers make_buffers(const Problem& p) {
  auto random = [&](int64_t width, double seed) {
    Tensor host = Tensor::empty({p.batch, p.seq, p.heads, width}, DType::f32);
    float* x = host.data<float>();
    for (int64_t i = 0; i < host.numel(); ++i)
      x[i] = static_cast<float>(std::sin(0.37 * static_cast<double>(i) + seed));
    return host.to(DType::bf16).to(Device::cuda);
  };
  Buffers b;
  b.q = random(p.dqk, 1);
  b.k = random(p.dqk, 2);
  b.v = random(p.dv, 3);
  b.dout = random(p.dv, 4);
  b.out = Tensor::empty(b.v.shape(), DType::bf16, Device::cuda);
  b.lse = Tensor::empty({p.batch, p.heads, p.seq}, DType::f32, Device::cuda);
  b.dq = Tensor::empty(b.q.shape(), DType::bf16, Device::cuda);
  b.dk = Tensor::empty(b.k.shape(), DType::bf16, Device::cuda);
  b.dv = Tensor::empty(b.v.shape(), DType::bf16, Device::cuda);
  return b;
}

// Median milliseconds of `call` over `reps` runs after one warm-up (plan building, first-touch).
template <class F>
double median_ms(int reps, F&& call) {
  call();
  cuda::synchronize_current_stream();
  std::vector<double> ms;
  for (int r = 0; r < reps; ++r) {
    cuda::Event start(true), stop(true);
    start.record(cuda::current_stream());
    call();
    stop.record(cuda::current_stream());
    stop.synchronize();
    ms.push_back(stop.elapsed_ms_since(start));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

struct Row {
  double forward_ms = NAN, both_ms = NAN;
  std::string note;
};

Row measure(const Problem& p, Buffers& b, cuda::AttentionImpl impl, int reps) {
  Row row;
  if (impl == cuda::AttentionImpl::cudnn) {
    std::string why;
    if (!cuda::cudnn_attention_available(b.q, b.v, Tensor(), false, &why) ||
        !cuda::cudnn_attention_available(b.q, b.v, Tensor(), true, &why)) {
      row.note = "skipped: " + why;
      return row;
    }
  }
  cuda::set_attention_impl(impl);
  const double scale = 1.0 / std::sqrt(static_cast<double>(p.dqk));
  auto forward = [&] { ops::attention_forward(b.q, b.k, b.v, scale, Tensor(), b.out, b.lse); };
  auto both = [&] {
    forward();
    ops::attention_backward(b.q, b.k, b.v, b.out, b.lse, b.dout, scale, Tensor(), b.dq, b.dk, b.dv);
  };
  row.forward_ms = median_ms(reps, forward);
  row.both_ms = median_ms(reps, both);
  cuda::set_attention_impl(cuda::AttentionImpl::automatic);
  return row;
}

}  // namespace

int main(int argc, char** argv) {
  dsx::bench::Options options;
  options.repetitions = 10;
  if (!dsx::bench::parse_options("bench_cuda_attention", argc, argv, 2, print_help, options)) return 2;
  std::string why;
  if (!cuda::device_available(&why)) {
    std::printf("bench_cuda_attention: skipped, no CUDA device (%s)\n", why.c_str());
    return 0;
  }
  std::printf("device: %s\n", cuda::device_description(cuda::current_device()).c_str());
  std::printf("causal attention, bf16, S 4096, Dqk 192, Dv 128; median of %d; TFLOP/s = causal FLOPs / time\n\n",
              options.repetitions);
  std::printf("| B | H | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |\n");
  std::printf("|---|---|---|---|---|---|---|\n");
  const std::vector<int64_t> batches = options.quick ? std::vector<int64_t>{1} : std::vector<int64_t>{1, 2, 4};
  for (int64_t heads : {16, 128}) {
    for (int64_t batch : batches) {
      const Problem p{batch, 4096, heads, 192, 128};
      Buffers b = make_buffers(p);
      const double fwd_flops =
          2.0 * static_cast<double>(p.batch * p.heads) * static_cast<double>(p.seq * p.seq) * (p.dqk + p.dv) / 2;
      for (auto [impl, name] :
           {std::pair{cuda::AttentionImpl::own, "own"}, std::pair{cuda::AttentionImpl::cudnn, "cudnn"}}) {
        const Row r = measure(p, b, impl, options.repetitions);
        if (!r.note.empty()) {
          std::printf("| %lld | %lld | %s | %s | | | |\n", static_cast<long long>(batch), static_cast<long long>(heads),
                      name, r.note.c_str());
          continue;
        }
        std::printf("| %lld | %lld | %s | %.3f | %.1f | %.3f | %.1f |\n", static_cast<long long>(batch),
                    static_cast<long long>(heads), name, r.forward_ms, fwd_flops / (r.forward_ms * 1e9), r.both_ms,
                    3.5 * fwd_flops / (r.both_ms * 1e9));
      }
    }
  }
  return 0;
}

#else  // a build without CUDA

int main(int argc, char** argv) {
  dsx::bench::Options options;
  if (!dsx::bench::parse_options("bench_cuda_attention", argc, argv, 2, print_help, options)) return 2;
  std::printf("bench_cuda_attention: skipped, this dsx was built without CUDA\n");
  return 0;
}

#endif
