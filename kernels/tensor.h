// Tensor: shape, dtype, device and contiguous row-major storage.
//
// Storage is reference counted; views (slices along the first dimension, reshapes) share it.
// Element access is checked against the dtype: data<float>() on a bf16 tensor throws.
#pragma once
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels/dtype.h"

namespace dsx {

using Shape = std::vector<int64_t>;
std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

// Raw memory from an allocator; freed through the same allocator when the last owner goes.
class Allocator {
 public:
  virtual ~Allocator() = default;
  virtual void* allocate(size_t bytes) = 0;
  virtual void deallocate(void* p, size_t bytes) = 0;
  virtual Device device() const = 0;
};
Allocator& cpu_allocator();  // 64-byte aligned host memory
// Host tensor storage from cpu_allocator(): bytes live now, and the most live at once since the
// last reset (kernels/device.h reports them as the CPU's memory statistics).
struct HostTensorMemory {
  int64_t used_bytes = 0;
  int64_t peak_bytes = 0;
};
HostTensorMemory host_tensor_memory();
void reset_host_tensor_peak();
// The allocator of a device: host memory, or the CUDA caching pool (kernels/cuda/runtime.h).
// Throws UserError for cuda in a build without CUDA.
Allocator& allocator_for(Device device);

class Storage {
 public:
  Storage(size_t bytes, Allocator& alloc);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  void* data() const { return ptr_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return alloc_->device(); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  Allocator* alloc_;
};

class Tensor {
 public:
  Tensor() = default;  // undefined tensor: defined() is false
  static Tensor empty(Shape shape, DType dtype, Device device = Device::cpu);
  static Tensor zeros(Shape shape, DType dtype, Device device = Device::cpu);
  static Tensor full(Shape shape, double value, DType dtype);
  // Copies the values into a new CPU tensor of dtype dtype_of<T>() (converting for bf16/fp8).
  template <class T>
  static Tensor from(std::span<const T> values, Shape shape);
  template <class T>
  static Tensor from(std::initializer_list<T> values, Shape shape) {
    return from<T>(std::span<const T>(values.begin(), values.size()), std::move(shape));
  }

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  int64_t dim(int i) const;  // negative i counts from the back
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t numel() const { return shape_numel(shape_); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  size_t nbytes() const { return static_cast<size_t>(numel()) * dtype_size(dtype_); }

  void* raw() const;
  template <class T>
  T* data() const {
    check_dtype(dtype_of<T>());
    return static_cast<T*>(raw());
  }
  // The same storage viewed with another shape of equal numel.
  Tensor view(Shape shape) const;
  // Rows [begin, end) of the first dimension, sharing storage.
  Tensor slice(int64_t begin, int64_t end) const;
  Tensor clone() const;
  // A new tensor with every element converted to dtype (round-to-nearest-even for narrow floats).
  Tensor to(DType dtype) const;
  // A copy on another device (a device-to-host copy waits for the device's current stream).
  Tensor to(Device device) const;
  // Copies src's elements (same numel, any dtypes, any devices) into this tensor, converting.
  void copy_from(const Tensor& src);
  void fill(double value);
  void zero();
  // Elements converted to double, for tests and checks (device tensors are copied to the host).
  std::vector<double> to_vector() const;
  double item() const;  // the single element of a 1-element tensor

  std::string describe() const;  // "f32[4, 8] cpu"

 private:
  void check_dtype(DType expected) const;
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;  // bytes from the start of storage
  Shape shape_;
  DType dtype_ = DType::f32;
  Device device_ = Device::cpu;
};

// Throws std::invalid_argument("op: <what>") when the condition fails: shape/dtype checks in ops.
// The checks sit on every op call, so the success path must not build strings: pass the
// message as a callable (`check(ok, op, [&] { return ...; })`) when it has to be formatted.
void check(bool ok, std::string_view op, const std::string& what);
template <class MakeMessage>
requires std::is_invocable_r_v<std::string, MakeMessage>
inline void check(bool ok, std::string_view op, MakeMessage&& make_message) {
  if (!ok) check(false, op, make_message());
}
void check_shape(const Tensor& t, const Shape& expected, std::string_view op, std::string_view name);
// Throws "op: name is undefined" or "op: name is on cpu (f32[2] cpu); every tensor of this call
// must be on cuda" unless t is defined and lives on `device`.
void check_device(const Tensor& t, Device device, std::string_view op, std::string_view name);
void check_cpu(const Tensor& t, std::string_view op, std::string_view name);  // check_device(t, cpu, ...)

}  // namespace dsx
