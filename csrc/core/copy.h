// copy.h: copy an n-dimensional strided array into C-contiguous memory.
//
// Used by workers with the GIL released. The longest trailing run of dimensions that is already
// contiguous in the source is copied with one memcpy per outer index; a contiguous source is one
// memcpy. Strides may be negative or zero (broadcast); they are in bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace pyloader {

inline void copy_strided(std::byte* dst, const std::byte* src, std::size_t itemsize, int ndim,
                         const std::int64_t* shape, const std::int64_t* strides) noexcept {
  std::size_t total = itemsize;
  for (int d = 0; d < ndim; ++d) {
    if (shape[d] == 0) return;
    total *= static_cast<std::size_t>(shape[d]);
  }
  // Collapse the contiguous tail: dims [k, ndim) form one block of `inner` bytes.
  std::size_t inner = itemsize;
  int k = ndim;
  while (k > 0 && (shape[k - 1] == 1 || strides[k - 1] == static_cast<std::int64_t>(inner))) {
    inner *= static_cast<std::size_t>(shape[k - 1]);
    --k;
  }
  if (k == 0) {
    std::memcpy(dst, src, total);
    return;
  }
  // Odometer over dims [0, k).
  std::vector<std::int64_t> idx(static_cast<std::size_t>(k), 0);
  const std::size_t blocks = total / inner;
  const std::byte* s = src;
  for (std::size_t b = 0; b < blocks; ++b) {
    std::memcpy(dst, s, inner);
    dst += inner;
    for (int d = k - 1; d >= 0; --d) {
      if (++idx[static_cast<std::size_t>(d)] < shape[d]) {
        s += strides[d];
        break;
      }
      s -= strides[d] * (shape[d] - 1);
      idx[static_cast<std::size_t>(d)] = 0;
    }
  }
}

}  // namespace pyloader
