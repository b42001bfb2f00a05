// The dsx CLI is one CLI11 app; each cmd_*.cpp in this folder adds its subcommands by
// registering a function at static-initialisation time:
//
//   static dsx::cli::Register reg("data", 20, [](CLI::App& app) { ... app.add_subcommand(...) ... });
//
// The name orders nothing; `order` sets where the subcommand appears in --help.
// A subcommand's callback returns an exit code through dsx::cli::set_exit_code, or throws
// dsx::UserError for bad input (printed as "dsx: error: <message>", exit 2).
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace dsx::cli {

using AddCommands = std::function<void(CLI::App&)>;

struct Register {
  Register(std::string name, int order, AddCommands add);
};

void set_exit_code(int code);

}  // namespace dsx::cli
