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
// After stop() no epoch hook runs, so a worker that returns from user code late runs no more of it.
// join() waits for the workers (detaches them if called from one of them). join_for(grace) waits
// at most `grace` and then abandons (detaches) the workers still running - in practice, workers
// stuck inside a Loader call that never returns (user code: a __getitem__ blocked forever) - and
// returns what each of them was doing, for the owner to report. Each worker holds a shared_ptr
// to the engine, so an abandoned worker stays memory-safe: when its call returns it sees the
// stop, drops what it holds and ends, and the last reference it drops destroys the engine (and
// the Loader) on its thread. Because of that reference the owner must call stop() and join() (or
// join_for()): dropping the last outside reference alone leaves the workers running. The
// destructor (which runs once the workers have ended) calls both again, harmlessly.
//
// Activity: each worker records what it is doing (WorkerActivity: loading a position, waiting
// for a buffer for it, filling it, running an epoch hook) and since when, in a slot of its own
// under that slot's mutex (written by its worker a few times per batch, read only by diagnostics:
// the consumer's stall warning and join_for()'s report). activity() reads every slot.
//
// Re-planning: replan() replaces the indices of the last segment while its gate is still shut
// (gated, the previous segment's hook not yet done). No worker can have looked such a segment up:
// a worker looks up a position only once it is below open_end_, and the consumer's task_at() reads
// under plan_mu_; so the segment may change size. The owner calls it from inside the previous
// epoch's hook (which runs before the gate opens), to plan the next epoch with what the hook left
// (the Sequence's length).
//
// Memory in long runs: append() drops the segments that end before the consumer's position
// (NOTE [ Engine prunes segments behind the consumer ]), and stats() keeps `stats_window`
// epochs in detail and merges older ones into one record; a batch's load time goes into a
// fixed-size histogram (histogram.h). So neither grows with the number of epochs or batches.
//
// Buffers: a worker's acquire passes its position as priority. The position the consumer needs
// next may grow the pool past its bound while later positions hold buffers (in_flight_buffers_):
// they are released only after it is consumed, so waiting would deadlock. When every buffer is
// held by batches the user keeps, it waits (and the binding warns). Both inputs of that rule
// wake the pool's waiters when they change (buffer_pool.h, B1/B2): take() when the consumer
// advances, and the first buffer a later position leases (in_flight_buffers_ from 0 to 1). So
// the pool exceeds its bound by at most `depth` buffers.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "buffer_pool.h"
#include "config.h"
#include "histogram.h"
#include "loader.h"
#include "ring.h"
#include "thread_pool.h"

namespace pyloader {

struct EngineOptions {
  int workers = 1;
  std::size_t depth = 2;
  std::chrono::nanoseconds run_budget{std::chrono::microseconds(200)};
  std::size_t max_run = 64;
  std::size_t stats_window = 64;  // epochs stats() keeps in detail; older ones are merged
};

// What a worker is doing (Engine::activity()), for the stall warning and the report of abandoned
// workers. Only kLoading and kHook run user code.
enum class WorkerPhase : std::uint8_t {
  kIdle,     // between positions: claiming, waiting for one to become loadable
  kLoading,  // inside Loader::prepare() for `task` (user code: __getitem__)
  kBuffer,   // waiting for a free buffer for `task`
  kFilling,  // inside Loader::fill() for `task` (a copy; process mode: the worker writes it)
  kHook,     // inside Loader::epoch_end() after `task`, the last position of its epoch
};

struct WorkerActivity {
  int worker = -1;
  WorkerPhase phase = WorkerPhase::kIdle;
  Task task;  // the position (with its epoch and Sequence index) the phase is about
  std::chrono::nanoseconds elapsed{0};  // time in this phase so far
};

// An appended epoch segment: positions [start, end) load epoch `epoch`.
struct SegmentSpan {
  std::int64_t epoch = -1;
  std::int64_t start = 0;
  std::int64_t end = 0;
};

// Per-epoch figures, kept by the consumer's calls. A record may also stand for several epochs
// merged (merge(): epochs > 1, first_epoch..epoch).
struct EpochStats {
  std::int64_t epoch = -1;        // the (last) epoch counted
  std::int64_t first_epoch = -1;  // the first epoch counted
  std::int64_t epochs = 0;        // epochs counted (1 but for a merged record)
  std::int64_t batches = 0;
  LoadHistogram load_us;           // per-batch load time, microseconds
  std::int64_t wait_ns = 0;        // consumer time spent waiting for batches
  std::int64_t first_ns = 0;       // steady clock: the consumer first asked for a batch
  std::int64_t last_ns = 0;        // steady clock: the consumer took the latest batch
  std::int64_t busy_first_ns = 0;  // sum of worker busy time at first_ns / last_ns
  std::int64_t busy_last_ns = 0;
  std::int64_t merged_wall_ns = 0;  // wall and busy time of the epochs merged into this record
  std::int64_t merged_busy_ns = 0;
  std::int64_t peak_in_flight = 0;  // most batches loaded and not yet taken
  std::size_t pool_buffers = 0;     // buffer pool size at the latest batch
  std::size_t pool_bytes = 0;

