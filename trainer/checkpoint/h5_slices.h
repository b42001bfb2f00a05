// The HDF5 side of the checkpoint store: one file per writer, holding a dataset per tensor slice
// under /tensors/<name> (see docs/CHECKPOINT_FORMAT.md). Internal to trainer/checkpoint; it is the
// only place that includes hdf5.h, which dsx_trainer links privately.
//
// Failures throw std::runtime_error with a message about the file alone; the checkpoint layer adds
// the checkpoint directory and tensor name and turns it into dsx::UserError where the user's files
// are at fault.
#pragma once
#include <hdf5.h>

#include <cstdint>
#include <filesystem>
#include <string>

#include "kernels/tensor.h"
#include "trainer/checkpoint/checkpoint.h"

namespace dsx::ckpt::detail {

// An HDF5 identifier closed by the matching H5?close on destruction.
class H5Id {
 public:
  using Closer = herr_t (*)(hid_t);
  H5Id() = default;
  H5Id(hid_t id, Closer closer) : id_(id), closer_(closer) {}
  ~H5Id() { reset(); }
  H5Id(H5Id&& o) noexcept : id_(o.id_), closer_(o.closer_) { o.id_ = H5I_INVALID_HID; }
  H5Id& operator=(H5Id&& o) noexcept;
  H5Id(const H5Id&) = delete;
  H5Id& operator=(const H5Id&) = delete;
  hid_t get() const { return id_; }
  bool valid() const { return id_ >= 0; }
  // Closes now and reports whether closing succeeded (closing a file flushes it).
  bool close();
  void reset() { (void)close(); }

 private:
  hid_t id_ = H5I_INVALID_HID;
  Closer closer_ = nullptr;
};

// Identity written into every file's root attributes.
struct FileIdentity {
  int writer_index = 0;
  int n_writers = 1;
  int64_t step = 0;
};

class SliceFileWriter {
 public:
  SliceFileWriter(const std::filesystem::path& path, const FileIdentity& identity);
  // slice.offset already normalised to ndim entries; the dataset /tensors/<dataset>
  void write(const TensorSlice& slice, const std::string& dataset);
  void close();  // flushes; throws if the file could not be completed

 private:
  std::filesystem::path path_;
  H5Id file_;
  H5Id tensors_;
};

class SliceFileReader {
 public:
  // Opens the file read-only and checks it is a dsx checkpoint file of a readable version.
  explicit SliceFileReader(const std::filesystem::path& path);
  // Copies the box [file_start, file_start + count) of tensor `name`'s dataset (which must have
  // shape stored_extent and dtype `dtype`) into dest at [mem_start, mem_start + count).
  void read_box(const std::string& name, DType dtype, const Shape& stored_extent, const Shape& file_start,
                const Shape& count, const Tensor& dest, const Shape& mem_start) const;
  const FileIdentity& identity() const { return identity_; }

 private:
  std::filesystem::path path_;
  H5Id file_;
  FileIdentity identity_;
};

}  // namespace dsx::ckpt::detail
