// config.h: build-wide constants of the pyloader core.
//
// kCacheLine is the padding unit for hot atomics: two counters written by different threads must
// never share a line, or every write bounces the line between cores (false sharing).
#pragma once

#include <cstddef>
#include <new>

namespace pyloader {

#if defined(__cpp_lib_hardware_interference_size)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Winterference-size"
#endif
inline constexpr std::size_t kCacheLine = std::hardware_destructive_interference_size;
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#else
inline constexpr std::size_t kCacheLine = 64;
#endif

static_assert(kCacheLine >= 64 && (kCacheLine & (kCacheLine - 1)) == 0,
              "The cache line used for padding must be a power of two of at least 64 bytes.");

}  // namespace pyloader
