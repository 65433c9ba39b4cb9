// engine.h: Engine, the scheduler that loads planned positions ahead of one consumer.
//
// Roles
//   planner:   the owner appends epoch *segments* (append): each is a run of consecutive positions
//              with the Sequence index each one loads. Positions are global and never reused, so
//              loading runs across epoch boundaries without a bubble.
//   workers:   `workers` native threads. Each claims the next position from the ring, waits until
//              it is loadable (planned, its epoch gate open, its ring slot free), has the Loader
//              load it, fills a leased buffer and publishes it (ring.h). A Loader that asks for
//              round_robin() has worker w load positions w, w + workers, ... instead of claiming.
//   consumer:  one thread at a time calls ready/wait_ready/take, which deliver positions strictly
//              in order. Consumer (consumer.h) guards that role in every build; the Engine checks
//              it again in debug builds.
//
// Runs: the Loader (loader.h) loads in two phases, prepare() between enter() and leave() and
// fill() outside them. A worker that has entered keeps preparing further positions that are ready
// to load, while each takes less than `run_budget` in total, so that cheap batches pay for one
// enter/leave (one GIL hand-off) together. A prepared batch that is cheap to hand over (at most
// kEarlyPublishBytes, a buffer free at once) is published right away, inside the run, so that it
// never waits for the load of the next position, which may be slow. (Its fill then runs between
// enter() and leave(); the copy is small.)
//
// Epoch gates: when the Loader has an epoch_end() hook, the positions of epoch e+1 become
// loadable only once every position of epoch e has been loaded and the hook has run. The hook
// runs on the worker that loads the last position of the epoch, before it publishes it: so the
// consumer, having taken every position of e, knows the hook has run (and can ask for its error).
//
// Memory ordering: open_end_ (positions below it are loadable) is stored with release and then
// plan_word_ is bumped (release) and woken (P1); a waiting worker loads plan_word_ (acquire) before
// it loads open_end_ (acquire) (P2), so by wait.h's protocol no wake-up is lost. The ring orders
// every hand-off of a Delivery (R1/A1 in ring.h); the epoch hook's result is written under
// plan_mu_ before the publish that the consumer acquires.
//
// Shutdown: stop() sets the stop flag, stops the ring, sets the stop bit of plan_word_ and wakes
// the pool: every blocked worker returns at once; a worker inside the Loader returns after the
// call in progress (the Loader's interrupt() cuts short a call that waits on another process).
// join() waits for the workers (detaches them if called from one of them). Each
// worker holds a shared_ptr to the engine, so the owner must call stop() and join(): dropping the
// last outside reference alone leaves the workers running. The destructor (which runs once the
// workers have ended) calls both again, harmlessly.
//
// Buffers: a worker's acquire passes its position as priority. The position the consumer needs
// next may grow the pool past its bound while later positions hold buffers (in_flight_buffers_):
// they are released only after it is consumed, so waiting would deadlock. When every buffer is
// held by batches the user keeps, it waits (and the binding warns). Both inputs of that rule
// wake the pool's waiters when they change (buffer_pool.h, B1/B2): take() when the consumer
// advances, and the first buffer a later position leases (in_flight_buffers_ from 0 to 1). So
// the pool exceeds its bound by at most `depth` buffers.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "config.h"
#include "loader.h"
#include "ring.h"
#include "thread_pool.h"

namespace pyloader {

struct EngineOptions {
  int workers = 1;
  std::size_t depth = 2;
  std::chrono::nanoseconds run_budget{std::chrono::microseconds(200)};
  std::size_t max_run = 64;
};

// An appended epoch segment: positions [start, end) load epoch `epoch`.
struct SegmentSpan {
  std::int64_t epoch = -1;
  std::int64_t start = 0;
  std::int64_t end = 0;
};

// Per-epoch figures, kept by the consumer's calls.
struct EpochStats {
  std::int64_t epoch = -1;
  std::int64_t batches = 0;
  std::vector<std::uint32_t> load_us;  // per batch, in delivery order
  std::int64_t wait_ns = 0;            // consumer time spent waiting for batches
  std::int64_t first_ns = 0;           // steady clock: the consumer first asked for a batch
  std::int64_t last_ns = 0;            // steady clock: the consumer took the latest batch
  std::int64_t busy_first_ns = 0;      // sum of worker busy time at first_ns / last_ns
  std::int64_t busy_last_ns = 0;
  std::int64_t peak_in_flight = 0;  // most batches loaded and not yet taken
  std::size_t pool_buffers = 0;     // buffer pool size at the latest batch
  std::size_t pool_bytes = 0;
};

class Engine : public std::enable_shared_from_this<Engine> {
 public:
  static std::shared_ptr<Engine> create(const EngineOptions& options,
                                        std::shared_ptr<BufferPool> pool,
                                        std::shared_ptr<Loader> loader);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  void start();
  int workers() const noexcept { return options_.workers; }
  std::size_t depth() const noexcept { return options_.depth; }

