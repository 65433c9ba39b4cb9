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
// Waiting. A waiter's condition has inputs under mu_ (free buffers, bytes, the queue of waiters)
// and inputs outside it (the caller's cancel flag and whatever may_exceed reads, e.g. the
// engine's consumer position). A waiter sleeps on the pool's wake word changed_ (wait.h), with
// no timeout, in three steps:
//   1. it registers in n_waiting_, then loads changed_ (B2), and only then checks its condition,
//      under mu_ (a buffer that fits, room to grow, its turn, cancel, may_exceed). (The first
//      failed check registers and goes round again: the load before a sleep follows the
//      registration.)
//   2. if it must wait, it releases mu_ and sleeps while changed_ still holds what it loaded;
//   3. whoever changes an input of the condition afterwards bumps changed_ and then wakes the
//      sleepers if n_waiting_ says there may be any (B1, notify()): the pool itself whenever a
//      call leaves a change under mu_ while someone waits (a release, a waiter leaving the
//      queue, growth or drops, an allocation undone); the owner, through wake_all(), after
//      setting a cancel flag or changing what a may_exceed reads.
// B1 pairs with B2: all four operations are seq_cst, so in their single total order the two
// sides cannot both miss each other. Either the waiter's load of changed_ follows the bump (then,
// the bump being a release, the waiter's check sees the change), or the notifier's read of
// n_waiting_ follows the registration (then it wakes the word; a waiter asleep wakes, and one not
// yet asleep returns at once from its sleep, as the kernel compares the word with the value
// loaded before the check). No change is missed, so nothing needs a timeout: a lost wake-up
// would show as a hang, which tests catch, not as the silent 100 ms stall of a re-check timer.
// (changed_ wraps after 2^32 bumps; a waiter would have to sleep through exactly that many
// between its load and its sleep to miss one.)
//
// Shutdown: acquire() takes a cancel flag; after setting it, call wake_all() and every waiter
// returns an empty lease at once.
//
// Faulting in ahead of need (reserve): a fresh pool maps and first-touches each buffer while the
// first batches are filled, which makes a first epoch slower than the rest. reserve() makes the
// buffers of the first batches ahead (from a thread of the owner's, before or while loading
// starts) and touches every page of them, returning each to the free list as soon as it is
// touched: workers that start meanwhile lease the ones made so far, which take no page fault,
// and make their own only when none is free. It counts the buffers that fit, leased or free
// (whoever made them), and makes new ones until there are `count`, within the pool's bound; it
// stops early once the pool is closed or stop_reserving() was called. (A buffer a worker is
// mapping at that moment is not counted yet: one more may be made.) Faulting in from one thread
// while the workers fill buffers slows them (a thread more on the CPUs, and the address space's
// lock): the owner stops it when loading starts, and the workers make what it did not.
//
// Fork (fork.h): in a forked child the pool is a copy whose mu_ may be held by a parent's thread
// that is not there and whose arena is the parent's: release() and the destructor do nothing.
#pragma once

