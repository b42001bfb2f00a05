// Helpers for the GPU tests: every CUDA op is compared with the CPU op on the same random
// inputs. Tolerances are stated per test, relative to the largest magnitude of the reference
// (max |gpu - cpu| <= tol · max(1, max |cpu|)), since the two sum in different orders.
#pragma once
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <string>

#include "kernels/tensor.h"
#include "support/gradcheck.h"

namespace dsx::test {

inline Tensor on_gpu(const Tensor& t) {
  return t.defined() ? t.to(Device::cuda) : t;
}
inline Tensor on_cpu(const Tensor& t) {
  return t.defined() ? t.to(Device::cpu) : t;
}

// The largest |a - b| relative to max(1, max |b|); NaNs count as infinitely wrong unless both are NaN.
inline double scaled_max_error(const Tensor& gpu, const Tensor& cpu) {
  REQUIRE(gpu.shape() == cpu.shape());
  const auto a = gpu.to_vector(), b = cpu.to_vector();
  double scale = 1.0, err = 0.0;
  for (double v : b) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) && std::isnan(b[i])) continue;
    const double d = std::abs(a[i] - b[i]);
    err = std::max(err, std::isnan(d) ? INFINITY : d);
  }
  return err / scale;
}

#define DSX_REQUIRE_CLOSE(gpu, cpu, tol)                                                 \
  do {                                                                                   \
    const double dsx_err_ = ::dsx::test::scaled_max_error((gpu), (cpu));                 \
    INFO(#gpu " vs " #cpu ": scaled max error " << dsx_err_ << ", tolerance " << (tol)); \
    REQUIRE(dsx_err_ <= (tol));                                                          \
  } while (0)

// Bitwise equality (integer outputs, exact copies, conversions that share the host codecs).
inline bool same_values(const Tensor& a, const Tensor& b) {
  if (a.shape() != b.shape() || a.dtype() != b.dtype()) return false;
  const auto x = a.to_vector(), y = b.to_vector();
  for (size_t i = 0; i < x.size(); ++i) {
    if (!(x[i] == y[i] || (std::isnan(x[i]) && std::isnan(y[i])))) return false;
  }
  return true;
}

}  // namespace dsx::test