  // ---- planner ----
  // Appends the next epoch's positions. `gated`: its positions wait for the previous segment's
  // epoch_end() hook (only meaningful when the Loader has one).
  void append(std::int64_t epoch, std::vector<std::int64_t> indices, bool gated);
  std::int64_t planned_end() const;
  Task task_at(std::int64_t position) const;  // position -1 when not planned
  std::vector<SegmentSpan> segments() const;  // every appended segment, in position order

  // ---- consumer ----
  std::int64_t next_position() const noexcept { return next_; }
  bool ready() noexcept;  // is the next position ready to take?
  // Waits at most `timeout` for the next position. False on timeout or stop. The time waited
  // counts as the consumer's stall in stats().
  bool wait_ready(std::chrono::nanoseconds timeout) noexcept;
  // More stall time, spent outside wait_ready() (e.g. taking the GIL back after it).
  void add_wait(std::int64_t ns) noexcept { pending_wait_ns_ += ns; }
  Delivery take() noexcept;  // requires ready()
  // Positions below `position` are published unloaded (skipped) by the workers.
  void skip_to(std::int64_t position) noexcept;
  // The error raised by the epoch_end() hook of `epoch`, once (null if none).
  std::unique_ptr<Payload> take_epoch_error(std::int64_t epoch);
  std::vector<EpochStats> stats() const;
  std::int64_t worker_busy_ns() const noexcept;

  // ---- shutdown ----
  void stop() noexcept;
  void join() noexcept;
  bool stopping() const noexcept { return stopping_.load(std::memory_order_acquire); }
  bool on_worker_thread() const noexcept { return threads_.is_member(); }

 private:
  Engine(const EngineOptions& options, std::shared_ptr<BufferPool> pool,
         std::shared_ptr<Loader> loader);

  struct Segment {
    std::int64_t epoch = 0;
    std::int64_t start = 0;
    std::vector<std::int64_t> indices;
    bool gated = false;
    std::atomic<std::int64_t> remaining{0};  // positions not yet loaded
    bool hook_done = false;                  // under plan_mu_
    std::unique_ptr<Payload> hook_error;     // under plan_mu_
    std::int64_t end() const noexcept { return start + static_cast<std::int64_t>(indices.size()); }
  };
  struct Job {
    Prepared prep;
    Segment* segment = nullptr;
    bool skip = false;
    std::int64_t load_ns = 0;
  };
  struct alignas(kCacheLine) PaddedCounter {
    std::atomic<std::int64_t> value{0};
  };
  static_assert(sizeof(PaddedCounter) == kCacheLine,
                "Each worker's busy counter must fill exactly one cache line of its own.");

  void worker_main(int worker);
  bool wait_loadable(std::int64_t position) noexcept;
  Segment* segment_of(std::int64_t position, Segment* cached) const;
  bool deliver(int worker, Job& job);
  // Publishes a prepared job now if that needs no wait; false leaves it for deliver().
  // *deferred receives a job whose epoch hook must first run (outside enter()/leave()).
  bool publish_early(int worker, Job& job, std::vector<std::pair<Delivery, Segment*>>& deferred);
  Delivery fill_delivery(int worker, Job& job, BufferLease buffer);
  // Counts a position of `segment` as loaded; true for the last one (its epoch hook must run).
  bool count_finished(Segment* segment);
  void run_epoch_hook(int worker, Segment* segment);
  void publish(Delivery d);
  void recompute_open_locked();
  void bump_plan_word() noexcept;

  const EngineOptions options_;
  std::shared_ptr<BufferPool> pool_;
  std::shared_ptr<Loader> loader_;
  OrderedRing<Delivery> ring_;
  ThreadPool threads_;
  std::unique_ptr<PaddedCounter[]> busy_ns_;  // one per worker, written only by its worker

  mutable std::mutex plan_mu_;
  std::vector<std::unique_ptr<Segment>> segments_;  // under plan_mu_, in position order
  std::size_t open_segments_ = 0;                   // under plan_mu_: segments [0, n) are open

  static constexpr std::uint32_t kStopBit = 1u << 31;
  alignas(kCacheLine) std::atomic<std::int64_t> open_end_{0};    // P1 / P2
  alignas(kCacheLine) std::atomic<std::uint32_t> plan_word_{0};  // P1 / P2
  alignas(kCacheLine) std::atomic<std::int64_t> skip_before_{0};
  alignas(kCacheLine) std::atomic<std::int64_t> published_{0};
  alignas(kCacheLine) std::atomic<bool> stopping_{false};

  alignas(kCacheLine) std::atomic<std::int64_t> consumer_next_{0};      // next_, for workers (U1)
  alignas(kCacheLine) std::atomic<std::int64_t> in_flight_buffers_{0};  // leased, not yet taken

  // Consumer-only state.
  alignas(kCacheLine) std::int64_t next_ = 0;
  std::int64_t asked_ns_ = 0;
  std::int64_t pending_wait_ns_ = 0;
  mutable std::mutex stats_mu_;  // stats() may be called from any thread
  std::vector<EpochStats> stats_;
#ifndef NDEBUG
  std::atomic<bool> consumer_busy_{false};  // fires when two threads take the consumer role
#endif
};

}  // namespace pyloader
