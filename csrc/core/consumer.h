// consumer.h: Consumer, the one consumer of an Engine: how it waits for a batch, and the guard
// that keeps it to one thread at a time.
//
// Roles
//   consumer thread: takes a Turn (turn()), waits for the next position slice by slice
//                    (Turn::wait_slice) and takes it (Turn::take). Between two slices the caller
//                    does whatever it must not do while blocked: the Python binding takes the GIL
//                    back, checks for signals (Ctrl-C) and releases the GIL again.
//   a second thread: calling turn() while a Turn is live throws ConcurrentConsumerError at once,
//                    in every build. (Without the guard both threads could wait for one position
//                    and both take it: the second take would read a ring slot that is not ready.)
//
// The wait policy, checked after every slice that ends without the position ready, in order:
//   1. the engine stopped (closed from another thread)           -> kStopped
//   2. `timeout` has passed since this wait began                 -> kTimedOut (pending() names
//                                                                    the task)
//   3. a worker has waited `starved_after` for a free buffer (every buffer holds a batch the
//      user still references): once per Consumer                 -> kPoolStarved
//   4. the worker of the position this wait is for has waited for a free buffer for
//      `exhausted_after`, counted within this wait (a release lets it go on, so only a pool whose
//      every buffer the user still holds gets here), after kPoolStarved was reported (the
//      warning comes first), every time                           -> kPoolExhausted
//                                                                    (exhausted_message())
//   5. this wait has lasted `stall_after` (a worker stuck in user code, a stopped worker process):
//      once per position, across waits                            -> kStalled (stall_message())
//   6. otherwise                                                  -> kSlice: call again
// A wait begins at the first wait_slice() after a take (or the Turn's start) and ends at take().
// kPoolExhausted, kStalled and kTimedOut leave the position as it is: the caller decides (the
// Python binding raises PoolExhaustedError, warns, raises TimeoutError) and a later wait goes on
// with the same position. (The Prefetcher abandons a timed-out position by restarting the
// engine; nothing here skips one.) `exhausted_after` and `stall_after` of zero or less: never.
//
// Stall accounting: the time spent in wait_slice() counts as the consumer's stall (the Engine's
// wait_ready); so does the time from a slice's end to resumed() (taking the GIL back) and from
// take() to handed_over() (building the batch the caller returns).
//
// Memory ordering: turn() exchanges busy_ to true with acquire (G1); ~Turn stores false with
// release (G2). G1 pairs with the G2 of the previous Turn, so a Turn on another thread sees all
// that the previous Turn did to the consumer-only state (the Engine's next position, its
// stall figures, warned_). An exchange that finds busy_ already true (re)writes true, which
// changes nothing, and takes no role: the Turn that holds the role still ends with G2.
//
// Lifetime: a Consumer holds its Engine. Whoever may stop the engine from another thread while
// a Turn waits (close()) must leave the Consumer alive until the Turn ends: the binding keeps a
// shared_ptr to it for the length of each call.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>

#include "buffer_pool.h"
#include "config.h"
#include "engine.h"

namespace pyloader {

// A second thread asked for the consumer role while another held it.
class ConcurrentConsumerError : public std::logic_error {
 public:
  using std::logic_error::logic_error;
};

struct ConsumerOptions {
  std::chrono::nanoseconds slice{std::chrono::milliseconds(20)};  // the longest wait_slice()
  std::chrono::nanoseconds starved_after{std::chrono::seconds(2)};
  std::chrono::nanoseconds exhausted_after{0};  // <= 0: never kPoolExhausted
  std::chrono::nanoseconds stall_after{0};      // <= 0: never kStalled
};

enum class WaitOutcome : std::uint8_t {
  kReady,          // the next position can be taken
  kSlice,          // not yet: call wait_slice() again
  kStopped,        // the engine was stopped: it will never be ready
  kTimedOut,       // the wait's timeout passed
  kPoolStarved,    // not yet, and workers starve for buffers (reported once per Consumer)
  kPoolExhausted,  // not yet, and the position's worker has waited exhausted_after for a buffer
  kStalled,        // not yet, after stall_after (reported once per position)
};

class Consumer {
 public:
  Consumer(std::shared_ptr<Engine> engine, std::shared_ptr<BufferPool> pool,
           ConsumerOptions options = {});
  Consumer(const Consumer&) = delete;
  Consumer& operator=(const Consumer&) = delete;

  Engine& engine() const noexcept { return *engine_; }

  // The consumer role, held by one thread from turn() to the Turn's end.
  class Turn {
   public:
    Turn(const Turn&) = delete;
    Turn& operator=(const Turn&) = delete;
    ~Turn();

    std::int64_t next_position() const noexcept { return consumer_.engine_->next_position(); }
    bool ready() noexcept { return consumer_.engine_->ready(); }
    // Waits at most one slice for the next position. Needs no lock of the caller's (the binding
    // calls it with the GIL released). `timeout`: none waits until ready or stopped.
    WaitOutcome wait_slice(std::optional<std::chrono::nanoseconds> timeout) noexcept;
    // The caller is back from what it did after wait_slice() (e.g. took the GIL): counts as stall.
    void resumed() noexcept;
    // The task the current wait is for (what timed out).
    Task pending() const { return consumer_.engine_->task_at(next_position()); }
    Delivery take() noexcept;  // requires ready() or kReady
    // The caller has turned the taken Delivery into its result: counts as stall (with the next
    // batch: take() has already closed this one's figures).
    void handed_over() noexcept;
    // Positions below `position` are published unloaded; the caller still takes them.
    void skip_to(std::int64_t position) noexcept { consumer_.engine_->skip_to(position); }

   private:
    friend class Consumer;
    explicit Turn(Consumer& consumer) noexcept : consumer_(consumer) {}
    static std::int64_t now_ns() noexcept;

    Consumer& consumer_;
    std::int64_t wait_start_ns_ = 0;  // 0: not waiting
    std::int64_t slice_end_ns_ = 0;
    std::int64_t taken_ns_ = 0;
  };

  // Takes the consumer role. Throws ConcurrentConsumerError when another thread holds it.
  Turn turn();

  // What kPoolStarved means, in plain words (the pool's state now), for the caller's warning.
  std::string starvation_message() const;
  // What kPoolExhausted means, in plain words: what the user holds, the bound, how to raise it.
  std::string exhausted_message() const;
  // What kStalled means, in plain words: the position, how long, and what the workers are doing.
  // `timeout_set`: whether the wait had a timeout (else: say how to get one).
  std::string stall_message(bool timeout_set) const;

 private:
  std::shared_ptr<Engine> engine_;
  std::shared_ptr<BufferPool> pool_;
  const ConsumerOptions options_;
  bool warned_ = false;          // consumer-only: kPoolStarved was reported
  std::int64_t starved_ns_ = 0;  // consumer-only: how long workers had waited then
  // Consumer-only: the position of the latest kPoolExhausted / kStalled, and how long then.
  std::int64_t exhausted_position_ = -1;
  std::int64_t exhausted_ns_ = 0;
  std::int64_t stalled_position_ = -1;  // also: kStalled is reported once per position
  std::int64_t stalled_ns_ = 0;
  alignas(kCacheLine) std::atomic<bool> busy_{false};  // G1 / G2
};

}  // namespace pyloader
