# Targets of the standalone CUDA build (DSX_STANDALONE_CUDA, docs/GPU.md), included by the top
# level after kernels/: the GPU tests, the CPU kernel tests (which check the CPU ops the GPU
# tests use as references, e.g. on the reference BLAS) and the CUDA benchmarks. data/,
# parallel/, trainer/ and bin/dsx are not built. Output folders match the full build's
# (tests/, bench/) so tools/gpu/run_all.sh finds either.
if(DSX_BUILD_TESTS)
  enable_testing()
  set(_dsx_tests ${PROJECT_SOURCE_DIR}/tests)

  include(${_dsx_tests}/gpu/gpu_tests.cmake)  # dsx_gpu_tests, as the full build defines it
  set_target_properties(dsx_gpu_tests PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)

  # The CPU kernel tests, one ctest entry per file (Catch's test discovery needs Catch2's CMake
  # scripts, which this build does without).
  file(GLOB _dsx_kernel_test_sources CONFIGURE_DEPENDS ${_dsx_tests}/kernels/test_*.cpp)
  add_executable(dsx_kernels_tests ${_dsx_tests}/support/catch_main.cpp ${_dsx_kernel_test_sources})
  target_link_libraries(dsx_kernels_tests PRIVATE dsx_kernels dsx_blas OpenMP::OpenMP_CXX Catch2::Catch2)
  target_include_directories(dsx_kernels_tests PRIVATE ${_dsx_tests})
  target_compile_definitions(dsx_kernels_tests PRIVATE DSX_SOURCE_DIR="${PROJECT_SOURCE_DIR}"
                                                       DSX_HAVE_CUDA_FP8_HEADER=1)
  target_include_directories(dsx_kernels_tests SYSTEM PRIVATE ${CUDAToolkit_INCLUDE_DIRS})
  target_precompile_headers(dsx_kernels_tests PRIVATE <catch2/catch.hpp>)
  set_source_files_properties(${_dsx_tests}/support/catch_main.cpp PROPERTIES SKIP_PRECOMPILE_HEADERS ON)
  set_target_properties(dsx_kernels_tests PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/tests)
  foreach(src ${_dsx_kernel_test_sources})
    get_filename_component(stem ${src} NAME_WE)
    string(REPLACE "test_" "" short ${stem})
    add_test(NAME kernels.${short} COMMAND dsx_kernels_tests "-#" "[#${stem}]")
    set_tests_properties(kernels.${short} PROPERTIES LABELS kernels)
  endforeach()
endif()

# CUDA benchmarks: tools/bench/bench_cuda_*.{cpp,cu}, which may use dsx_kernels and the CUDA
# libraries only (the other benchmarks need the trainer and MPI).
if(DSX_BUILD_BENCH)
  file(GLOB _dsx_cuda_benches CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/tools/bench/bench_cuda_*.cpp
       ${PROJECT_SOURCE_DIR}/tools/bench/bench_cuda_*.cu)
  foreach(src ${_dsx_cuda_benches})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE dsx_kernels dsx_blas OpenMP::OpenMP_CXX)
    set_target_properties(${name} PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${PROJECT_BINARY_DIR}/bench)
  endforeach()
endif()

if(DSX_REFERENCE_BLAS)
  set(_dsx_blas_kind "reference loops (DSX_REFERENCE_BLAS)")
else()
  set(_dsx_blas_kind "OpenBLAS")
endif()
message(STATUS "dsx standalone: cuDNN ${DSX_CUDNN_LIBRARY} (headers ${DSX_CUDNN_INCLUDE_DIR}), BLAS ${_dsx_blas_kind}")
