# GPU tests: every CUDA op against its CPU op (tests/gpu). One ctest entry per file (Catch's
# filename tags); each exits 77 = "Skipped" where no device is present (gpu_main.cpp).
# Included by tests/CMakeLists.txt (full build) and cmake/StandaloneTargets.cmake.
if(DSX_CUDA AND NOT TARGET dsx_gpu_tests)
  file(GLOB gpu_sources CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/test_*.cpp)
  add_executable(dsx_gpu_tests ${CMAKE_CURRENT_LIST_DIR}/gpu_main.cpp ${gpu_sources})
  target_link_libraries(dsx_gpu_tests PRIVATE dsx_kernels Catch2::Catch2)
  target_include_directories(dsx_gpu_tests PRIVATE ${CMAKE_CURRENT_LIST_DIR}/..)
  target_precompile_headers(dsx_gpu_tests PRIVATE <catch2/catch.hpp>)
  # gpu_main.cpp defines Catch's runner, which the precompiled header must not pre-empt.
  set_source_files_properties(${CMAKE_CURRENT_LIST_DIR}/gpu_main.cpp PROPERTIES SKIP_PRECOMPILE_HEADERS ON)
  foreach(src ${gpu_sources})
    get_filename_component(stem ${src} NAME_WE)
    string(REPLACE "test_" "" short ${stem})
    add_test(NAME gpu.${short} COMMAND dsx_gpu_tests "-#" "[#${stem}]")
    set_tests_properties(gpu.${short} PROPERTIES LABELS gpu SKIP_RETURN_CODE 77)
  endforeach()
endif()
