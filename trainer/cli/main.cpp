// dsx: the command-line entry point. Subcommands live in cmd_*.cpp beside this file.
#include <fmt/core.h>

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <vector>

#include "kernels/error.h"
#include "trainer/cli/registry.h"
#include "trainer/version.h"

namespace dsx::cli {
namespace {
struct Entry {
  std::string name;
  int order;
  AddCommands add;
};
std::vector<Entry>& entries() {
  static std::vector<Entry> list;
  return list;
}
int g_exit_code = 0;
}  // namespace

Register::Register(std::string name, int order, AddCommands add) {
  entries().push_back({std::move(name), order, std::move(add)});
}

void set_exit_code(int code) {
  g_exit_code = code;
}

}  // namespace dsx::cli

// Runtime settings that must be in the environment before OpenMP and OpenBLAS initialise
// (both read it before main), so dsx sets the ones the user left unset and re-executes itself
// once; if that fails it just carries on.
//  - OMP_WAIT_POLICY=passive: OpenMP workers that spin while idle make every small op pay for
//    any other load on the cores (tiny recipe on 2 shared cores: 4-8x slower steps spinning).
//  - OPENBLAS_CORETYPE=SkylakeX on AVX-512 CPUs: Debian's OpenBLAS 0.3.21 does not recognise
//    newer Xeons and falls back to its Haswell (AVX2) kernels; its AVX-512 sgemm measured 1.5x
//    faster here (tools/bench/bench_linear).
static void set_runtime_environment(char** argv) {
  bool changed = false;
  if (std::getenv("OMP_WAIT_POLICY") == nullptr) {
    setenv("OMP_WAIT_POLICY", "passive", 1);
    changed = true;
  }
  if (std::getenv("OPENBLAS_CORETYPE") == nullptr && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    setenv("OPENBLAS_CORETYPE", "SkylakeX", 1);
    changed = true;
  }
  if (changed) execv("/proc/self/exe", argv);
}

int main(int argc, char** argv) {
  set_runtime_environment(argv);
  CLI::App app{"dsx: train DeepSeek-style Mixture-of-Experts language models from YAML recipes"};
  app.set_version_flag("--version", std::string("dsx ") + dsx::kVersion);
  app.require_subcommand(0, 1);
  auto& list = dsx::cli::entries();
  std::sort(list.begin(), list.end(), [](const auto& a, const auto& b) { return a.order < b.order; });
  for (auto& e : list) e.add(app);
  try {
    app.parse(argc, argv);
    if (app.get_subcommands().empty()) {
      std::fputs(app.help().c_str(), stdout);
      return 0;
    }
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  } catch (const dsx::UserError& e) {
    std::fflush(stdout);  // what the command printed before the error comes first
    fmt::print(stderr, "dsx: error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "dsx: internal error: {}\n", e.what());
    return 1;
  }
  return dsx::cli::g_exit_code;
}
