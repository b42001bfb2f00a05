// Causal attention on the GPU against the CPU op: dsx's own kernels in f32 and bf16, forward and
// backward, with and without segment ids, MLA head dims (192/128), small and odd head dims, odd
// sequence lengths; cuDNN's fused attention (bf16) where cuDNN has a plan; bad input.
#include <catch2/catch.hpp>

#include <cmath>
#include <string>
#include <vector>

#include "gpu_check.h"
#include "kernels/cuda/ops_attention.h"
#include "kernels/ops/attention.h"

using namespace dsx;
using dsx::test::on_cpu;
using dsx::test::on_gpu;
using dsx::test::random_tensor;

namespace {

struct Dims {
  int64_t batch, seq, heads, dqk, dv;
};

std::string describe(const Dims& d, bool segments) {
  return "B " + std::to_string(d.batch) + " S " + std::to_string(d.seq) + " H " + std::to_string(d.heads) + " Dqk " +
         std::to_string(d.dqk) + " Dv " + std::to_string(d.dv) + (segments ? " with segment ids" : "");
}

// Forces one implementation for the scope of a test, restoring the previous setting.
class ImplGuard {
 public:
  explicit ImplGuard(cuda::AttentionImpl impl) : saved_(cuda::attention_impl()) { cuda::set_attention_impl(impl); }
  ~ImplGuard() { cuda::set_attention_impl(saved_); }
  ImplGuard(const ImplGuard&) = delete;
  ImplGuard& operator=(const ImplGuard&) = delete;

