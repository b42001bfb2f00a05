# Dependencies of the standalone CUDA build (DSX_STANDALONE_CUDA, preset `cuda-standalone`):
# dsx_kernels (CPU + CUDA ops), the GPU tests and the CUDA benchmarks, built from a C++ compiler
# and the CUDA toolkit alone, for GPU machines that lack dsx's other packages (docs/GPU.md).
# Defines what kernels/ and the GPU tests link: dsx_blas, OpenMP::OpenMP_CXX, Catch2::Catch2,
# Threads::Threads, and the hint lists the CUDA section of Dependencies.cmake searches.
if(DEFINED DSX_CUDA AND NOT DSX_CUDA)
  message(FATAL_ERROR "DSX_STANDALONE_CUDA builds the CUDA backend: DSX_CUDA must be ON")
endif()
set(DSX_CUDA ON CACHE BOOL "Build the CUDA backend (needs nvcc, cuBLASLt, cuDNN, NCCL)")

find_package(Threads REQUIRED)  # part of the C library; never missing

# OpenMP: g++ ships libgomp, so it is nearly always there. Without it the CPU ops run on one
# thread: cmake/standalone/no_openmp/omp.h gives the one-thread answers of the OpenMP calls dsx
# makes (omp_get_max_threads() = 1 ...) and the pragmas are ignored.
find_package(OpenMP COMPONENTS CXX)
if(NOT OpenMP_CXX_FOUND)
  message(STATUS "dsx standalone: no OpenMP; CPU reference ops run single-threaded")
  add_library(OpenMP::OpenMP_CXX INTERFACE IMPORTED)
  set_target_properties(OpenMP::OpenMP_CXX PROPERTIES
    INTERFACE_INCLUDE_DIRECTORIES ${CMAKE_CURRENT_LIST_DIR}/standalone/no_openmp)
endif()

# BLAS for the CPU ops (the references the GPU tests compare with). OpenBLAS when the machine
# has it; otherwise DSX_REFERENCE_BLAS: the few CBLAS calls dsx makes (sgemm/dgemm, saxpy/daxpy,
# sscal/dscal, openblas_{get,set}_num_threads), implemented as plain loops (cmake/standalone).
# Much slower than OpenBLAS, exact enough, and the GPU tests only run the CPU ops on small shapes.
set(BLA_VENDOR OpenBLAS)
find_package(BLAS QUIET)
find_path(CBLAS_INCLUDE_DIR cblas.h PATH_SUFFIXES openblas)
if(BLAS_FOUND AND CBLAS_INCLUDE_DIR)
  set(_dsx_reference_blas_default OFF)
else()
  set(_dsx_reference_blas_default ON)
endif()
option(DSX_REFERENCE_BLAS "CPU BLAS calls run dsx's reference loops instead of OpenBLAS (standalone build only)"
       ${_dsx_reference_blas_default})
add_library(dsx_blas INTERFACE)
if(DSX_REFERENCE_BLAS)
  message(STATUS "dsx standalone: reference BLAS loops (no OpenBLAS): CPU GEMMs are slow, results exact")
  add_library(dsx_reference_blas STATIC ${CMAKE_CURRENT_LIST_DIR}/standalone/reference_blas/reference_blas.cpp)
  target_include_directories(dsx_reference_blas PUBLIC ${CMAKE_CURRENT_LIST_DIR}/standalone/reference_blas)
  target_compile_options(dsx_reference_blas PRIVATE -Wall -Wextra -Wpedantic -Wno-unknown-pragmas)
  target_link_libraries(dsx_reference_blas PRIVATE OpenMP::OpenMP_CXX)
  target_link_libraries(dsx_blas INTERFACE dsx_reference_blas)
else()
  target_link_libraries(dsx_blas INTERFACE ${BLAS_LIBRARIES})
  target_include_directories(dsx_blas INTERFACE ${CBLAS_INCLUDE_DIR})
endif()

# Catch2 v2 is one header; it is not committed to dsx. DSX_CATCH2_INCLUDE_DIR names a folder
# holding catch2/catch.hpp: tools/gpu/pack.sh copies Debian's into .gpu/include, which travels
# with the tree; a machine with Catch2 installed is found without it.
find_path(DSX_CATCH2_INCLUDE_DIR catch2/catch.hpp HINTS ${PROJECT_SOURCE_DIR}/.gpu/include
          DOC "folder holding catch2/catch.hpp (Catch2 v2)")
if(DSX_BUILD_TESTS AND NOT DSX_CATCH2_INCLUDE_DIR)
  message(FATAL_ERROR "dsx standalone: catch2/catch.hpp not found; pass -DDSX_CATCH2_INCLUDE_DIR=<dir> "
                      "(tools/gpu/pack.sh puts it in .gpu/include) or -DDSX_BUILD_TESTS=OFF")
endif()
if(DSX_CATCH2_INCLUDE_DIR)
  add_library(Catch2::Catch2 INTERFACE IMPORTED)
  set_target_properties(Catch2::Catch2 PROPERTIES INTERFACE_INCLUDE_DIRECTORIES ${DSX_CATCH2_INCLUDE_DIR})
endif()

# cuDNN may come from pip's nvidia-cudnn wheel rather than the toolkit (as on a PyTorch machine):
# look in every site-packages/nvidia/*/ (and */*/) folder python3 knows, then in headers carried
# from the build machine (.gpu/cuda-include, tools/gpu/pack.sh) as the last resort.
set(DSX_CUDA_LIBRARY_HINTS "")
set(DSX_CUDA_INCLUDE_HINTS "")
find_program(DSX_PYTHON3 python3)
if(DSX_PYTHON3)
  execute_process(
    COMMAND ${DSX_PYTHON3} -c "import nvidia, os; print(';'.join(os.path.abspath(p) for p in nvidia.__path__))"
    OUTPUT_VARIABLE _dsx_nvidia_roots OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  foreach(root ${_dsx_nvidia_roots})
    file(GLOB _libs LIST_DIRECTORIES true ${root}/*/lib ${root}/*/*/lib)
    file(GLOB _incs LIST_DIRECTORIES true ${root}/*/include ${root}/*/*/include)
    list(APPEND DSX_CUDA_LIBRARY_HINTS ${_libs})
    list(APPEND DSX_CUDA_INCLUDE_HINTS ${_incs})
  endforeach()
endif()
find_package(CUDAToolkit QUIET)
find_path(_dsx_cudnn_header cudnn.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ${DSX_CUDA_INCLUDE_HINTS} NO_CACHE)
if(NOT _dsx_cudnn_header AND EXISTS ${PROJECT_SOURCE_DIR}/.gpu/cuda-include)
  message(STATUS "dsx standalone: no cudnn.h on this machine; using the headers carried in .gpu/cuda-include")
  list(APPEND DSX_CUDA_INCLUDE_HINTS ${PROJECT_SOURCE_DIR}/.gpu/cuda-include)
endif()
