// Element types and devices of dsx tensors.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

#include "kernels/codecs.h"

namespace dsx {

enum class DType : uint8_t { f64, f32, bf16, fp8_e4m3, fp8_e5m2, i32, i64 };
enum class Device : uint8_t { cpu, cuda };

// Storage types for the narrow floats: plain bit containers; arithmetic goes through float.
struct bf16 {
  uint16_t bits = 0;
  bf16() = default;
  explicit bf16(float f) : bits(codec::float_to_bf16(f)) {}
  explicit operator float() const { return codec::bf16_to_float(bits); }
};
struct fp8_e4m3 {
  uint8_t bits = 0;
  fp8_e4m3() = default;
  explicit fp8_e4m3(float f) : bits(codec::float_to_e4m3(f)) {}
  explicit operator float() const { return codec::e4m3_to_float(bits); }
};
struct fp8_e5m2 {
  uint8_t bits = 0;
  fp8_e5m2() = default;
  explicit fp8_e5m2(float f) : bits(codec::float_to_e5m2(f)) {}
  explicit operator float() const { return codec::e5m2_to_float(bits); }
};

constexpr size_t dtype_size(DType t) {
  switch (t) {
    case DType::f64: return 8;
    case DType::f32: return 4;
    case DType::bf16: return 2;
    case DType::fp8_e4m3: return 1;
    case DType::fp8_e5m2: return 1;
    case DType::i32: return 4;
    case DType::i64: return 8;
  }
  return 0;
}

constexpr std::string_view dtype_name(DType t) {
  switch (t) {
    case DType::f64: return "f64";
    case DType::f32: return "f32";
    case DType::bf16: return "bf16";
    case DType::fp8_e4m3: return "fp8_e4m3";
    case DType::fp8_e5m2: return "fp8_e5m2";
    case DType::i32: return "i32";
    case DType::i64: return "i64";
  }
  return "?";
}

constexpr std::string_view device_name(Device d) { return d == Device::cpu ? "cpu" : "cuda"; }

constexpr bool is_floating(DType t) { return t != DType::i32 && t != DType::i64; }

template <class T>
constexpr DType dtype_of() {
  if constexpr (std::is_same_v<T, double>) return DType::f64;
  else if constexpr (std::is_same_v<T, float>) return DType::f32;
  else if constexpr (std::is_same_v<T, bf16>) return DType::bf16;
  else if constexpr (std::is_same_v<T, fp8_e4m3>) return DType::fp8_e4m3;
  else if constexpr (std::is_same_v<T, fp8_e5m2>) return DType::fp8_e5m2;
  else if constexpr (std::is_same_v<T, int32_t>) return DType::i32;
  else if constexpr (std::is_same_v<T, int64_t>) return DType::i64;
  else static_assert(sizeof(T) == 0, "not a dsx element type");
}

}  // namespace dsx
