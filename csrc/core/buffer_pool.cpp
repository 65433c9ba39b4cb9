#include "buffer_pool.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <new>

namespace pyloader {

namespace {
std::size_t page_size() {
  static const std::size_t size = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  return size;
}
std::size_t round_to_pages(std::size_t bytes) {
  const std::size_t page = page_size();
  return std::max<std::size_t>(page, (bytes + page - 1) / page * page);
}
constexpr std::size_t kHugePage = std::size_t{2} << 20;

// Anonymous memory for one buffer. A large one starts on a 2 MiB boundary and asks for
// transparent huge pages, so that filling it takes a few page faults instead of one per 4 KiB.
void* map_buffer(std::size_t bytes) {
  const int prot = PROT_READ | PROT_WRITE;
  const int flags = MAP_PRIVATE | MAP_ANONYMOUS;
  if (bytes < kHugePage) return mmap(nullptr, bytes, prot, flags, -1, 0);
  void* raw = mmap(nullptr, bytes + kHugePage, prot, flags, -1, 0);
  if (raw == MAP_FAILED) return raw;
  const auto start = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = (start + kHugePage - 1) & ~(kHugePage - 1);
  if (aligned > start) munmap(raw, aligned - start);
  const std::uintptr_t end = start + bytes + kHugePage;
  if (end > aligned + bytes)
    munmap(reinterpret_cast<void*>(aligned + bytes), end - (aligned + bytes));
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), bytes, MADV_HUGEPAGE);  // a hint: failure is harmless
#endif
  return reinterpret_cast<void*>(aligned);
}
}  // namespace

BufferLease& BufferLease::operator=(BufferLease&& o) noexcept {
  if (this != &o) {
    reset();
    pool_ = std::move(o.pool_);
    id_ = o.id_;
    data_ = o.data_;
    capacity_ = o.capacity_;
    o.id_ = -1;
    o.data_ = nullptr;
    o.capacity_ = 0;
  }
  return *this;
}

void BufferLease::reset() noexcept {
  if (pool_ && id_ >= 0) pool_->release(id_);
  pool_.reset();
  id_ = -1;
  data_ = nullptr;
  capacity_ = 0;
}

std::shared_ptr<BufferPool> BufferPool::create(std::size_t max_bytes, PinRequest pin,
                                               std::size_t arena_bytes) {
  return std::shared_ptr<BufferPool>(new BufferPool(max_bytes, pin, arena_bytes));
}

BufferPool::BufferPool(std::size_t max_bytes, PinRequest pin, std::size_t arena_bytes)
    : max_bytes_(max_bytes),
      arena_(arena_bytes > 0 ? Arena::create(round_to_pages(arena_bytes)) : nullptr),
      pinner_(pin) {}

// Without mu_ (the arena has its own lock).
void* BufferPool::map_memory(std::size_t bytes) {
  if (!arena_) {
    void* p = map_buffer(bytes);
    return p == MAP_FAILED ? nullptr : p;
  }
  return arena_->allocate(bytes, bytes >= kHugePage ? kHugePage : page_size());
}

void BufferPool::unmap(void* p, std::size_t bytes) noexcept {
  if (arena_) {
    arena_->free(static_cast<std::byte*>(p), bytes);
  } else {
    munmap(p, bytes);
  }
}

BufferPool::~BufferPool() {
  if (!owner_.here()) return;  // a forked child's copy: see release()
  // No lease can be alive: each holds a shared_ptr to the pool.
  for (std::size_t id = 0; id < buffers_.size(); ++id) {
    if (buffers_[id].data) drop_locked(static_cast<std::int32_t>(id));
  }
}

BufferLease BufferPool::acquire(std::size_t bytes, const std::atomic<bool>& cancel,
                                std::int64_t priority, const std::function<bool()>* may_exceed) {
  const std::size_t need = round_to_pages(bytes);
  std::unique_lock lock(mu_);
  bool queued = false;
  for (;;) {
    // B2: loaded before the check below, so that a change after the check stops the sleep.
    const std::uint32_t seen = changed_.load(std::memory_order_seq_cst);
    // While anyone waits, an earlier priority goes first.
    if (waiting_.empty() || *waiting_.begin() >= priority) {
      const std::int32_t found = take_free_locked(need);
      if (found >= 0 || can_grow_locked(need, may_exceed && (*may_exceed)())) {
        if (queued) leave_queue_locked(priority);
        if (!waiting_.empty()) notify();  // the next in line may go now (or use what we dropped)
        return found >= 0 ? lease_locked(found) : allocate_unlocked(lock, need);
      }
    }
    // At the bound with every buffer leased, or behind an earlier waiter: wait.
    if (!queued) {
      queued = true;
      if (waiting_.empty()) wait_started_ = std::chrono::steady_clock::now();
      waiting_.insert(priority);
      n_waiting_.store(waiting_.size(), std::memory_order_seq_cst);  // B2: registered, then...
      continue;  // ... load changed_ again and re-check: only then may this thread sleep
    }
    if (cancel.load(std::memory_order_acquire)) break;
    if (before_sleep_) before_sleep_(priority);
    lock.unlock();
    wait_for_change(changed_, seen, std::chrono::nanoseconds(-1));  // B2: returns if changed_ moved
    lock.lock();
    if (cancel.load(std::memory_order_acquire)) break;
  }
  if (queued) leave_queue_locked(priority);
  if (!waiting_.empty()) notify();
  return {};
}

