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

void set_exit_code(int code) { g_exit_code = code; }

}  // namespace dsx::cli

// OpenMP workers that spin while idle make every small op pay for any other load on the
// cores (measured on 2 cores: tiny-recipe steps 4-8x slower with 2 spinning threads than with
// passive waiting). libgomp reads OMP_WAIT_POLICY once, before main, so when the user has not
// chosen a policy dsx sets "passive" and re-executes itself; if that fails it just carries on.
static void prefer_passive_openmp_waiting(char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  setenv("OMP_WAIT_POLICY", "passive", 1);
  execv("/proc/self/exe", argv);
}

int main(int argc, char** argv) {
  prefer_passive_openmp_waiting(argv);
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
    fmt::print(stderr, "dsx: error: {}\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    fmt::print(stderr, "dsx: internal error: {}\n", e.what());
    return 1;
  }
  return dsx::cli::g_exit_code;
}
