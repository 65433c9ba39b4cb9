// buffer_pool.h: reusable, page-aligned (optionally pinned) host buffers, leased per batch.
//
// Roles
//   workers:   acquire() a buffer big enough for one batch, fill it, and hand the lease on with the
//              batch (through the ring) to the consumer;
//   consumer:  keeps the lease alive as long as any view of the batch is alive (in Python the
//              lease is the arrays' base object); dropping the lease returns the buffer.
// A buffer is therefore never reused while a batch in it can still be seen: a user who keeps
// batches makes the pool grow instead, up to `max_bytes`. Past the bound, acquire() waits for a
// lease to come back (and waiting_for() tells the consumer how long, so that it can say why).
// When no buffer at all is leased, acquire() always succeeds, even past the bound: waiting could
// then never end (likewise when the caller's may_exceed says so: see acquire()).
//
// Buffers are mmap'd anonymous memory (page-aligned, returned to the OS when dropped; from 2 MiB
// up, 2 MiB-aligned with transparent huge pages requested) and are reused smallest-fit, so
// steady-state loading makes no allocation and takes no page fault.
//
// Shared buffers (process mode): created with `arena_bytes`, the pool carves its buffers from one
// shared-memory Arena of that size (arena.h) instead of mapping private memory, so that worker
// processes can write into them (they address a buffer by its offset in the arena).
//
// Thread safety: every member is safe to call from any thread. State is guarded by one mutex;
// the hot path holds it for a short scan of the free list. The pool outlives its users: leases
// hold a shared_ptr to it.
//
// Shutdown: acquire() takes a cancel flag; after setting it, call wake_all() and every waiter
// returns an empty lease at once.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "arena.h"
#include "pin.h"

namespace pyloader {

class BufferPool;

// Ownership of one buffer. Move-only; returns the buffer to its pool when destroyed.
class BufferLease {
 public:
  BufferLease() noexcept = default;
  BufferLease(BufferLease&& o) noexcept { *this = std::move(o); }
  BufferLease& operator=(BufferLease&& o) noexcept;
  BufferLease(const BufferLease&) = delete;
  BufferLease& operator=(const BufferLease&) = delete;
  ~BufferLease() { reset(); }

  explicit operator bool() const noexcept { return data_ != nullptr; }
  std::byte* data() const noexcept { return data_; }
  std::size_t capacity() const noexcept { return capacity_; }
  std::int32_t id() const noexcept { return id_; }
  void reset() noexcept;

 private:
  friend class BufferPool;
  std::shared_ptr<BufferPool> pool_;
  std::int32_t id_ = -1;
  std::byte* data_ = nullptr;
  std::size_t capacity_ = 0;
};

struct PoolInfo {
  std::size_t buffers = 0;       // buffers allocated now
  std::size_t leased = 0;        // of which in use (loading, in flight, or held by the user)
  std::size_t bytes = 0;         // bytes allocated now
  std::size_t peak_bytes = 0;
  std::size_t max_bytes = 0;
  std::size_t pinned_bytes = 0;  // bytes allocated now that are pinned
  std::size_t pin_failures = 0;
  std::size_t allocations = 0;   // mmap calls so far (steady state: no new ones)
  std::string pin_method;        // "cuda", "mlock" or "none"
  std::string pin_reason;
  std::string pin_error;         // the last pinning failure, if any
};

class BufferPool : public std::enable_shared_from_this<BufferPool> {
 public:
  // `arena_bytes` > 0: buffers come from a shared Arena of that size (throws std::system_error
  // when it cannot be made).
  static std::shared_ptr<BufferPool> create(std::size_t max_bytes, PinRequest pin,
                                            std::size_t arena_bytes = 0);
  ~BufferPool();
  BufferPool(const BufferPool&) = delete;
  BufferPool& operator=(const BufferPool&) = delete;

