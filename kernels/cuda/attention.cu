// dsx::cuda::attention_forward / attention_backward: the checks of the CPU op and the choice of
// implementation. Dtypes: f32 and bf16 (q, k, v, out, dout, dq, dk, dv in one dtype; lse in
// that dtype or f32). No kernels here: cuDNN's fused flash attention (cudnn_sdpa.cpp) runs bf16
// calls without segment ids where it has a plan; dsx's own kernels (attention_forward.cu,
// attention_backward.cu, their comments give the thread mapping) run everything else.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>

#include "kernels/cuda/attention_own.h"
#include "kernels/cuda/attention_tiles.cuh"
#include "kernels/cuda/cudnn_sdpa.h"
#include "kernels/cuda/ops_attention.h"

namespace dsx::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// launchers (checks and routing)

struct Dims {
  int64_t batch, seq, heads, dqk, dv;
};

Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& segment_ids, std::string_view op) {
  check_on_gpu(q, op, "q");
  check_on_gpu(k, op, "k");
  check_on_gpu(v, op, "v");
  check(q.ndim() == 4, op, [&] { return "q must be [B, S, H, Dqk], got " + shape_str(q.shape()); });
  check(v.ndim() == 4, op, [&] { return "v must be [B, S, H, Dv], got " + shape_str(v.shape()); });
  const Dims d{q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)};
  check_shape(k, q.shape(), op, "k");
  check_shape(v, {d.batch, d.seq, d.heads, d.dv}, op, "v");
  check(k.dtype() == q.dtype() && v.dtype() == q.dtype(), op, "q, k and v must share a dtype");
  check(q.dtype() == DType::f32 || q.dtype() == DType::bf16, op,
        [&] { return "dtype " + std::string(dtype_name(q.dtype())) + " is not supported on the GPU (f32, bf16)"; });
  check(d.dqk > 0 && d.dv > 0, op, [&] {
    return "head dims must be positive, got Dqk " + std::to_string(d.dqk) + " and Dv " + std::to_string(d.dv);
  });
  check(d.dqk <= attn::kMaxHeadDim && d.dv <= attn::kMaxHeadDim, op, [&] {
    return "head dims up to " + std::to_string(attn::kMaxHeadDim) + " on the GPU, got Dqk " + std::to_string(d.dqk) +
           " and Dv " + std::to_string(d.dv);
  });
  // Grid: x = sequence tiles, y = heads, z = batch.
  check(d.heads <= 65535 && d.batch <= 65535, op, "at most 65535 heads and 65535 batch rows on the GPU");
  if (segment_ids.defined()) {
    check_on_gpu(segment_ids, op, "segment_ids");
    check_shape(segment_ids, {d.batch, d.seq}, op, "segment_ids");
    check(segment_ids.dtype() == DType::i32 || segment_ids.dtype() == DType::i64, op, [&] {
      return "segment_ids: dtype " + std::string(dtype_name(segment_ids.dtype())) + " is not supported (i32, i64)";
    });
  }
  return d;
}

void check_same(const Tensor& t, const Shape& shape, DType dtype, std::string_view op, std::string_view name) {
  check_on_gpu(t, op, name);
  check_shape(t, shape, op, name);
  check(t.dtype() == dtype, op,
        [&] { return std::string(name) + " must have dtype " + std::string(dtype_name(dtype)); });
}

void check_lse(const Tensor& lse, const Dims& d, DType dtype, std::string_view op) {
  check_on_gpu(lse, op, "lse");
  check_shape(lse, {d.batch, d.heads, d.seq}, op, "lse");
  check(lse.dtype() == dtype || lse.dtype() == DType::f32, op,
        [&] { return "lse must have dtype " + std::string(dtype_name(dtype)) + " or f32"; });
}

// The own kernels read segment ids as int64.
Tensor segments_i64(const Tensor& segment_ids) {
  if (!segment_ids.defined() || segment_ids.dtype() == DType::i64) return segment_ids;
  return segment_ids.to(DType::i64);
}

AttentionImpl impl_from_environment() {
  const char* env = std::getenv("DSX_CUDA_ATTENTION");
  if (env == nullptr) return AttentionImpl::automatic;
  const std::string value = env;
  if (value == "own") return AttentionImpl::own;
  if (value == "cudnn") return AttentionImpl::cudnn;
  if (value == "auto" || value.empty()) return AttentionImpl::automatic;
  throw std::invalid_argument("DSX_CUDA_ATTENTION must be auto, own or cudnn, got '" + value + "'");
}

