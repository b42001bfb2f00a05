// Rotary position embedding (plain and YaRN) on the CPU.
//
// The table is computed in double and rounded once to the requested dtype, so the f32 table is
// the correctly rounded value of Hugging Face's formula (HF evaluates the angles in float32,
// which loses ~1e-7·pos radians at large positions; the formula is the same).
#include <algorithm>
#include <cmath>
#include <numbers>
#include <string>
#include <vector>

#include "kernels/cuda/route.h"
#include "kernels/dispatch.h"
#include "kernels/ops/checks.h"
#include "kernels/ops/rope.h"

namespace dsx::ops {
namespace {

constexpr std::string_view kTableOp = "rope_table";

// YaRN's attention-temperature factor: 0.1·m·ln(s) + 1 for s > 1, else 1.
double yarn_mscale(double factor, double mscale) {
  if (factor <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(factor) + 1.0;
}

// The rotary dimension index whose wavelength completes num_rotations turns over the original
// context (solved from original_max / (2π·base^(2d/dim)) = num_rotations for d).
double yarn_correction_dim(double num_rotations, const RopeConfig& c) {
  const double original = static_cast<double>(c.original_max_position_embeddings);
  return static_cast<double>(c.dim) * std::log(original / (num_rotations * 2.0 * std::numbers::pi)) /
         (2.0 * std::log(c.theta));
}

// Frequencies of the pairs: plain RoPE, or YaRN's blend in which fast-rotating pairs (index below
// `low`) keep their frequency, slow ones (above `high`) are divided by factor, and a linear ramp
// interpolates between them.
std::vector<double> inverse_frequencies(const RopeConfig& c) {
  const int64_t half = c.dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[static_cast<size_t>(i)] = 1.0 / std::pow(c.theta, static_cast<double>(2 * i) / static_cast<double>(c.dim));
  }
  if (c.scaling == RopeConfig::Scaling::none) return inv_freq;

  const double low = std::max(std::floor(yarn_correction_dim(c.beta_fast, c)), 0.0);
  double high = std::min(std::ceil(yarn_correction_dim(c.beta_slow, c)), static_cast<double>(c.dim - 1));
  if (high == low) high += 0.001;  // as HF: avoids a zero-width ramp
  for (int64_t i = 0; i < half; ++i) {
    const double ramp = std::clamp((static_cast<double>(i) - low) / (high - low), 0.0, 1.0);
    const double extrapolated = inv_freq[static_cast<size_t>(i)];
    const double interpolated = extrapolated / c.factor;
    inv_freq[static_cast<size_t>(i)] = interpolated * ramp + extrapolated * (1.0 - ramp);
  }
  return inv_freq;
}

void check_config(const RopeConfig& c, int64_t max_positions) {
  check(c.dim > 0 && c.dim % 2 == 0, kTableOp, "dim must be positive and even, got " + std::to_string(c.dim));
  check(c.theta > 1.0, kTableOp, "theta must be > 1, got " + std::to_string(c.theta));
  check(max_positions >= 0, kTableOp, "max_positions must be >= 0, got " + std::to_string(max_positions));
  if (c.scaling != RopeConfig::Scaling::yarn) return;
  check(c.factor > 0.0, kTableOp, "yarn factor must be > 0, got " + std::to_string(c.factor));
  check(c.original_max_position_embeddings > 0, kTableOp, "yarn original_max_position_embeddings must be > 0");
  check(c.beta_fast > 0.0 && c.beta_slow > 0.0, kTableOp, "yarn beta_fast and beta_slow must be > 0");
}

void check_rope_args(const Tensor& x, const Tensor& positions, const RopeTable& table, const Tensor& out,
                     std::string_view op) {
  checks::rope(op, Device::cpu, x, positions, table, out);
}

// Positions as int64 after checking each lies in the table.
std::vector<int64_t> checked_positions(const Tensor& positions, int64_t max_positions, std::string_view op) {
  std::vector<int64_t> pos(static_cast<size_t>(positions.numel()));
  dispatch_index(positions.dtype(), op, [&]<class I>() {
    const I* p = positions.data<I>();
    for (size_t t = 0; t < pos.size(); ++t) pos[t] = static_cast<int64_t>(p[t]);
  });
  for (size_t t = 0; t < pos.size(); ++t) {
    check(pos[t] >= 0 && pos[t] < max_positions, op,
          "positions[" + std::to_string(t) + "] = " + std::to_string(pos[t]) + " is outside the table [0, " +
              std::to_string(max_positions) + ")");
  }
  return pos;
}

// Applies the rotation by +angle (sign = 1, forward) or by -angle (sign = -1: the transpose,
// which is what backward needs even when cos/sin carry a non-unit mscale).
template <class T>
void rotate_pairs(const Tensor& x, const std::vector<int64_t>& pos, const RopeTable& table, T sign, Tensor& out) {
  const int64_t tokens = x.dim(0), heads = x.dim(1), half = x.dim(2) / 2;
  const T* src = x.data<T>();
  const T* cos_table = table.cos.data<T>();
  const T* sin_table = table.sin.data<T>();
  T* dst = out.data<T>();
  const int64_t rows = tokens * heads;
#pragma omp parallel for schedule(static) if (rows * half > 16384)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t p = pos[static_cast<size_t>(row / heads)];
    const T* c = cos_table + p * half;
    const T* s = sin_table + p * half;
    const T* in = src + row * 2 * half;
    T* o = dst + row * 2 * half;
    for (int64_t i = 0; i < half; ++i) {
      const T a = in[2 * i], b = in[2 * i + 1];  // read both before writing: out may alias x
      const T si = sign * s[i];
      o[2 * i] = a * c[i] - b * si;
      o[2 * i + 1] = a * si + b * c[i];
    }
  }
}

void rope_apply(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& out, std::string_view op,
                double sign) {
  check_rope_args(x, positions, table, out, op);
  const auto pos = checked_positions(positions, table.cos.dim(0), op);
  dispatch_float(x.dtype(), op, [&]<class T>() { rotate_pairs<T>(x, pos, table, static_cast<T>(sign), out); });
}

}  // namespace

