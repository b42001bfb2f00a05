// Calling a generic lambda with the C++ element type of a runtime dtype.
//
//   dispatch_float(x.dtype(), "rmsnorm", [&]<class T>() { rmsnorm_impl<T>(...); });
// dispatch_float covers the compute types of CPU ops (f64 for references and gradient
// checks, f32 for training); dispatch_any covers every dtype.
#pragma once
#include <stdexcept>
#include <string>
#include <string_view>

#include "kernels/dtype.h"

namespace dsx {

[[noreturn]] inline void unsupported_dtype(std::string_view op, DType t) {
  throw std::invalid_argument(std::string(op) + ": dtype " + std::string(dtype_name(t)) + " is not supported");
}

template <class F>
decltype(auto) dispatch_float(DType t, std::string_view op, F&& f) {
  switch (t) {
    case DType::f64: return f.template operator()<double>();
    case DType::f32: return f.template operator()<float>();
    default: unsupported_dtype(op, t);
  }
}

template <class F>
decltype(auto) dispatch_index(DType t, std::string_view op, F&& f) {
  switch (t) {
    case DType::i32: return f.template operator()<int32_t>();
    case DType::i64: return f.template operator()<int64_t>();
    default: unsupported_dtype(op, t);
  }
}

template <class F>
decltype(auto) dispatch_any(DType t, F&& f) {
  switch (t) {
    case DType::f64: return f.template operator()<double>();
    case DType::f32: return f.template operator()<float>();
    case DType::bf16: return f.template operator()<bf16>();
    case DType::fp8_e4m3: return f.template operator()<fp8_e4m3>();
    case DType::fp8_e5m2: return f.template operator()<fp8_e5m2>();
    case DType::i32: return f.template operator()<int32_t>();
    case DType::i64: return f.template operator()<int64_t>();
  }
  unsupported_dtype("dispatch", t);
}

// Converting one element between any two dsx element types.
template <class To, class From>
inline To convert_element(From v) {
  if constexpr (std::is_same_v<To, From>) {
    return v;
  } else if constexpr (std::is_arithmetic_v<To> && std::is_arithmetic_v<From>) {
    return static_cast<To>(v);
  } else if constexpr (std::is_arithmetic_v<From>) {  // to a narrow float
    return To(static_cast<float>(v));
  } else if constexpr (std::is_arithmetic_v<To>) {  // from a narrow float
    return static_cast<To>(static_cast<float>(v));
  } else {
    return To(static_cast<float>(v));
  }
}

}  // namespace dsx