  // A buffer of at least `bytes` bytes. Waits while the pool is at its bound and every buffer is
  // leased; returns an empty lease if `cancel` becomes true. Throws std::bad_alloc if the OS
  // refuses memory. While anyone waits, buffers go to the lowest `priority` first (the engine
  // passes the position). When `may_exceed` is given and returns true (asked under the pool's
  // lock, again after every wake-up), the caller grows the pool past its bound instead of
  // waiting: the engine says so for the position the consumer needs next while later positions
  // hold buffers, which they could only release after it (waiting would deadlock).
  BufferLease acquire(std::size_t bytes, const std::atomic<bool>& cancel,
                      std::int64_t priority = std::numeric_limits<std::int64_t>::max(),
                      const std::function<bool()>* may_exceed = nullptr);
  // A buffer now, or an empty lease if getting one would mean waiting (or the OS refuses memory).
  BufferLease try_acquire(std::size_t bytes,
                          std::int64_t priority = std::numeric_limits<std::int64_t>::max());
  // Wakes every acquire() so that it re-checks its cancel flag.
  void wake_all();
  PoolInfo info() const;
  // The shared arena, or null for a pool of private buffers.
  Arena* arena() const noexcept { return arena_.get(); }
  // How long the longest current acquire() has been waiting for a free buffer (zero if none is).
  std::chrono::nanoseconds waiting_for() const;
  // Cheap counters for per-batch statistics (relaxed reads of values written under the mutex).
  std::size_t buffers_now() const noexcept { return n_buffers_.load(std::memory_order_relaxed); }
  std::size_t bytes_now() const noexcept { return n_bytes_.load(std::memory_order_relaxed); }
  // Whether any acquire() is waiting now (a cheap hint, for deciding to call wake_all()).
  bool has_waiters() const noexcept { return n_waiting_.load(std::memory_order_relaxed) != 0; }

 private:
  BufferPool(std::size_t max_bytes, PinRequest pin, std::size_t arena_bytes);
  void* map_memory(std::size_t bytes);  // a new buffer's memory, or nullptr (mu_ not held)
  void unmap(void* p, std::size_t bytes) noexcept;
  friend class BufferLease;
  void release(std::int32_t id) noexcept;

  struct Buffer {
    std::byte* data = nullptr;
    std::size_t capacity = 0;
    bool pinned = false;
    bool leased = false;
  };
  // Maps and pins a buffer of `bytes` bytes (accounted for by the caller) with mu_ released, and
  // returns it leased. Throws std::bad_alloc.
  BufferLease allocate_unlocked(std::unique_lock<std::mutex>& lock, std::size_t bytes);
  // All under mu_.
  BufferLease lease_locked(std::int32_t id);
  std::int32_t take_free_locked(std::size_t need);  // a free buffer that fits, or -1
  bool can_grow_locked(std::size_t need, bool urgent);  // may a new buffer of `need` bytes be made?
  void leave_queue_locked(std::int64_t priority);
  void drop_locked(std::int32_t id) noexcept;       // unmaps a free buffer
  void publish_counts_locked() noexcept;

  const std::size_t max_bytes_;
  std::unique_ptr<Arena> arena_;
  mutable std::mutex mu_;
  std::condition_variable returned_;
  Pinner pinner_;
  std::vector<Buffer> buffers_;        // index = buffer id; dropped entries have data == nullptr
  std::vector<std::int32_t> free_;     // ids of allocated, unleased buffers (most recent last)
  std::size_t live_ = 0, bytes_ = 0, peak_bytes_ = 0, leased_ = 0, pinned_bytes_ = 0;
  std::size_t pin_failures_ = 0, allocations_ = 0;
  std::chrono::steady_clock::time_point wait_started_{};
  std::multiset<std::int64_t> waiting_;  // priorities of the acquire() calls waiting now
  std::atomic<std::size_t> n_buffers_{0}, n_bytes_{0}, n_waiting_{0};
};

}  // namespace pyloader
