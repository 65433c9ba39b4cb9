// proc_loader.h: ProcLoader, the core Loader of process mode: each engine worker thread drives
// one worker process over a socket and has it write batches straight into the shared arena.
//
// Roles
//   engine worker thread w  owns slot w: the worker process at the other end of slot w's socket.
//                           It sends each position's request, waits for the answer, and publishes.
//   worker process          (process/_worker.py) loads the Sequence index, writes the arrays into
//                           the buffer the thread names (an offset in the shared Arena), and
//                           answers with the batch's layout (opaque bytes: ProcBatch::meta).
//   replace callback        (the owner's) starts a new worker process for a slot whose worker
//                           died, and says how the old one ended.
//
// clang-format off
// Wire protocol (one machine, native byte order): every message is a WireHeader followed by
// `length` bytes. Every answer carries the position it answers in `d`.
//   thread -> worker  kLoad   a=position b=epoch c=index d=epoch hooks run so far
//   worker -> thread  kSize   a=bytes b=meta length; flags&kInline: the bytes follow the meta
//                             (small batches: one round trip, the thread copies them)
//                     kError  the exception, pickled by the worker (opaque here)
//   thread -> worker  kWrite  a=offset in the arena b=capacity c=position (after a kSize not inline)
//   worker -> thread  kDone
// A worker that waits for kWrite and receives kLoad abandons the pending batch (the engine found
// no buffer for it, or stopped); the thread skips answers about positions other than its own.
// clang-format on
//
// Death: a worker process that dies closes its end of the socket, so the thread's read returns
// at once (EOF) - whatever the worker was doing. The thread then has the replace callback start a
// new worker and re-issues the position from its start (kLoad). A position has one retry budget,
// whichever phase its workers die in: the deaths seen by prepare() travel to fill() with the
// batch (ProcBatch::deaths), so a position fails, with ProcBatch::kDied, at its
// (max_retries + 1)-th death in total, and the message lists how each of them died, in order.
//
// Shutdown: interrupt() (Engine::stop) wakes every thread blocked on a socket (an eventfd polled
// beside it). A worker interrupted mid-conversation is left in an unknown state: dirty() names
// its slot, and the owner replaces it before the slot is used again. So a worker process stuck in
// user code (or stopped by SIGSTOP) never holds up a stop: its thread returns at once, and the
// owner's replacement kills it (SIGKILL, from the zygote); closing the pool kills every worker.
// An engine stopped after a TimeoutError (the Prefetcher abandons the position) thus gets the
// stuck worker killed and replaced before the next engine runs.
//
// Diagnostics: worker_name() reads the worker's state from /proc/<pid>/stat (no psutil), so the
// consumer's stall warning can say that a worker process is stopped (state T) rather than slow.
//
// Epoch hooks: the owner's hook runs in this process (epoch_end, as in thread mode) and counts
// hooks_; each kLoad carries the count, and the worker runs its own copy of the hook until it has
// run as many (so state that on_epoch_end changes reaches the workers, replacements included).
// The engine's epoch gates make the count exact: a position of epoch e+1 is loaded only after
// the hook of e has run, and the hook of e+1 only after every position of e+1 has loaded.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine.h"
#include "fork.h"

namespace pyloader {

struct WireHeader {
  std::uint32_t kind = 0;
  std::uint32_t flags = 0;
  std::int64_t a = 0, b = 0, c = 0, d = 0;
  std::uint64_t length = 0;
};
static_assert(sizeof(WireHeader) == 48,
              "process/_wire.py packs the header as '=IIqqqqQ' (48 bytes)");

// kUpdate is the owner's, sent while no engine uses the socket (between engines): `d` is the
// owner's epoch-hook count and `length` bytes of a call for the worker's Sequence follow. The
// worker answers nothing; a ProcLoader never sends or reads it.
enum WireKind : std::uint32_t {
  kLoad = 1,
  kSize = 2,
  kError = 3,
  kWrite = 4,
  kDone = 5,
  kUpdate = 6
};
inline constexpr std::uint32_t kInline = 1;

struct ProcWorker {
  int fd = -1;  // this process's end of the slot's socket (owned by the caller)
  int pid = 0;
};

// What a position's worker process produced: a batch (meta, and its bytes when inline), an
// exception it raised (message), or how the workers that tried it died (message).
class ProcBatch final : public Payload {
 public:
  enum Kind : std::uint8_t { kOk, kRaised, kDied };
  Kind kind = kOk;
  std::string meta;
  std::string data;      // the batch's bytes, for an inline batch
  std::string message;   // kRaised: the pickled exception; kDied: plain words
  std::int32_t pid = 0;  // the worker process that produced it
  // How the workers that died loading this position so far ended: prepare() hands them on to
  // fill(), which counts on from there (one retry budget per position).
  std::vector<std::string> deaths;
};

class ProcLoader final : public Loader {
 public:
  // Starts a new worker for `slot`, whose worker died or must be discarded. Sets `death` to how
  // the old one ended. Returns the new worker; fd -1 when none could be started (then `death`
  // says why). Called on slot's engine thread.
  using Replace = std::function<ProcWorker(int slot, std::string& death)>;
  // Runs the owner's epoch hook; returns the error it raised, or null.
  using Hook = std::function<std::unique_ptr<Payload>(int worker, std::int64_t epoch)>;