RopeTable rope_table(const RopeConfig& config, int64_t max_positions, DType dtype) {
  check_config(config, max_positions);
  const int64_t half = config.dim / 2;
  const std::vector<double> inv_freq = inverse_frequencies(config);
  const double attention_factor =
      config.scaling == RopeConfig::Scaling::yarn
          ? yarn_mscale(config.factor, config.mscale) / yarn_mscale(config.factor, config.mscale_all_dim)
          : 1.0;
  std::vector<double> cos_values(static_cast<size_t>(max_positions * half));
  std::vector<double> sin_values(cos_values.size());
  for (int64_t p = 0; p < max_positions; ++p) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(p) * inv_freq[static_cast<size_t>(i)];
      cos_values[static_cast<size_t>(p * half + i)] = std::cos(angle) * attention_factor;
      sin_values[static_cast<size_t>(p * half + i)] = std::sin(angle) * attention_factor;
    }
  }
  check(dtype == DType::f32 || dtype == DType::f64, kTableOp,
        "table dtype must be f32 or f64, got " + std::string(dtype_name(dtype)));
  const Shape shape{max_positions, half};
  return RopeTable{Tensor::from<double>(cos_values, shape).to(dtype),
                   Tensor::from<double>(sin_values, shape).to(dtype)};
}

double rope_softmax_scale_factor(const RopeConfig& config) {
  if (config.scaling != RopeConfig::Scaling::yarn || config.mscale_all_dim == 0.0) return 1.0;
  return yarn_mscale(config.factor, config.mscale_all_dim);
}

void rope_forward(const Tensor& x, const Tensor& positions, const RopeTable& table, Tensor& out) {
  DSX_ROUTE_TO_CUDA(x, rope_forward(x, positions, table, out));
  rope_apply(x, positions, table, out, "rope_forward", 1.0);
}

void rope_backward(const Tensor& dout, const Tensor& positions, const RopeTable& table, Tensor& dx) {
  DSX_ROUTE_TO_CUDA(dout, rope_backward(dout, positions, table, dx));
  rope_apply(dout, positions, table, dx, "rope_backward", -1.0);
}

}  // namespace dsx::ops
