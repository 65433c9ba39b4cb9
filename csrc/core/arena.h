// arena.h: Arena, one shared-memory region (memfd) that a BufferPool carves its buffers from.
//
// Process mode (ARCHITECTURE.md): worker processes write each batch straight into a buffer of the
// consumer's pool, so the pool's memory must be shared. The arena is an anonymous memfd
// (memfd_create: nothing is named in /dev/shm, so nothing can leak, even on SIGKILL), sized once
// and sparse: a page costs memory only once written. The owner maps it here; a worker process
// maps the same file (or inherits the mapping by fork) and addresses buffers by their offset.
//
// Ranges are handed out first-fit from a free list (coalesced on free). A freed range's pages go
// back to the kernel at once (fallocate PUNCH_HOLE), as munmap does for the private buffers;
// except in a forked child, where the pages are still the parent's (fork.h).
//
// Thread safety: allocate() and free() are safe to call from any thread (one mutex).
#pragma once

#include <cstddef>
#include <map>
#include <memory>
#include <mutex>

#include "fork.h"

namespace pyloader {

class Arena {
 public:
  // Throws std::system_error when the memfd cannot be created, sized or mapped.
  static std::unique_ptr<Arena> create(std::size_t bytes);
  ~Arena();
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;

  std::byte* base() const noexcept { return base_; }
  std::size_t size() const noexcept { return size_; }
  // The memfd, to hand to worker processes; -1 after close_fd(). The mapping outlives it.
  int fd() const noexcept { return fd_; }
  void close_fd() noexcept;

  // `bytes` (a multiple of the page size) at an offset aligned to `align` (a power of two, at
  // least a page), or nullptr when no free range fits.
  std::byte* allocate(std::size_t bytes, std::size_t align);
  // Returns a range from allocate(); its pages go back to the kernel.
  void free(std::byte* p, std::size_t bytes) noexcept;
  std::size_t free_bytes() const;

 private:
  Arena(int fd, std::byte* base, std::size_t size);
  int fd_;
  std::byte* const base_;
  const std::size_t size_;
  const OwnerProcess owner_;
  mutable std::mutex mu_;
  std::map<std::size_t, std::size_t> free_;  // offset -> length, disjoint, never adjacent
};

}  // namespace pyloader
