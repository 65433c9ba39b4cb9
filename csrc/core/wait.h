// wait.h: sleep on a 32-bit atomic word until it changes (futex), with a timeout.
//
// Every blocking wait in the core goes through wait_for_change(): a thread that has nothing to do
// sleeps in the kernel instead of spinning. The protocol is the usual futex one:
//   1. the waiter loads the word (acquire) and checks its condition;
//   2. if the condition is false it calls wait_for_change(word, seen): the kernel re-checks
//      `word == seen` atomically with going to sleep, so a change made between 1 and 2 is never
//      lost (the call returns at once);
//   3. whoever makes the condition true changes the word (release) and calls wake_all(word).
// Wake-ups may be spurious; callers always loop and re-check.
//
// On Linux this is the futex syscall. Elsewhere a short sleep stands in (correct, less prompt).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <climits>
#include <ctime>
#else
#include <thread>
#endif

namespace pyloader {

static_assert(sizeof(std::atomic<std::uint32_t>) == sizeof(std::uint32_t),
              "A futex word must be a plain 32-bit integer in memory.");
static_assert(std::atomic<std::uint32_t>::is_always_lock_free,
              "A futex word must be lock-free so that the kernel can read it.");

// Sleeps while `word == seen`, at most `timeout` (a negative timeout means forever).
inline void wait_for_change(const std::atomic<std::uint32_t>& word, std::uint32_t seen,
                            std::chrono::nanoseconds timeout) noexcept {
#if defined(__linux__)
  timespec ts{};
  timespec* tsp = nullptr;
  if (timeout.count() >= 0) {
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1'000'000'000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1'000'000'000);
    tsp = &ts;
  }
  // The kernel compares *word with seen under its own lock: no lost wake-up (step 2 above).
  syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), FUTEX_WAIT_PRIVATE, seen, tsp,
          nullptr, 0);
#else
  if (word.load(std::memory_order_acquire) != seen) return;
  auto nap = std::chrono::microseconds(50);
  std::this_thread::sleep_for(timeout.count() >= 0 && timeout < nap ? timeout : nap);
#endif
}

// Wakes every thread sleeping in wait_for_change() on `word`.
inline void wake_all(const std::atomic<std::uint32_t>& word) noexcept {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<const std::uint32_t*>(&word), FUTEX_WAKE_PRIVATE, INT_MAX,
          nullptr, nullptr, 0);
#else
  (void)word;
#endif
}

}  // namespace pyloader