 private:
  cuda::AttentionImpl saved_;
};

// Even batch rows: ids recurring after gaps (0,0,0,0,1,1,1,1,2,2,2,2,0,...); odd rows: three
// contiguous documents — the same pattern as the CPU test.
Tensor mixed_segments(const Dims& d, DType dtype) {
  std::vector<int64_t> s(static_cast<size_t>(d.batch * d.seq));
  for (int64_t b = 0; b < d.batch; ++b) {
    for (int64_t i = 0; i < d.seq; ++i)
      s[static_cast<size_t>(b * d.seq + i)] = b % 2 == 0 ? (i / 4) % 3 : i * 3 / d.seq;
  }
  return Tensor::from<int64_t>(std::span<const int64_t>(s), {d.batch, d.seq}).to(dtype);
}

// Inputs in `dtype` (f32 values already representable in it) and the same values in f32 for the CPU.
struct Problem {
  Tensor q, k, v, dout;  // CPU, f32
  Tensor segments;       // CPU i64, or undefined
};

// Values in [-2, 2]: with scale 1/sqrt(Dqk) the scaled scores spread over several units, so the
// softmax is far from uniform and a wrong mask, scale or lse shows.
Problem make_problem(const Dims& d, DType dtype, bool segments, uint64_t seed) {
  auto input = [&](int64_t width, uint64_t s) {
    return random_tensor({d.batch, d.seq, d.heads, width}, DType::f32, s, -2, 2).to(dtype).to(DType::f32);
  };
  return {input(d.dqk, seed), input(d.dqk, seed + 1), input(d.dv, seed + 2), input(d.dv, seed + 3),
          segments ? mixed_segments(d, DType::i64) : Tensor()};
}

struct Forward {
  Tensor out, lse;
};
struct Backward {
  Tensor dq, dk, dv;
};

Forward cpu_forward(const Problem& p, const Dims& d, double scale) {
  Forward f{Tensor::empty({d.batch, d.seq, d.heads, d.dv}, DType::f32),
            Tensor::empty({d.batch, d.heads, d.seq}, DType::f32)};
  ops::attention_forward(p.q, p.k, p.v, scale, p.segments, f.out, f.lse);
  return f;
}

Backward cpu_backward(const Problem& p, const Tensor& out, const Tensor& lse, double scale) {
  Backward g{Tensor::empty(p.q.shape(), DType::f32), Tensor::empty(p.k.shape(), DType::f32),
             Tensor::empty(p.v.shape(), DType::f32)};
  ops::attention_backward(p.q, p.k, p.v, out, lse, p.dout, scale, p.segments, g.dq, g.dk, g.dv);
  return g;
}

// The GPU op on `dtype` copies of the inputs; segment ids go in as `segment_dtype`; lse in f32.
Forward gpu_forward(const Problem& p, const Dims& d, DType dtype, double scale, DType segment_dtype = DType::i64) {
  const Tensor segments = p.segments.defined() ? on_gpu(p.segments.to(segment_dtype)) : Tensor();
  Forward f{Tensor::empty({d.batch, d.seq, d.heads, d.dv}, dtype, Device::cuda),
            Tensor::empty({d.batch, d.heads, d.seq}, DType::f32, Device::cuda)};
  ops::attention_forward(on_gpu(p.q.to(dtype)), on_gpu(p.k.to(dtype)), on_gpu(p.v.to(dtype)), scale, segments, f.out,
                         f.lse);
  return {on_cpu(f.out).to(DType::f32), on_cpu(f.lse)};
}

// out and lse are given (the same on both sides), so the comparison measures the backward alone.
Backward gpu_backward(const Problem& p, const Tensor& out, const Tensor& lse, DType dtype, double scale) {
  const Tensor segments = on_gpu(p.segments);
  Backward g{Tensor::empty(p.q.shape(), dtype, Device::cuda), Tensor::empty(p.k.shape(), dtype, Device::cuda),
             Tensor::empty(p.v.shape(), dtype, Device::cuda)};
  ops::attention_backward(on_gpu(p.q.to(dtype)), on_gpu(p.k.to(dtype)), on_gpu(p.v.to(dtype)), on_gpu(out.to(dtype)),
                          on_gpu(lse), on_gpu(p.dout.to(dtype)), scale, segments, g.dq, g.dk, g.dv);
  return {on_cpu(g.dq).to(DType::f32), on_cpu(g.dk).to(DType::f32), on_cpu(g.dv).to(DType::f32)};
}

struct Tolerances {
  double out, lse, grads;
};

// Forward and backward of one shape against the CPU. For bf16 the CPU sees the bf16-rounded
// inputs (and the bf16-rounded out for the backward) in f32.
void compare_with_cpu(const Dims& d, DType dtype, bool segments, const Tolerances& tol, uint64_t seed) {
  INFO(describe(d, segments) << ", " << dtype_name(dtype));
  const double scale = 1.0 / std::sqrt(static_cast<double>(d.dqk));
  const Problem p = make_problem(d, dtype, segments, seed);
  const Forward want = cpu_forward(p, d, scale);
  const Forward got = gpu_forward(p, d, dtype, scale);
  DSX_REQUIRE_CLOSE(got.out, want.out, tol.out);
  DSX_REQUIRE_CLOSE(got.lse, want.lse, tol.lse);

  const Tensor out = want.out.to(dtype).to(DType::f32);
  const Backward want_grads = cpu_backward(p, out, want.lse, scale);
  const Backward got_grads = gpu_backward(p, out, want.lse, dtype, scale);
  DSX_REQUIRE_CLOSE(got_grads.dq, want_grads.dq, tol.grads);
  DSX_REQUIRE_CLOSE(got_grads.dk, want_grads.dk, tol.grads);
  DSX_REQUIRE_CLOSE(got_grads.dv, want_grads.dv, tol.grads);
}

// f32: both sides compute in f32 and differ only in summation order and exp vs exp2. Forward:
// scores carry ~1e-6 relative error, so out (|out| <= 2) and lse agree to ~1e-6 of their size;
// 1e-5 leaves margin. Backward: dP and delta are ~100 in size with ~1e-4 absolute error before
// the subtraction, summed over S keys — the CPU test's own f32-vs-f64 budget is 1e-4.
constexpr Tolerances kF32{1e-5, 1e-5, 1e-4};
// bf16 outputs are rounded to 8 significant bits: at most half an ulp, 2^-8 ≈ 3.9e-3 of each
// value (so of the largest), on top of the f32 differences above; lse stays f32.
constexpr Tolerances kBf16{5e-3, 1e-5, 5e-3};

// Shapes: MLA dims with S past several 64-row and 32-key tiles (not a multiple of either);
// S = 1; H = 1; B > 1; odd head dims (not multiples of 4: float4 padding); head dims 256.
const std::vector<Dims> kShapes = {
    {2, 130, 3, 192, 128}, {1, 1, 1, 192, 128},  {1, 1, 2, 24, 16},     {3, 77, 2, 24, 16},
    {2, 45, 2, 13, 7},     {1, 70, 1, 256, 256}, {1, 600, 2, 192, 128}, {2, 31, 4, 64, 200},
};

}  // namespace

TEST_CASE("attention own kernels: f32 forward and backward match the CPU", "[gpu][attention]") {
  ImplGuard guard(cuda::AttentionImpl::own);
  uint64_t seed = 100;
  for (const Dims& d : kShapes) {
    for (bool segments : {false, true}) compare_with_cpu(d, DType::f32, segments, kF32, seed += 10);
  }
}

TEST_CASE("attention own kernels: bf16 forward and backward match the CPU on rounded inputs", "[gpu][attention]") {
  ImplGuard guard(cuda::AttentionImpl::own);
  uint64_t seed = 500;
  for (const Dims& d : kShapes) {
    for (bool segments : {false, true}) compare_with_cpu(d, DType::bf16, segments, kBf16, seed += 10);
  }
}