std::atomic<int>& impl_setting() {
  static std::atomic<int> setting{static_cast<int>(impl_from_environment())};
  return setting;
}

cudnn_sdpa::Shape4 shape4(const Dims& d) {
  return {d.batch, d.seq, d.heads, d.dqk, d.dv};
}

// cuDNN runs the call when allowed and available; forcing cuDNN on a call it cannot run throws.
bool use_cudnn(const Dims& d, const Tensor& q, const Tensor& segment_ids, std::initializer_list<const Tensor*> all,
               bool backward, std::string_view op) {
  const AttentionImpl impl = attention_impl();
  if (impl == AttentionImpl::own) return false;
  std::string why;
  bool ok = q.dtype() == DType::bf16 && !segment_ids.defined();
  if (!ok) why = q.dtype() != DType::bf16 ? "inputs are not bf16" : "segment ids are set";
  for (const Tensor* t : all) {
    if (ok && !cudnn_sdpa::aligned(*t)) {
      ok = false;
      why = "a tensor is not 16-byte aligned";
    }
  }
  ok = ok && cudnn_sdpa::available(shape4(d), backward, &why);
  check(ok || impl != AttentionImpl::cudnn, op, [&] { return "cuDNN attention was forced but cannot run: " + why; });
  return ok;
}

}  // namespace

void set_attention_impl(AttentionImpl impl) {
  impl_setting().store(static_cast<int>(impl));
}
AttentionImpl attention_impl() {
  return static_cast<AttentionImpl>(impl_setting().load());
}

bool cudnn_attention_available(const Tensor& q, const Tensor& v, const Tensor& segment_ids, bool backward,
                               std::string* why_not) {
  if (q.dtype() != DType::bf16 || segment_ids.defined()) {
    if (why_not) *why_not = q.dtype() != DType::bf16 ? "inputs are not bf16" : "segment ids are set";
    return false;
  }
  return cudnn_sdpa::available({q.dim(0), q.dim(1), q.dim(2), q.dim(3), v.dim(3)}, backward, why_not);
}

void attention_forward(const Tensor& q, const Tensor& k, const Tensor& v, double scale, const Tensor& segment_ids,
                       Tensor& out, Tensor& lse) {
  constexpr std::string_view op = "attention_forward";
  const Dims d = check_inputs(q, k, v, segment_ids, op);
  check_same(out, v.shape(), q.dtype(), op, "out");
  check_lse(lse, d, q.dtype(), op);
  if (lse.numel() == 0) return;  // no query rows
  // Both implementations write an f32 lse; a narrower lse gets it rounded.
  Tensor lse32 = lse.dtype() == DType::f32 ? lse : Tensor::empty(lse.shape(), DType::f32, Device::cuda);
  if (use_cudnn(d, q, segment_ids, {&q, &k, &v, &out, &lse32}, false, op)) {
    cudnn_sdpa::forward(q, k, v, scale, out, lse32);
  } else {
    attn::own_forward(q, k, v, scale, segments_i64(segment_ids), out, lse32);
  }
  if (lse.dtype() != DType::f32) lse.copy_from(lse32);
}

void attention_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,
                        const Tensor& dout, double scale, const Tensor& segment_ids, Tensor& dq, Tensor& dk,
                        Tensor& dv) {
  constexpr std::string_view op = "attention_backward";
  const Dims d = check_inputs(q, k, v, segment_ids, op);
  check_same(out, v.shape(), q.dtype(), op, "out");
  check_lse(lse, d, q.dtype(), op);
  check_same(dout, v.shape(), q.dtype(), op, "dout");
  check_same(dq, q.shape(), q.dtype(), op, "dq");
  check_same(dk, k.shape(), q.dtype(), op, "dk");
  check_same(dv, v.shape(), q.dtype(), op, "dv");
  if (lse.numel() == 0) return;  // no query rows, so dq, dk, dv are empty too
  const Tensor lse32 = lse.dtype() == DType::f32 ? lse : lse.to(DType::f32);
  if (use_cudnn(d, q, segment_ids, {&q, &k, &v, &out, &lse32, &dout, &dq, &dk, &dv}, true, op)) {
    cudnn_sdpa::backward(q, k, v, out, lse32, dout, scale, dq, dk, dv);
  } else {
    attn::own_backward(q, k, v, out, lse32, dout, scale, segments_i64(segment_ids), dq, dk, dv);
  }
}

}  // namespace dsx::cuda