  std::int64_t wall_ns() const noexcept { return merged_wall_ns + (last_ns - first_ns); }
  std::int64_t busy_ns() const noexcept { return merged_busy_ns + (busy_last_ns - busy_first_ns); }
  // Adds a later record `o` into this one (an empty record, epochs == 0, becomes a copy of it).
  void merge(const EpochStats& o) noexcept {
    if (epochs == 0) first_epoch = o.first_epoch;
    merged_wall_ns = wall_ns() + o.wall_ns();
    merged_busy_ns = busy_ns() + o.busy_ns();
    first_ns = last_ns = busy_first_ns = busy_last_ns = 0;
    epoch = o.epoch;
    epochs += o.epochs;
    batches += o.batches;
    load_us.merge(o.load_us);
    wait_ns += o.wait_ns;
    peak_in_flight = std::max(peak_in_flight, o.peak_in_flight);
    pool_buffers = o.pool_buffers;
    pool_bytes = o.pool_bytes;
  }
};

// What stats() returns: the latest epochs in detail, in order, and the epochs before them merged
// into one record (earlier.epochs == 0: none).
struct StatsWindow {
  std::vector<EpochStats> recent;
  EpochStats earlier;
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
  // NOTE [ Engine prunes segments behind the consumer ]
  //
  // append() drops every segment that ends before the consumer's position (next_position): so a
  // run of any number of epochs keeps about three segments, the one the consumer just finished
  // (ending at its position), the one it is in, the one planned ahead. That is safe because:
  //   1. a worker's job for position p keeps a raw Segment* only until it publishes p, and the
  //      consumer is below p until then, so p's segment is not finished; a worker's cached
  //      segment (segment_of) is a shared_ptr, which keeps a pruned segment's memory valid;
  //   2. the consumer's own calls need only its current segment (task_at of its next position)
  //      and the one it just finished (take_epoch_error, asked when the epoch is taken, before
  //      the consumer takes anything more: the segment then ends at the consumer's position,
  //      and is kept);
  //   3. the owner (src/pyloader/prefetcher.py, which cites this note) looks segments up only at
  //      or after the consumer's position, and counts the batches skipped before the engine's
  //      first position by that first *epoch*, not by the first segment kept.
  // Pruning runs only in append(), the planner's call: positions and the epoch table of a stopped
  // or finished run stay as they were. Segments planned ahead are never pruned: an owner that
  // plans further ahead than one epoch keeps more of them. (The gather's sample orders are
  // pruned by the plan instead: NOTE [ Gather prunes sample orders two epochs behind the plan ].)
  // Appends the next epoch's positions. `gated`: its positions wait for the previous segment's
  // epoch_end() hook (only meaningful when the Loader has one).
  // Drops the segments that end before the consumer's position
  // (NOTE [ Engine prunes segments behind the consumer ]).
  void append(std::int64_t epoch, std::vector<std::int64_t> indices, bool gated);
  // Replaces the indices of the last segment, if it is epoch `epoch` and still gated shut (see
  // "Re-planning" above); false (and no change) otherwise. An empty segment's hook is the owner's
  // to call, as with append().
  bool replan(std::int64_t epoch, std::vector<std::int64_t> indices);
  std::int64_t planned_end() const;
  Task task_at(std::int64_t position) const;  // position -1 when not planned (or pruned)
  std::vector<SegmentSpan> segments() const;  // the segments kept, in position order

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
  StatsWindow stats() const;
  std::int64_t worker_busy_ns() const noexcept;

  // ---- diagnostics (any thread) ----
  std::vector<WorkerActivity> activity() const;
  // The worker busy with `position` (worker -1 when none is). Allocates nothing.
  WorkerActivity activity_on(std::int64_t position) const noexcept;
  // In plain words: "worker thread 2, inside __getitem__(7) (epoch 0, for 61.2 s)".
  std::string describe(const WorkerActivity& a) const;

  // ---- shutdown ----
  void stop() noexcept;
  void join() noexcept;
  // After stop(): waits at most `grace` for the workers, then abandons those still running (see
  // Shutdown above). Returns what each abandoned worker was doing (empty: every worker ended).
  std::vector<WorkerActivity> join_for(std::chrono::nanoseconds grace);
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
  struct alignas(kCacheLine) ActivitySlot {
    mutable std::mutex mu;
    WorkerPhase phase = WorkerPhase::kIdle;  // under mu
    std::int64_t position = -1;              // under mu
    std::int64_t since_ns = 0;               // under mu
  };

  void worker_main(int worker);
  void set_activity(int worker, WorkerPhase phase, std::int64_t position) noexcept;
  WorkerActivity read_activity(int worker, std::int64_t now) const noexcept;
  bool wait_loadable(std::int64_t position) noexcept;
  // The segment holding `position` (null if none). `cached` is returned if it holds it; a worker
  // keeps its last segment alive through it, for a pruned segment's memory must stay valid there.
  std::shared_ptr<Segment> segment_of(std::int64_t position,
                                      const std::shared_ptr<Segment>& cached) const;
  const std::shared_ptr<Segment>* segment_locked(std::int64_t position) const;  // plan_mu_ held
  // Takes the segments to drop out of segments_ (the caller destroys them after unlocking: a
  // hook error's payload may need the GIL to die).
  std::vector<std::shared_ptr<Segment>> prune_locked();
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
  std::unique_ptr<ActivitySlot[]> activity_;  // one per worker, written only by its worker

  mutable std::mutex plan_mu_;
  std::vector<std::shared_ptr<Segment>> segments_;  // under plan_mu_, in position order
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
  mutable std::mutex stats_mu_;   // stats() may be called from any thread
  std::deque<EpochStats> stats_;  // under stats_mu_: at most stats_window, the latest last
  EpochStats earlier_stats_;      // under stats_mu_: the epochs dropped from stats_, merged
#ifndef NDEBUG
  std::atomic<bool> consumer_busy_{false};  // fires when two threads take the consumer role
#endif
};

}  // namespace pyloader