TEST_CASE("attention own kernels: i32 segment ids and a bf16 lse", "[gpu][attention]") {
  ImplGuard guard(cuda::AttentionImpl::own);
  const Dims d{2, 90, 2, 24, 16};
  const double scale = 0.3;
  const Problem p = make_problem(d, DType::f32, true, 900);
  const Forward want = cpu_forward(p, d, scale);
  const Forward got = gpu_forward(p, d, DType::f32, scale, DType::i32);
  DSX_REQUIRE_CLOSE(got.out, want.out, 1e-5);  // as kF32: only the id dtype differs
  DSX_REQUIRE_CLOSE(got.lse, want.lse, 1e-5);

  // An lse in q's dtype (bf16) is accepted: it is the f32 lse rounded (<= 2^-8 relative).
  const Tensor q = on_gpu(p.q.to(DType::bf16)), k = on_gpu(p.k.to(DType::bf16)), v = on_gpu(p.v.to(DType::bf16));
  Tensor out = Tensor::empty(v.shape(), DType::bf16, Device::cuda);
  Tensor lse16 = Tensor::empty({d.batch, d.heads, d.seq}, DType::bf16, Device::cuda);
  ops::attention_forward(q, k, v, scale, on_gpu(p.segments), out, lse16);
  DSX_REQUIRE_CLOSE(on_cpu(lse16).to(DType::f32), want.lse, 5e-3);
}

TEST_CASE("attention own kernels: the backward follows the GPU forward end to end", "[gpu][attention]") {
  // GPU forward then GPU backward (its own out and lse) against the CPU pair: f32 errors of the
  // forward feed the backward, so the backward tolerance of kF32 applies.
  ImplGuard guard(cuda::AttentionImpl::own);
  const Dims d{2, 200, 2, 192, 128};
  const double scale = 1.0 / std::sqrt(192.0);
  const Problem p = make_problem(d, DType::f32, false, 1300);
  const Forward want = cpu_forward(p, d, scale);
  const Backward want_grads = cpu_backward(p, want.out, want.lse, scale);
  const Tensor q = on_gpu(p.q), k = on_gpu(p.k), v = on_gpu(p.v), dout = on_gpu(p.dout);
  Tensor out = Tensor::empty(v.shape(), DType::f32, Device::cuda);
  Tensor lse = Tensor::empty({d.batch, d.heads, d.seq}, DType::f32, Device::cuda);
  ops::attention_forward(q, k, v, scale, Tensor(), out, lse);
  Tensor dq = Tensor::empty(q.shape(), DType::f32, Device::cuda),
         dk = Tensor::empty(k.shape(), DType::f32, Device::cuda),
         dv = Tensor::empty(v.shape(), DType::f32, Device::cuda);
  ops::attention_backward(q, k, v, out, lse, dout, scale, Tensor(), dq, dk, dv);
  DSX_REQUIRE_CLOSE(on_cpu(dq), want_grads.dq, kF32.grads);
  DSX_REQUIRE_CLOSE(on_cpu(dk), want_grads.dk, kF32.grads);
  DSX_REQUIRE_CLOSE(on_cpu(dv), want_grads.dv, kF32.grads);
}

TEST_CASE("attention cuDNN: bf16 forward and backward match the CPU on rounded inputs", "[gpu][attention]") {
  // cuDNN rounds P to bf16 before P·V and P, dS to bf16 before the dV, dK products (at most
  // 2^-8 per element, partly averaging out over S terms), on top of the bf16 output rounding of
  // the own kernels: about twice their bf16 tolerances. Stats stay f32, but Q·Kᵀ runs on tensor
  // cores with f32 accumulation in another order: 1e-4.
  constexpr Tolerances kCudnn{1e-2, 1e-4, 1.5e-2};
  ImplGuard guard(cuda::AttentionImpl::cudnn);
  uint64_t seed = 2000;
  for (const Dims& d : std::vector<Dims>{{2, 256, 4, 192, 128}, {1, 300, 2, 192, 128}, {3, 64, 1, 64, 64}}) {
    const Tensor q = Tensor::empty({d.batch, d.seq, d.heads, d.dqk}, DType::bf16, Device::cuda);
    const Tensor v = Tensor::empty({d.batch, d.seq, d.heads, d.dv}, DType::bf16, Device::cuda);
    std::string why;
    bool forward_ok = cuda::cudnn_attention_available(q, v, Tensor(), false, &why);
    bool backward_ok = forward_ok && cuda::cudnn_attention_available(q, v, Tensor(), true, &why);
    if (!forward_ok || !backward_ok) {
      WARN("cuDNN attention skipped for " << describe(d, false) << ": " << why);
      continue;
    }
    compare_with_cpu(d, DType::bf16, false, kCudnn, seed += 10);
  }
}

