// dsx: the command-line entry point. Subcommands live in cmd_*.cpp beside this file.
#include <fmt/core.h>

#include <algorithm>
#include <cstdio>
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

int main(int argc, char** argv) {
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