BufferLease BufferPool::try_acquire(std::size_t bytes, std::int64_t priority) {
  const std::size_t need = round_to_pages(bytes);
  std::unique_lock lock(mu_);
  if (!waiting_.empty() && *waiting_.begin() < priority) return {};
  const std::int32_t found = take_free_locked(need);
  if (found >= 0) return lease_locked(found);
  const std::size_t had = bytes_;
  const bool grow = can_grow_locked(need, false);
  if (bytes_ != had && !waiting_.empty()) notify();  // it dropped free buffers: room for a waiter
  if (!grow) return {};
  try {
    return allocate_unlocked(lock, need);
  } catch (const std::bad_alloc&) {
    return {};  // the caller falls back to acquire(), which reports it
  }
}

std::size_t BufferPool::reserve(std::size_t count, std::size_t bytes) {
  const std::size_t need = round_to_pages(bytes);
  std::size_t made = 0;
  while (!stop_reserve_.load(std::memory_order_acquire)) {
    BufferLease lease;
    {
      std::unique_lock lock(mu_);
      if (closed_) break;
      std::size_t fit = 0;
      for (const Buffer& b : buffers_) fit += b.capacity >= need ? 1 : 0;
      // Within the bound, and never by dropping free buffers (they fit: can_grow_locked would).
      if (fit >= count || bytes_ + need > max_bytes_) break;
      try {
        lease = allocate_unlocked(lock, need);  // a new buffer: never one a worker freed
      } catch (const std::bad_alloc&) {
        break;
      }
    }
    // One write per page faults it in (a huge page's first write faults in all of it).
    volatile std::byte* const bytes_of = lease.data();
    for (std::size_t at = 0; at < lease.capacity(); at += page_size()) bytes_of[at] = std::byte{0};
    ++made;
  }  // each lease returns its buffer to the free list at the end of its turn
  return made;
}

std::int32_t BufferPool::take_free_locked(std::size_t need) {
  std::int32_t found = -1;
  std::size_t found_at = 0;
  for (std::size_t i = free_.size(); i-- > 0;) {  // the smallest free buffer that fits
    const Buffer& b = buffers_[free_[i]];
    if (b.capacity >= need && (found < 0 || b.capacity < buffers_[found].capacity)) {
      found = free_[i];
      found_at = i;
    }
  }
  if (found >= 0) free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(found_at));
  return found;
}

bool BufferPool::can_grow_locked(std::size_t need, bool urgent) {
  if (urgent) return true;  // the consumer needs this one next: waiting could never end
  // Drop free (too small) buffers while that is what keeps the pool under its bound.
  while (bytes_ + need > max_bytes_ && !free_.empty()) {
    drop_locked(free_.front());
    free_.erase(free_.begin());
  }
  // With nothing leased, waiting could never end: grow past the bound instead.
  return bytes_ + need <= max_bytes_ || leased_ == 0;
}

void BufferPool::leave_queue_locked(std::int64_t priority) {
  waiting_.erase(waiting_.find(priority));
  n_waiting_.store(waiting_.size(), std::memory_order_seq_cst);  // as the registration (B2)
  if (waiting_.empty()) wait_started_ = {};
}

// B1: the change that the caller made before this call is seen by every waiter's next check.
void BufferPool::notify() noexcept {
  changed_.fetch_add(1, std::memory_order_seq_cst);                                   // B1
  if (n_waiting_.load(std::memory_order_seq_cst) != 0) pyloader::wake_all(changed_);  // B1
}