TEST_CASE("attention cuDNN and own kernels agree on bf16 MLA shapes in automatic mode", "[gpu][attention]") {
  // automatic picks cuDNN for bf16 without segment ids where available; its lse must feed the
  // own backward (and vice versa), so both save the same lse definition.
  const Dims d{1, 192, 2, 192, 128};
  const double scale = 1.0 / std::sqrt(192.0);
  const Problem p = make_problem(d, DType::bf16, false, 3000);
  Forward auto_fwd, own_fwd;
  {
    ImplGuard guard(cuda::AttentionImpl::automatic);
    auto_fwd = gpu_forward(p, d, DType::bf16, scale);
  }
  {
    ImplGuard guard(cuda::AttentionImpl::own);
    own_fwd = gpu_forward(p, d, DType::bf16, scale);
  }
  DSX_REQUIRE_CLOSE(auto_fwd.lse, own_fwd.lse, 1e-4);    // as the cuDNN stats tolerance
  DSX_REQUIRE_CLOSE(auto_fwd.out, own_fwd.out, 1.5e-2);  // two bf16 roundings + cuDNN's bf16 P
  ImplGuard guard(cuda::AttentionImpl::own);
  const Backward own_from_auto = gpu_backward(p, auto_fwd.out, auto_fwd.lse, DType::bf16, scale);
  const Backward cpu = cpu_backward(p, auto_fwd.out, auto_fwd.lse, scale);
  DSX_REQUIRE_CLOSE(own_from_auto.dq, cpu.dq, kBf16.grads);
  DSX_REQUIRE_CLOSE(own_from_auto.dk, cpu.dk, kBf16.grads);
  DSX_REQUIRE_CLOSE(own_from_auto.dv, cpu.dv, kBf16.grads);
}

TEST_CASE("attention on the GPU rejects bad input like the CPU op", "[gpu][attention]") {
  const Tensor q = Tensor::zeros({1, 4, 2, 24}, DType::f32, Device::cuda);
  const Tensor v = Tensor::zeros({1, 4, 2, 16}, DType::f32, Device::cuda);
  Tensor out = Tensor::empty({1, 4, 2, 16}, DType::f32, Device::cuda);
  Tensor lse = Tensor::empty({1, 2, 4}, DType::f32, Device::cuda);
  CHECK_NOTHROW(ops::attention_forward(q, q, v, 0.2, Tensor(), out, lse));
  const Tensor bad_k = Tensor::zeros({1, 4, 2, 16}, DType::f32, Device::cuda);
  CHECK_THROWS_AS(ops::attention_forward(q, bad_k, v, 0.2, Tensor(), out, lse), std::invalid_argument);
  Tensor bad_lse = Tensor::empty({1, 4, 2}, DType::f32, Device::cuda);
  CHECK_THROWS_AS(ops::attention_forward(q, q, v, 0.2, Tensor(), out, bad_lse), std::invalid_argument);
  const Tensor short_segments = on_gpu(Tensor::from<int32_t>({0, 0, 1}, {1, 3}));
  CHECK_THROWS_AS(ops::attention_forward(q, q, v, 0.2, short_segments, out, lse), std::invalid_argument);
  const Tensor float_segments = Tensor::zeros({1, 4}, DType::f32, Device::cuda);
  CHECK_THROWS_AS(ops::attention_forward(q, q, v, 0.2, float_segments, out, lse), std::invalid_argument);
  const Tensor host_segments = Tensor::zeros({1, 4}, DType::i64);
  CHECK_THROWS_AS(ops::attention_forward(q, q, v, 0.2, host_segments, out, lse), std::invalid_argument);
  const Tensor v64 = Tensor::zeros({1, 4, 2, 16}, DType::f64, Device::cuda);
  CHECK_THROWS_AS(ops::attention_forward(q, q, v64, 0.2, Tensor(), out, lse), std::invalid_argument);
  const Tensor q64 = Tensor::zeros({1, 4, 2, 24}, DType::f64, Device::cuda);
  Tensor out64 = Tensor::empty({1, 4, 2, 16}, DType::f64, Device::cuda);
  Tensor lse64 = Tensor::empty({1, 2, 4}, DType::f64, Device::cuda);
  CHECK_THROWS_WITH(ops::attention_forward(q64, q64, v64, 0.2, Tensor(), out64, lse64),
                    Catch::Contains("not supported on the GPU"));
  const Tensor wide = Tensor::zeros({1, 4, 2, 264}, DType::f32, Device::cuda);
  CHECK_THROWS_AS(ops::attention_forward(wide, wide, v, 0.2, Tensor(), out, lse), std::invalid_argument);
  // Forcing cuDNN on a call it cannot run (f32, or segment ids) says so.
  ImplGuard guard(cuda::AttentionImpl::cudnn);
  CHECK_THROWS_WITH(ops::attention_forward(q, q, v, 0.2, Tensor(), out, lse), Catch::Contains("cuDNN"));
}
