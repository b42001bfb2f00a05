// Main of the GPU test suite (ctest label `gpu`). Where no CUDA device is present it prints
// why and exits with 77, which ctest reports as "Skipped" (SKIP_RETURN_CODE), never "Passed".
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cstdio>
#include <string>

#include "kernels/cuda/runtime.h"

int main(int argc, char** argv) {
  std::string why;
  if (!dsx::cuda::device_available(&why)) {
    std::printf("SKIPPED: no CUDA device (%s); the GPU tests run on a machine with one\n", why.c_str());
    return 77;
  }
  dsx::cuda::select_device(0);
  std::printf("GPU tests on %s\n", dsx::cuda::device_description(0).c_str());
  return Catch::Session().run(argc, argv);
}
