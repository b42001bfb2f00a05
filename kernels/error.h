// Errors caused by what the user gave dsx (a recipe, a file, a world size, a flag), as
// opposed to bugs. The CLI prints the message alone on one line and exits with code 2.
// The message names the key, file or rank at fault.
#pragma once
#include <stdexcept>
#include <string>

namespace dsx {

class UserError : public std::runtime_error {
 public:
  explicit UserError(const std::string& what) : std::runtime_error(what) {}
};

}  // namespace dsx
