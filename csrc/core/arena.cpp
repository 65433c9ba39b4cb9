#include "arena.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <system_error>

namespace pyloader {

std::unique_ptr<Arena> Arena::create(std::size_t bytes) {
  const int fd = memfd_create("pyloader-arena", MFD_CLOEXEC);
  if (fd < 0) throw std::system_error(errno, std::generic_category(), "memfd_create");
  if (ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
    const int err = errno;
    ::close(fd);
    throw std::system_error(err, std::generic_category(), "ftruncate of the shared arena");
  }
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0);
  if (p == MAP_FAILED) {
    const int err = errno;
    ::close(fd);
    throw std::system_error(err, std::generic_category(), "mmap of the shared arena");
  }
  return std::unique_ptr<Arena>(new Arena(fd, static_cast<std::byte*>(p), bytes));
}

Arena::Arena(int fd, std::byte* base, std::size_t size) : fd_(fd), base_(base), size_(size) {
  free_.emplace(0, size);
}

Arena::~Arena() {
  munmap(base_, size_);        // this process's mapping only
  if (!owner_.here()) return;  // a forked child's copy: mu_ may be held by a thread not here
  close_fd();
}

void Arena::close_fd() noexcept {
  std::lock_guard lock(mu_);
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

std::byte* Arena::allocate(std::size_t bytes, std::size_t align) {
  std::lock_guard lock(mu_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    const std::size_t off = it->first, len = it->second;
    const std::size_t start = (off + align - 1) & ~(align - 1);
    if (start + bytes > off + len || start + bytes < start) continue;
    free_.erase(it);
    if (start > off) free_.emplace(off, start - off);
    if (start + bytes < off + len) free_.emplace(start + bytes, off + len - (start + bytes));
    return base_ + start;
  }
  return nullptr;
}

void Arena::free(std::byte* p, std::size_t bytes) noexcept {
  // A forked child's copy (fork.h): the pages are the parent's too, and mu_ may be held by a
  // parent's thread that is not here. The copy is never used again: nothing to keep in order.
  if (!owner_.here()) return;
  std::size_t off = static_cast<std::size_t>(p - base_);
  std::size_t len = bytes;
  std::lock_guard lock(mu_);
  // Give the pages back; MADV_REMOVE is the fallback where PUNCH_HOLE is refused. The fd may be
  // closed already: the mapping alone can still free them.
  if (fd_ < 0 || fallocate(fd_, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, static_cast<off_t>(off),
                           static_cast<off_t>(len)) != 0) {
    madvise(p, len, MADV_REMOVE);
  }
  auto next = free_.lower_bound(off);
  if (next != free_.end() && next->first == off + len) {  // merge with the range after
    len += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second == off) {  // merge with the range before
      off = prev->first;
      len += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(off, len);
}

std::size_t Arena::free_bytes() const {
  std::lock_guard lock(mu_);
  std::size_t total = 0;
  for (const auto& [off, len] : free_) total += len;
  return total;
}

}  // namespace pyloader