void BufferPool::release(std::int32_t id) noexcept {
  // A forked child's copy of the pool (a batch taken before the fork, dropped in the child): mu_
  // may be held by a parent's thread that is not here, and the memory may be the parent's
  // (fork.h). The copy is never used again: leave it as it is.
  if (!owner_.here()) return;
  {
    std::lock_guard lock(mu_);
    Buffer& b = buffers_[id];
    b.leased = false;
    --leased_;
    if (closed_) {
      drop_locked(id);
    } else {
      free_.push_back(id);
    }
    publish_counts_locked();
    // A waiter that registers after this sees the free buffer in its check, under mu_.
    if (waiting_.empty()) return;
  }
  notify();
}

BufferLease BufferPool::lease_locked(std::int32_t id) {
  Buffer& b = buffers_[id];
  b.leased = true;
  ++leased_;
  publish_counts_locked();
  BufferLease lease;
  lease.pool_ = shared_from_this();
  lease.id_ = id;
  lease.data_ = b.data;
  lease.capacity_ = b.capacity;
  return lease;
}

BufferLease BufferPool::allocate_unlocked(std::unique_lock<std::mutex>& lock, std::size_t bytes) {
  // Reserve the bytes first, so that concurrent acquirers respect the bound meanwhile; mapping
  // and pinning (page faults, syscalls) then run without the lock.
  bytes_ += bytes;
  ++leased_;
  lock.unlock();
  void* p = map_memory(bytes);
  const bool pinned = p != nullptr && pinner_.pin(p, bytes);
  lock.lock();
  bytes_ -= bytes;
  --leased_;
  if (p == nullptr) {
    publish_counts_locked();
    if (!waiting_.empty()) notify();  // the reservation is undone: room for a waiter, maybe
    throw std::bad_alloc();
  }
  ++allocations_;
  Buffer b;
  b.data = static_cast<std::byte*>(p);
  b.capacity = bytes;
  b.pinned = pinned;
  if (pinned) {
    pinned_bytes_ += bytes;
  } else if (pinner_.method() != PinMethod::kNone) {
    ++pin_failures_;
  }
  bytes_ += bytes;
  ++live_;
  peak_bytes_ = std::max(peak_bytes_, bytes_);
  std::int32_t id;
  auto slot =
      std::find_if(buffers_.begin(), buffers_.end(), [](const Buffer& x) { return !x.data; });
  if (slot != buffers_.end()) {
    *slot = b;
    id = static_cast<std::int32_t>(slot - buffers_.begin());
  } else {
    try {
      buffers_.push_back(b);
    } catch (...) {  // give the mapping back rather than leak it
      if (pinned) pinner_.unpin(p, bytes);
      unmap(p, bytes);
      if (pinned) pinned_bytes_ -= bytes;
      bytes_ -= bytes;
      --live_;
      if (!waiting_.empty()) notify();
      throw;
    }
    id = static_cast<std::int32_t>(buffers_.size() - 1);
  }
  return lease_locked(id);
}

void BufferPool::close() noexcept {
  {
    std::lock_guard lock(mu_);
    closed_ = true;
    for (const std::int32_t id : free_) drop_locked(id);
    free_.clear();
    publish_counts_locked();
    if (waiting_.empty()) return;
  }
  notify();
}

void BufferPool::drop_locked(std::int32_t id) noexcept {
  Buffer& b = buffers_[id];
  if (b.pinned) {
    pinner_.unpin(b.data, b.capacity);
    pinned_bytes_ -= b.capacity;
  }
  unmap(b.data, b.capacity);
  bytes_ -= b.capacity;
  --live_;
  b = Buffer{};
}

void BufferPool::publish_counts_locked() noexcept {
  n_buffers_.store(live_, std::memory_order_relaxed);
  n_bytes_.store(bytes_, std::memory_order_relaxed);
}

PoolInfo BufferPool::info() const {
  std::lock_guard lock(mu_);
  PoolInfo i;
  i.buffers = live_;
  i.leased = leased_;
  i.bytes = bytes_;
  i.peak_bytes = peak_bytes_;
  i.max_bytes = max_bytes_;
  i.pinned_bytes = pinned_bytes_;
  i.pin_failures = pin_failures_;
  i.allocations = allocations_;
  i.pin_method = pin_method_name(pinner_.method());
  i.pin_reason = pinner_.reason();
  i.pin_error = pinner_.last_error();
  return i;
}

std::chrono::nanoseconds BufferPool::waiting_for() const {
  std::lock_guard lock(mu_);
  if (waiting_.empty()) return std::chrono::nanoseconds::zero();
  return std::chrono::steady_clock::now() - wait_started_;
}

}  // namespace pyloader