  ProcLoader(std::vector<ProcWorker> workers, std::byte* arena_base, std::size_t arena_size,
             Replace replace, Hook hook, int max_retries, std::int64_t hooks_before);
  ~ProcLoader() override;

  void thread_start(int) override {}
  void thread_exit(int) noexcept override {}
  bool enter(int) override { return !interrupted_.load(std::memory_order_acquire); }
  void leave(int) override {}
  // prepare(), fill() and epoch_end() call the owner's callbacks, which may wait for the GIL:
  // not noexcept, so that the host's forced thread exit can unwind them (loader.h, "Thread exit").
  void prepare(int worker, Prepared& item) override;
  void fill(int worker, Prepared& item, std::byte* dst, std::size_t capacity) override;
  bool has_epoch_end() const noexcept override { return static_cast<bool>(hook_); }
  std::size_t max_run() const noexcept override { return 1; }  // one conversation at a time
  // Worker process w loads positions w, w + workers, ...: its seeded state sees the same batches
  // in every run (as torch's worker i % num_workers does).
  bool round_robin() const noexcept override { return true; }
  std::unique_ptr<Payload> epoch_end(int worker, std::int64_t epoch) override;
  void interrupt() noexcept override;
  // "worker process 1234 (worker 0, stopped: SIGSTOP ...)": its state from /proc/<pid>/stat.
  std::string worker_name(int worker) const override;
  std::string call_name(std::int64_t index) const override {
    return "__getitem__(" + std::to_string(index) + ") in its process";
  }

  // Safe from any thread.
  std::vector<ProcWorker> workers() const;
  std::vector<int> dirty() const;  // slots whose worker must be replaced before reuse
  std::int64_t hooks() const noexcept { return hooks_.load(std::memory_order_acquire); }
  std::int64_t deaths() const noexcept { return deaths_.load(std::memory_order_relaxed); }

 private:
  enum class Io { kOk, kDead, kStopped };
  struct Slot {
    ProcWorker worker;  // under mu_ for readers on other threads; written by its thread
    bool busy = false;  // a conversation is open (under mu_)
  };
  Io send_msg(int fd, const WireHeader& h) noexcept;
  Io recv_msg(int fd, WireHeader& h, std::string& body) noexcept;
  Io recv_exact(int fd, void* dst, std::size_t n) noexcept;
  // The next answer about `position` (answers about others are stale: skipped).
  Io recv_reply(int fd, std::int64_t position, WireHeader& h, std::string& body) noexcept;
  // Asks slot's worker to load the task; reads its first answer into `out`. kDead when it died.
  Io request(int worker, const Task& task, WireHeader& h, std::string& body) noexcept;
  // Replaces slot's worker after a death; appends how it died. False when no worker could start.
  bool replace(int worker, std::vector<std::string>& deaths);
  // Turns the first answer into the item (bytes and payload). False for a malformed answer.
  bool accept(Prepared& item, const WireHeader& h, std::string& body);
  void set_busy(int worker, bool busy);
  int fd_of(int worker) const;
  int pid_of(int worker) const;
  // After a death: replaces the worker; false (and the item failed) when the position is out of
  // retries or no worker could start.
  bool retry_after_death(int worker, Prepared& item, std::vector<std::string>& deaths);
  void fail_died(Prepared& item, const std::vector<std::string>& deaths, const std::string& why);

  std::byte* const arena_base_;
  const std::size_t arena_size_;
  const Replace replace_;
  const Hook hook_;
  const int max_retries_;
  int stop_fd_ = -1;  // eventfd: readable once interrupted (shared with forked children)
  const OwnerProcess owner_;
  std::atomic<bool> interrupted_{false};
  std::atomic<std::int64_t> hooks_;
  std::atomic<std::int64_t> deaths_{0};
  mutable std::mutex mu_;
  std::vector<Slot> slots_;
};

}  // namespace pyloader
