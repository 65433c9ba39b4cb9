// ring.h: OrderedRing<T>, the ordered hand-off between loading workers and the consumer.
//
// Roles
//   producers: any number of worker threads. A producer owns a *position* (a ticket) from the
//              moment it claims it until it publishes it.
//   consumer:  one thread at a time. It takes positions strictly in order 0, 1, 2, ...
//
// Turn scheme (after Vyukov's bounded MPMC queue and rigtorp/MPMCQueue). Position p lives in slot
// p % depth on lap p / depth. Each slot has a 32-bit turn word:
//   turn == 2 * lap      the slot is free for the producer of lap `lap`;
//   turn == 2 * lap + 1  the slot holds the value of position p, for the consumer.
// In three steps:
//   1. a producer claims p with one atomic increment of the claim counter (claim/try_claim);
//   2. it waits until turn == 2 * lap(p) (wait_free), loads its batch, stores the value and sets
//      turn = 2 * lap(p) + 1 (publish);
//   3. the consumer of p waits until turn == 2 * lap(p) + 1 (wait_ready), moves the value out and
//      sets turn = 2 * (lap(p) + 1) (take), which frees the slot for position p + depth.
// Hence at most `depth` positions are ever loaded but not consumed, and the order in which
// positions reach the consumer never depends on which producer finished first.
//
// Memory ordering
//   R1 (publish, release) pairs with A1 (ready / wait_ready, acquire): the value written by the
//      producer is visible to the consumer that sees the full turn.
//   R2 (take, release) pairs with A2 (wait_free / try_claim, acquire): the consumer's move out of
//      the slot happens before the next lap's producer writes into it.
//   S1/S2 (seq_cst): a thread about to sleep increments the slot's `waiters` (S1) and re-reads the
//      turn; a thread that changes the turn does so with a seq_cst RMW and then reads `waiters`
//      (S2). In the single total order of seq_cst operations one of the two sees the other, so the
//      waker skips the futex syscall only when nobody can be asleep on that word.
//   The claim counter is only ever changed by atomic RMW and carries no data: it is relaxed. The
//   slot's turn, acquired before the slot is used, orders everything else.
//
// Waiting: nobody spins. Blocked threads sleep on the turn word (wait.h). Turns are kept modulo
// 2^31 (kTurnMask); only equality is ever tested, and a slot's turn moves in single steps, so the
// wrap-around is harmless.
//
// Shutdown: stop() sets kStopBit in every turn word and wakes every sleeper; all waits then return
// false at once. A publish or take racing with stop() keeps the stop bit (both are CAS loops that
// preserve it). Values still in the ring are destroyed by the ring's destructor.
#pragma once

#include <atomic>
#include <cassert>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <thread>
#include <type_traits>

#include "config.h"
#include "wait.h"

namespace pyloader {

template <class T>
class OrderedRing {
  static_assert(
      std::is_nothrow_move_constructible_v<T>,
      "Ring values must be nothrow-movable so that publish and take cannot fail halfway.");

 public:
  static constexpr std::uint32_t kStopBit = 1u << 31;
  static constexpr std::uint32_t kTurnMask = kStopBit - 1;

  explicit OrderedRing(std::size_t depth) : depth_(depth), slots_(new Slot[depth]) {
    if (depth == 0) throw std::invalid_argument("ring depth must be at least 1");
  }
  OrderedRing(const OrderedRing&) = delete;
  OrderedRing& operator=(const OrderedRing&) = delete;

  std::size_t depth() const noexcept { return depth_; }

  // ---- producers ----------------------------------------------------------------------------

  // Step 1: claims the next position unconditionally. The caller must then wait_free() it.
  std::int64_t claim() noexcept { return claim_.fetch_add(1, std::memory_order_relaxed); }

