// loader.h: Loader, what the Engine (engine.h) calls to load one position, and the values that
// carry a position from plan to consumer: Task -> Prepared -> Delivery.
//
// Roles
//   engine workers: call the Loader. thread_start()/thread_exit() bracket a worker's life;
//                   enter()/leave() bracket a *run* of prepare() calls (for Python: the GIL is
//                   held in between); fill() and epoch_end() run outside a run.
//   consumer:       receives each position's Delivery, in position order, and owns its payload.
//
// Two phases per position: prepare() runs between enter() and leave() (for Python: with the GIL
// held, calling user code) and says how many buffer bytes the batch needs; fill() copies the batch
// into a leased buffer outside them (for Python: with the GIL released). Failures never throw:
// they are recorded in the Prepared (as a payload describing the error, or in plain words) and
// reach the consumer as values at their position.
//
// Thread exit: a host may end a worker thread from inside enter(), prepare(), epoch_end() or
// thread_exit() by unwinding its stack (CPython, during finalization, ends a thread that asks for
// the GIL with pthread_exit, a forced unwind). So these are not declared noexcept (an
// implementation may be), and the engine's frames between them and the thread's start are not
// either: a noexcept frame would turn that unwind into std::terminate. The unwind destroys what
// the frames hold, as a stop does.
//
// Lifetime: a Payload may be destroyed on any thread (a worker dropping leftovers after a stop,
// the last worker to end destroying the engine), so one that needs a lock to die (the GIL) takes
// it itself. interrupt() may be called from any thread (Engine::stop()).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "buffer_pool.h"

namespace pyloader {

// What a Loader produces for one position (e.g. Python objects). Opaque to the core. A payload
// may be destroyed on any thread; one that needs a lock to die (the GIL) takes it itself.
class Payload {
 public:
  virtual ~Payload() = default;
};

struct Task {
  std::int64_t position = -1;
  std::int64_t epoch = -1;
  std::int64_t index = -1;  // the Sequence index the position loads
};

// A position being loaded: prepare() sets bytes (buffer space needed) and payload.
struct Prepared {
  Task task;
  std::size_t bytes = 0;
  std::unique_ptr<Payload> payload;
  bool failed = false;  // the payload describes an error raised while loading
  std::string error;    // or: a failure described in plain words (no payload)
};

// What the consumer receives for a position.
struct Delivery {
  Task task;
  std::unique_ptr<Payload> payload;
  BufferLease buffer;          // empty when the batch needs no buffer memory
  std::string error;           // a failure described in plain words; payload is then empty
  bool out_of_memory = false;  // ... because the pool could not allocate
  bool failed = false;         // the payload describes an error raised while loading
  bool skipped = false;        // not loaded: the position was below skip_to()
  std::int32_t worker = -1;
  std::int64_t load_ns = 0;
};

// A prepared batch of at most this many bytes may be filled and published inside its worker's
// run (between enter() and leave()), so that it never waits for the next position's load.
inline constexpr std::size_t kEarlyPublishBytes = std::size_t{64} << 10;

class Loader {
 public:
  virtual ~Loader() = default;
  virtual void thread_start(int worker) = 0;
  virtual void thread_exit(int worker) = 0;  // not noexcept: see "Thread exit" above
  // thread_start/enter/leave/thread_exit report no errors by throwing (nothing would catch
  // them); the only unwinding through them is the host's forced thread exit ("Thread exit").
  // enter() returns false when the worker must end instead (the host is shutting down); positions
  // it had claimed are then never published, so the consumer waits until stop().
  virtual bool enter(int worker) = 0;
  virtual void leave(int worker) = 0;
  // Between enter() and leave(). Records failures in the Prepared; never throws (not declared
  // noexcept, on purpose: see "Thread exit" above).
  virtual void prepare(int worker, Prepared& item) = 0;
  // Writes the batch into dst (capacity >= item.bytes). Called for failed items too (with dst
  // null, to release what they hold); dst is null whenever item.bytes is 0. Runs outside
  // enter()/leave(), except for a batch of at most kEarlyPublishBytes published inside a run.
  // Never throws; not declared noexcept, for a fill() may wait for the GIL (process mode replaces
  // a worker that died mid-write through the owner's callback): see "Thread exit" above.
  virtual void fill(int worker, Prepared& item, std::byte* dst, std::size_t capacity) = 0;
  virtual bool has_epoch_end() const noexcept = 0;
  // At most this many positions are prepared per enter()/leave() (see run_budget).
  virtual std::size_t max_run() const noexcept { return static_cast<std::size_t>(-1); }
  // True: positions go to the engine's workers round-robin (worker w loads w, w + workers,
  // w + 2 * workers, ... of each engine), so which worker loads a position is a function of the
  // position, as torch's DataLoader gives batch i to worker i % num_workers. For loaders whose
  // workers hold state of their own (process mode: a worker process per engine worker, seeded
  // per worker; a stream source: the shards' iterators, see py_loader.h). False: whichever worker
  // is free claims the next position.
  virtual bool round_robin() const noexcept { return false; }
  // Outside enter()/leave(). Returns the error the hook raised, or null.
  virtual std::unique_ptr<Payload> epoch_end(int worker, std::int64_t epoch) = 0;
  // Called by Engine::stop(), from any thread: a prepare()/fill() blocked on something outside
  // the process (a worker process) must return promptly.
  virtual void interrupt() noexcept {}
  // For diagnostics (the stall warning, abandoned workers), from any thread: who `worker` is
  // ("worker thread 2"; process mode: the worker process, its pid and state) and what its load
  // of a Sequence index is called in the user's words ("__getitem__(7)").
  virtual std::string worker_name(int worker) const {
    return "worker thread " + std::to_string(worker);
  }
  virtual std::string call_name(std::int64_t index) const {
    return "loading index " + std::to_string(index);
  }
};

}  // namespace pyloader
