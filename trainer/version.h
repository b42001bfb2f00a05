#pragma once
namespace dsx {
inline constexpr const char* kVersion = "0.1.0";
}