  // Step 1, non-blocking: claims the next position only if it is below `limit` and its slot is
  // already free, so that the caller can load it without waiting.
  bool try_claim(std::int64_t limit, std::int64_t& out) noexcept {
    std::int64_t c = claim_.load(std::memory_order_relaxed);
    while (c < limit) {
      const std::uint32_t t = slot(c).turn.load(std::memory_order_acquire);  // A2
      if (t != free_turn(c)) return false;  // still in use by lap-1 (or stopped)
      if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_relaxed)) {
        out = c;
        return true;
      }
    }
    return false;
  }

  // Step 2: waits until position p's slot is free for its lap. False when stopped.
  bool wait_free(std::int64_t p) noexcept { return wait_turn(p, free_turn(p), kForever); }

  // Step 2, end: stores the value of p and hands it to the consumer.
  void publish(std::int64_t p, T&& value) noexcept {
    Slot& s = slot(p);
    s.value.emplace(std::move(value));
    advance(s, full_turn(p));  // R1
  }

  // ---- consumer -----------------------------------------------------------------------------

  bool ready(std::int64_t p) const noexcept {
    return slot(p).turn.load(std::memory_order_acquire) == full_turn(p);  // A1
  }

  // Waits until p is ready, at most `timeout` (negative: forever). False on timeout or stop.
  bool wait_ready(std::int64_t p, std::chrono::nanoseconds timeout) noexcept {
    return wait_turn(p, full_turn(p), timeout);
  }

  // Step 3: moves the value of p out and frees its slot for position p + depth. Requires ready(p).
  T take(std::int64_t p) noexcept {
    Slot& s = slot(p);
    assert(s.value.has_value());
    T out = std::move(*s.value);
    s.value.reset();
    advance(s, free_turn(p + static_cast<std::int64_t>(depth_)));  // R2
    return out;
  }

  // ---- both ---------------------------------------------------------------------------------

  std::int64_t claimed() const noexcept { return claim_.load(std::memory_order_relaxed); }

  void stop() noexcept {
    stopped_.store(true, std::memory_order_seq_cst);
    for (std::size_t i = 0; i < depth_; ++i) {
      slots_[i].turn.fetch_or(kStopBit, std::memory_order_seq_cst);
      wake_all(slots_[i].turn);
    }
  }
  bool stopped() const noexcept { return stopped_.load(std::memory_order_acquire); }

 private:
  static constexpr std::chrono::nanoseconds kForever{-1};

  struct alignas(kCacheLine) Slot {
    std::atomic<std::uint32_t> turn{0};
    std::atomic<std::uint32_t> waiters{0};
    std::optional<T> value;
  };
  static_assert(
      alignof(Slot) >= kCacheLine,
      "Each ring slot must start on its own cache line so that neighbours never share one.");

  std::uint32_t lap_turn(std::int64_t p) const noexcept {
    return static_cast<std::uint32_t>((static_cast<std::uint64_t>(p) / depth_) * 2u) & kTurnMask;
  }
  std::uint32_t free_turn(std::int64_t p) const noexcept { return lap_turn(p); }
  std::uint32_t full_turn(std::int64_t p) const noexcept { return (lap_turn(p) + 1u) & kTurnMask; }
  Slot& slot(std::int64_t p) const noexcept {
    return slots_[static_cast<std::uint64_t>(p) % depth_];
  }

  // Moves the slot's turn to `next`, keeping the stop bit if stop() set it meanwhile.
  static void advance(Slot& s, std::uint32_t next) noexcept {
    std::uint32_t cur = s.turn.load(std::memory_order_relaxed);
    while (!s.turn.compare_exchange_weak(cur, (cur & kStopBit) | next,
                                         std::memory_order_seq_cst,  // R1 / R2, and S2
                                         std::memory_order_relaxed)) {
    }
    if (s.waiters.load(std::memory_order_seq_cst) != 0) wake_all(s.turn);  // S2
  }

  bool wait_turn(std::int64_t p, std::uint32_t want, std::chrono::nanoseconds timeout) noexcept {
    Slot& s = slot(p);
    const bool forever = timeout.count() < 0;
    const auto deadline = std::chrono::steady_clock::now() + (forever ? timeout.zero() : timeout);
    for (;;) {
      std::uint32_t t = s.turn.load(std::memory_order_acquire);  // A1 / A2
      if (t == want) return true;
      if (t & kStopBit) return false;
      std::chrono::nanoseconds left{-1};
      if (!forever) {
        left = deadline - std::chrono::steady_clock::now();
        if (left.count() <= 0) return false;
      }
      s.waiters.fetch_add(1, std::memory_order_seq_cst);  // S1
      t = s.turn.load(std::memory_order_seq_cst);         // S1
      if (t != want && !(t & kStopBit)) wait_for_change(s.turn, t, left);
      s.waiters.fetch_sub(1, std::memory_order_relaxed);
    }
  }

  const std::size_t depth_;
  std::unique_ptr<Slot[]> slots_;
  alignas(kCacheLine) std::atomic<std::int64_t> claim_{0};
  alignas(kCacheLine) std::atomic<bool> stopped_{false};
};

}  // namespace pyloader
