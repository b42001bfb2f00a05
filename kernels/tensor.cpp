#include "kernels/tensor.h"

#include <malloc.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <sstream>
#include <stdexcept>

#include "kernels/dispatch.h"
#include "kernels/error.h"
#if DSX_HAVE_CUDA
#include "kernels/cuda/runtime.h"
#endif

namespace dsx {

std::string shape_str(const Shape& s) {
  std::ostringstream os;
  os << '[';
  for (size_t i = 0; i < s.size(); ++i) os << (i ? ", " : "") << s[i];
  os << ']';
  return os.str();
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

namespace {
// Host buffers come from glibc malloc, tuned once so that large freed buffers are kept for the
// next allocation instead of being unmapped: a training step allocates the same sizes every
// micro-batch, and a fresh mmap costs a page fault per 4 KiB on first touch (measured: 80 MB of
// faults per MoE dispatch round trip, 2x its time). Peak memory is unchanged; the heap simply
// does not shrink — what a GPU caching allocator does too.
class CpuAllocator final : public Allocator {
 public:
  CpuAllocator() {
    mallopt(M_MMAP_THRESHOLD, 1 << 30);  // fixed (no dynamic threshold): buffers < 1 GiB from the heap
    mallopt(M_TRIM_THRESHOLD, 1 << 30);  // return memory to the OS only beyond 1 GiB free at the top
  }
  void* allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    const size_t rounded = rounded_size(bytes);
    void* p = std::aligned_alloc(64, rounded);
    if (!p) throw std::bad_alloc();
    const int64_t now = used_.fetch_add(static_cast<int64_t>(rounded)) + static_cast<int64_t>(rounded);
    int64_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return p;
  }
  void deallocate(void* p, size_t bytes) override {
    if (!p) return;
    std::free(p);
    used_.fetch_sub(static_cast<int64_t>(rounded_size(bytes)));
  }
  Device device() const override { return Device::cpu; }

  HostTensorMemory memory() const { return {used_.load(), peak_.load()}; }
  void reset_peak() { peak_.store(used_.load()); }

 private:
  static size_t rounded_size(size_t bytes) { return (bytes + 63) / 64 * 64; }
  std::atomic<int64_t> used_{0}, peak_{0};
};

CpuAllocator& the_cpu_allocator() {
  static CpuAllocator alloc;
  return alloc;
}
}  // namespace

Allocator& cpu_allocator() {
  return the_cpu_allocator();
}

HostTensorMemory host_tensor_memory() {
  return the_cpu_allocator().memory();
}

void reset_host_tensor_peak() {
  the_cpu_allocator().reset_peak();
}

Allocator& allocator_for(Device device) {
  if (device == Device::cpu) return cpu_allocator();
#if DSX_HAVE_CUDA
  return cuda::device_allocator();
#else
  throw UserError("device cuda: this dsx was built without CUDA (configure with -DDSX_CUDA=ON on a machine with nvcc)");
#endif
}

namespace {
// Byte copy between any devices (host memcpy when both are host memory).
void copy_raw(void* dst, Device dst_device, const void* src, Device src_device, size_t bytes) {
  if (bytes == 0) return;
  if (dst_device == Device::cpu && src_device == Device::cpu) {
    std::memmove(dst, src, bytes);
    return;
  }
#if DSX_HAVE_CUDA
  cuda::copy_bytes(dst, dst_device, src, src_device, bytes);
#else
  throw std::logic_error("copy_raw: a cuda tensor exists in a build without CUDA");
#endif
}
}  // namespace

Storage::Storage(size_t bytes, Allocator& alloc) : ptr_(alloc.allocate(bytes)), bytes_(bytes), alloc_(&alloc) {}
Storage::~Storage() {
  alloc_->deallocate(ptr_, bytes_);
}

void check(bool ok, std::string_view op, const std::string& what) {
  if (!ok) throw std::invalid_argument(std::string(op) + ": " + what);
}

void check_shape(const Tensor& t, const Shape& expected, std::string_view op, std::string_view name) {
  if (t.defined() && t.shape() == expected) return;
  check(t.defined(), op, [&] { return std::string(name) + " is undefined"; });
  check(false, op, std::string(name) + " has shape " + shape_str(t.shape()) + ", expected " + shape_str(expected));
}

void check_device(const Tensor& t, Device device, std::string_view op, std::string_view name) {
  if (t.defined() && t.device() == device) return;
  check(t.defined(), op, [&] { return std::string(name) + " is undefined"; });
  check(false, op, [&] {
    return std::string(name) + " is on " + std::string(device_name(t.device())) + " (" + t.describe() +
           "); every tensor of this call must be on " + std::string(device_name(device));
  });
}

void check_cpu(const Tensor& t, std::string_view op, std::string_view name) {
  check_device(t, Device::cpu, op, name);
}

Tensor Tensor::empty(Shape shape, DType dtype, Device device) {
  for (int64_t d : shape) {
    if (d < 0) throw std::invalid_argument("Tensor::empty: negative dimension in " + shape_str(shape));
  }
  Allocator& alloc = allocator_for(device);
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.storage_ = std::make_shared<Storage>(t.nbytes(), alloc);
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype, Device device) {
  Tensor t = empty(std::move(shape), dtype, device);
  t.zero();
  return t;
}

Tensor Tensor::full(Shape shape, double value, DType dtype) {
  Tensor t = empty(std::move(shape), dtype);
  t.fill(value);
  return t;
}

template <class T>
Tensor Tensor::from(std::span<const T> values, Shape shape) {
  if (static_cast<int64_t>(values.size()) != shape_numel(shape)) {
    throw std::invalid_argument("Tensor::from: " + std::to_string(values.size()) + " values for shape " +
                                shape_str(shape));
  }
  Tensor t = empty(std::move(shape), dtype_of<T>());
  if (!values.empty()) std::memcpy(t.raw(), values.data(), values.size() * sizeof(T));
  return t;
}
template Tensor Tensor::from<double>(std::span<const double>, Shape);
template Tensor Tensor::from<float>(std::span<const float>, Shape);
template Tensor Tensor::from<bf16>(std::span<const bf16>, Shape);
template Tensor Tensor::from<fp8_e4m3>(std::span<const fp8_e4m3>, Shape);
template Tensor Tensor::from<fp8_e5m2>(std::span<const fp8_e5m2>, Shape);
template Tensor Tensor::from<int32_t>(std::span<const int32_t>, Shape);
template Tensor Tensor::from<int64_t>(std::span<const int64_t>, Shape);

int64_t Tensor::dim(int i) const {
  const int n = ndim();
  const int k = i < 0 ? i + n : i;
  if (k < 0 || k >= n) {
    throw std::out_of_range("Tensor::dim(" + std::to_string(i) + ") on shape " + shape_str(shape_));
  }
  return shape_[k];
}

void* Tensor::raw() const {
  if (!storage_) return nullptr;
  return static_cast<char*>(storage_->data()) + offset_;
}

void Tensor::check_dtype(DType expected) const {
  if (!defined()) throw std::logic_error("Tensor::data on an undefined tensor");
  if (expected != dtype_) {
    throw std::invalid_argument("Tensor::data<" + std::string(dtype_name(expected)) + "> on a " +
                                std::string(dtype_name(dtype_)) + " tensor");
  }
}

Tensor Tensor::view(Shape shape) const {
  if (shape_numel(shape) != numel()) {
    throw std::invalid_argument("Tensor::view: " + shape_str(shape) + " does not match " + shape_str(shape_));
  }
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice(int64_t begin, int64_t end) const {
  if (ndim() == 0 || begin < 0 || end < begin || end > shape_[0]) {
    throw std::out_of_range("Tensor::slice(" + std::to_string(begin) + ", " + std::to_string(end) + ") of " +
                            shape_str(shape_));
  }
  Tensor t = *this;
  const int64_t row = shape_[0] == 0 ? 0 : numel() / shape_[0];
  t.offset_ += static_cast<size_t>(begin * row) * dtype_size(dtype_);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::clone() const {
  Tensor t = empty(shape_, dtype_, device_);
  copy_raw(t.raw(), device_, raw(), device_, nbytes());
  return t;
}

void Tensor::copy_from(const Tensor& src) {
  check(defined() && src.defined(), "Tensor::copy_from", "undefined tensor");
  check(src.numel() == numel(), "Tensor::copy_from",
        "source " + shape_str(src.shape()) + " vs destination " + shape_str(shape_));
  if (src.dtype() == dtype_) {
    copy_raw(raw(), device_, src.raw(), src.device(), nbytes());
    return;
  }
  if (src.device() != device_) {  // convert on the source's device, then move the bytes
    copy_from(src.to(dtype_));
    return;
  }
#if DSX_HAVE_CUDA
  if (device_ == Device::cuda) {
    cuda::convert_elements(src.raw(), src.dtype(), raw(), dtype_, numel());
    return;
  }
#endif
  dispatch_any(dtype_, [&]<class To>() {
    dispatch_any(src.dtype(), [&]<class From>() {
      const From* s = src.data<From>();
      To* d = data<To>();
      const int64_t n = numel();
      for (int64_t i = 0; i < n; ++i) d[i] = convert_element<To>(s[i]);
    });
  });
}

Tensor Tensor::to(DType dtype) const {
  Tensor t = empty(shape_, dtype, device_);
  t.copy_from(*this);
  return t;
}

Tensor Tensor::to(Device device) const {
  Tensor t = empty(shape_, dtype_, device);
  t.copy_from(*this);
  return t;
}

void Tensor::fill(double value) {
  check(defined(), "Tensor::fill", "undefined tensor");
#if DSX_HAVE_CUDA
  if (device_ == Device::cuda) {
    cuda::fill_elements(raw(), dtype_, value, numel());
    return;
  }
#endif
  dispatch_any(dtype_, [&]<class T>() {
    const T v = convert_element<T>(value);
    T* d = data<T>();
    const int64_t n = numel();
    for (int64_t i = 0; i < n; ++i) d[i] = v;
  });
}

void Tensor::zero() {
  check(defined(), "Tensor::zero", "undefined tensor");
#if DSX_HAVE_CUDA
  if (device_ == Device::cuda) {
    cuda::zero_bytes(raw(), nbytes());
    return;
  }
#endif
  if (nbytes()) std::memset(raw(), 0, nbytes());
}

std::vector<double> Tensor::to_vector() const {
  if (defined() && device_ != Device::cpu) return to(Device::cpu).to_vector();
  check_cpu(*this, "Tensor::to_vector", "tensor");
  std::vector<double> out(static_cast<size_t>(numel()));
  dispatch_any(dtype_, [&]<class T>() {
    const T* d = data<T>();
    for (size_t i = 0; i < out.size(); ++i) out[i] = convert_element<double>(d[i]);
  });
  return out;
}

double Tensor::item() const {
  check(numel() == 1, "Tensor::item", "tensor has " + std::to_string(numel()) + " elements");
  return to_vector()[0];
}

std::string Tensor::describe() const {
  return std::string(dtype_name(dtype_)) + shape_str(shape_) + " " + std::string(device_name(device_));
}

}  // namespace dsx