#include <atomic>
#include <chrono>
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
#include "config.h"
#include "fork.h"
#include "pin.h"
#include "wait.h"

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
  std::size_t buffers = 0;  // buffers allocated now
  std::size_t leased = 0;   // of which in use (loading, in flight, or held by the user)
  std::size_t bytes = 0;    // bytes allocated now
  std::size_t peak_bytes = 0;
  std::size_t max_bytes = 0;
  std::size_t pinned_bytes = 0;  // bytes allocated now that are pinned
  std::size_t pin_failures = 0;
  std::size_t allocations = 0;  // mmap calls so far (steady state: no new ones)
  std::string pin_method;       // "cuda", "mlock" or "none"
  std::string pin_reason;
  std::string pin_error;  // the last pinning failure, if any
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
  // hold buffers, which they could only release after it (waiting would deadlock). Whoever
  // changes what may_exceed reads must then call wake_all() (see Waiting above).
  BufferLease acquire(std::size_t bytes, const std::atomic<bool>& cancel,
                      std::int64_t priority = std::numeric_limits<std::int64_t>::max(),
                      const std::function<bool()>* may_exceed = nullptr);
  // Makes sure the pool holds `count` buffers of at least `bytes` bytes with every page touched
  // (see "Faulting in ahead of need"); returns how many it made (none when there are `count`
  // already; fewer at the bound, or once closed). Never waits for a buffer.
  std::size_t reserve(std::size_t count, std::size_t bytes);
  // Makes a reserve() running now (or later) return after the buffer it is touching.
  void stop_reserving() noexcept { stop_reserve_.store(true, std::memory_order_release); }
  // A buffer now, or an empty lease if getting one would mean waiting (or the OS refuses memory).
  BufferLease try_acquire(std::size_t bytes,
                          std::int64_t priority = std::numeric_limits<std::int64_t>::max());
  // Makes every waiting acquire() re-check its condition (B1). Call it after setting a cancel
  // flag, and after changing anything that a may_exceed reads. Lock-free; makes no syscall when
  // nobody waits.
  void wake_all() noexcept { notify(); }
  // The owner is done with the pool: the free buffers' memory goes back to the OS now, and each
  // leased buffer's when its lease returns (a user may keep batches long after the loader is
  // closed). The pool stays usable: a later acquire() maps a new buffer, dropped on release.
  void close() noexcept;
  PoolInfo info() const;
  // The shared arena, or null for a pool of private buffers.
  Arena* arena() const noexcept { return arena_.get(); }
  // How long the longest current acquire() has been waiting for a free buffer (zero if none is).
  std::chrono::nanoseconds waiting_for() const;
  // Cheap counters for per-batch statistics (relaxed reads of values written under the mutex).
  std::size_t buffers_now() const noexcept { return n_buffers_.load(std::memory_order_relaxed); }
  std::size_t bytes_now() const noexcept { return n_bytes_.load(std::memory_order_relaxed); }
  // For tests: `hook(priority)` runs in every acquire() that is about to sleep, right after the
  // check that made it wait, before mu_ is released and the thread sleeps: the window in which a
  // change would be lost if the protocol (Waiting, above) were wrong. It runs under mu_: it may
  // change a cancel flag or what may_exceed reads and call wake_all(), but must not wait for
  // anything that takes the pool's lock (a release). Set it before the pool is shared.
  void set_before_sleep_hook(std::function<void(std::int64_t)> hook) {
    before_sleep_ = std::move(hook);
  }

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
  std::int32_t take_free_locked(std::size_t need);      // a free buffer that fits, or -1
  bool can_grow_locked(std::size_t need, bool urgent);  // may a new buffer of `need` bytes be made?
  void leave_queue_locked(std::int64_t priority);
  void drop_locked(std::int32_t id) noexcept;  // unmaps a free buffer
  void publish_counts_locked() noexcept;
  void notify() noexcept;  // B1: bumps changed_, wakes its sleepers if any waiter is registered

  const std::size_t max_bytes_;
  std::unique_ptr<Arena> arena_;
  const OwnerProcess owner_;
  mutable std::mutex mu_;
  Pinner pinner_;
  std::vector<Buffer> buffers_;     // index = buffer id; dropped entries have data == nullptr
  std::vector<std::int32_t> free_;  // ids of allocated, unleased buffers (most recent last)
  bool closed_ = false;             // under mu_: close() was called, released buffers are dropped
  // stop_reserving() was called: read by reserve() between buffers (release/acquire: a flag, it
  // orders nothing else).
  std::atomic<bool> stop_reserve_{false};
  std::size_t live_ = 0, bytes_ = 0, peak_bytes_ = 0, leased_ = 0, pinned_bytes_ = 0;
  std::size_t pin_failures_ = 0, allocations_ = 0;
  std::chrono::steady_clock::time_point wait_started_{};
  std::multiset<std::int64_t> waiting_;             // priorities of the acquire() calls waiting now
  std::function<void(std::int64_t)> before_sleep_;  // tests only
  std::atomic<std::size_t> n_buffers_{0}, n_bytes_{0};
  // The wake word and the waiter count (B1 / B2). n_waiting_ is written under mu_ (as
  // waiting_.size()), read by notify() without it.
  alignas(kCacheLine) std::atomic<std::uint32_t> changed_{0};
  std::atomic<std::size_t> n_waiting_{0};
};

}  // namespace pyloader
