// The message of the dsx::UserError that `f` throws; fails the test when it throws nothing.
#pragma once
#include <catch2/catch.hpp>

#include <string>

#include "kernels/error.h"

namespace dsx::test {

template <class F>
std::string user_error(F&& f) {
  try {
    f();
  } catch (const dsx::UserError& e) {
    return e.what();
  }
  FAIL("expected dsx::UserError");
  return {};
}

}  // namespace dsx::test
