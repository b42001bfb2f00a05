// What every dsx benchmark shares: the --quick / --reps / --help command line and timing.
#pragma once
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>

namespace dsx::bench {

struct Options {
  bool quick = false;
  int repetitions = 0;
};

// Parses [--quick] [--reps N] [--help]. --quick sets repetitions to quick_repetitions. Returns
// false (after printing why) when the command line is not understood; --help prints and exits 0.
inline bool parse_options(const char* name, int argc, char** argv, int quick_repetitions, void (*print_help)(),
                          Options& options) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--help" || arg == "-h") {
      print_help();
      std::exit(0);
    } else if (arg == "--quick") {
      options.quick = true;
      options.repetitions = quick_repetitions;
    } else if (arg == "--reps" && i + 1 < argc) {
      char* end = nullptr;
      const long reps = std::strtol(argv[++i], &end, 10);
      if (*end != '\0' || reps < 1 || reps > 1000) {
        std::fprintf(stderr, "%s: --reps needs an integer in [1, 1000], got '%s'\n", name, argv[i]);
        return false;
      }
      options.repetitions = static_cast<int>(reps);
    } else {
      std::fprintf(stderr, "%s: unknown argument '%s' (try --help)\n", name, arg.c_str());
      return false;
    }
  }
  return true;
}

inline double seconds_of(const std::function<void()>& call) {
  const auto start = std::chrono::steady_clock::now();
  call();
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace dsx::bench
