# Every third-party part comes from Debian's packages (see docs/BUILDING.md).
if(DSX_STANDALONE_CUDA)
  # Kernels, GPU tests and CUDA benchmarks from a compiler and the CUDA toolkit alone
  # (docs/GPU.md): BLAS, OpenMP and Catch2 are optional or replaced there.
  include(${CMAKE_CURRENT_LIST_DIR}/StandaloneDependencies.cmake)
else()
  find_package(Threads REQUIRED)
  find_package(OpenMP REQUIRED COMPONENTS CXX)
  find_package(MPI REQUIRED COMPONENTS CXX)
  find_package(HDF5 REQUIRED COMPONENTS C)
  find_package(ZLIB REQUIRED)             # checkpoint checksums (crc32)
  find_package(yaml-cpp REQUIRED)          # target: yaml-cpp (no namespace)
  find_package(nlohmann_json REQUIRED)
  find_package(CLI11 REQUIRED)
  find_package(fmt REQUIRED)
  set(BLA_VENDOR OpenBLAS)
  find_package(BLAS REQUIRED)
  find_path(CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas REQUIRED)
  add_library(dsx_blas INTERFACE)
  target_link_libraries(dsx_blas INTERFACE ${BLAS_LIBRARIES})
  target_include_directories(dsx_blas INTERFACE ${CBLAS_INCLUDE_DIR})
endif()

# CUDA is optional: the CPU build never needs it. With DSX_CUDA the kernels library gains
# kernels/cuda (own kernels, cuBLASLt, cuDNN) and parallel/ the NCCL communicator.
include(CheckLanguage)
check_language(CUDA)
if(CMAKE_CUDA_COMPILER)
  set(_dsx_cuda_default ON)
else()
  set(_dsx_cuda_default OFF)
endif()
option(DSX_CUDA "Build the CUDA backend (needs nvcc, cuBLASLt, cuDNN, NCCL)" ${_dsx_cuda_default})
find_package(CUDAToolkit QUIET)
if(DSX_CUDA)
  # Hopper (sm_90a: wgmma/TMA available to own kernels) as real code, plus compute_80 PTX that
  # the driver JIT-compiles for any other GPU of Ampere or later (bf16 needs sm_80).
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90a-real 80-virtual)
  endif()
  # One CUDA runtime in every binary: the shared libcudart that CUDA::cudart (cuBLASLt, cuDNN,
  # NCCL) brings. CMake's default would also link cudart_static into executables that link
  # dsx_kernels' device code — two runtimes with separate state in one process.
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  # CMake 3.25 does not know that nvcc 13 takes C++20: tell it the flag.
  if(NOT CMAKE_CUDA20_STANDARD_COMPILE_OPTION)
    set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
    set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  endif()
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)
  find_package(CUDAToolkit REQUIRED)
  # DSX_CUDA_LIBRARY_HINTS / DSX_CUDA_INCLUDE_HINTS: empty, except in the standalone build, where
  # cuDNN may come from pip's nvidia-cudnn wheel (which has only the versioned libcudnn.so.9).
  find_library(DSX_CUDNN_LIBRARY NAMES cudnn libcudnn.so.9
               HINTS ${CUDAToolkit_LIBRARY_DIR} ${DSX_CUDA_LIBRARY_HINTS} REQUIRED)
  find_path(DSX_CUDNN_INCLUDE_DIR cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ${DSX_CUDA_INCLUDE_HINTS} REQUIRED)
  add_library(dsx_cuda_libs INTERFACE)
  target_link_libraries(dsx_cuda_libs INTERFACE CUDA::cudart CUDA::cublasLt CUDA::cublas ${DSX_CUDNN_LIBRARY})
  target_include_directories(dsx_cuda_libs SYSTEM INTERFACE ${DSX_CUDNN_INCLUDE_DIR})
  if(NOT DSX_STANDALONE_CUDA)  # only parallel/ (not in the standalone build) uses NCCL
    find_library(DSX_NCCL_LIBRARY nccl HINTS ${CUDAToolkit_LIBRARY_DIR} REQUIRED)
    find_path(DSX_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} REQUIRED)
    add_library(dsx_nccl INTERFACE)
    target_link_libraries(dsx_nccl INTERFACE ${DSX_NCCL_LIBRARY} CUDA::cudart)
    target_include_directories(dsx_nccl SYSTEM INTERFACE ${DSX_NCCL_INCLUDE_DIR})
  endif()
endif()
