# Tests of the GPU-session tooling (docs/GPU.md), included by tests/CMakeLists.txt:
#   tools.bundle_runtime     tools/bundle_runtime.sh bundles this build; dsx runs on the bundle
#                            alone (tests/tools/bundle_runtime_test.sh)
#   tools.torch_reference    tools/bench/torch_deepseek_v3.py on the CPU (skipped without torch)
#   recipe.cli.check.h100_bench   recipes/h100-bench.yaml validates
#   tools.gpu_tests_relocated     the gpu tests recorded and run as on a GPU machine (gpu_tests.py)
add_test(NAME tools.bundle_runtime
         COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/bundle_runtime_test.sh ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR})
# Bundling copies ~70 MB and xz-packs it: minutes on a loaded 2-core machine.
set_tests_properties(tools.bundle_runtime PROPERTIES LABELS tools TIMEOUT 1200)

add_test(NAME tools.torch_reference COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/torch_reference_test.sh ${PROJECT_SOURCE_DIR})
set_tests_properties(tools.torch_reference PROPERTIES LABELS tools SKIP_RETURN_CODE 77 TIMEOUT 600)

add_test(NAME recipe.cli.check.h100_bench
         COMMAND bash ${PROJECT_SOURCE_DIR}/tests/trainer/expect_exit.sh 0 "valid" "12 layers (1 dense + 11 MoE)"
                 "on cuda" "top-6 within the best 4 of 8 groups, sigmoid" "MTP depth 1" "total 2.6B"
                 -- $<TARGET_FILE:dsx> recipe check ${PROJECT_SOURCE_DIR}/recipes/h100-bench.yaml)
set_tests_properties(recipe.cli.check.h100_bench PROPERTIES LABELS "trainer;recipe" WORKING_DIRECTORY /tmp)

# tools/gpu/gpu_tests.py records this build's gpu tests relocatably and runs them from a copy.
if(DSX_CUDA)
  add_test(NAME tools.gpu_tests_relocated
           COMMAND bash ${CMAKE_CURRENT_LIST_DIR}/gpu_tests_relocated.sh ${PROJECT_BINARY_DIR} ${PROJECT_SOURCE_DIR})
  set_tests_properties(tools.gpu_tests_relocated PROPERTIES LABELS tools TIMEOUT 900)
endif()
