#include "consumer.h"

#include <algorithm>
#include <cstdio>
#include <utility>

namespace pyloader {

Consumer::Consumer(std::shared_ptr<Engine> engine, std::shared_ptr<BufferPool> pool,
                   ConsumerOptions options)
    : engine_(std::move(engine)), pool_(std::move(pool)), options_(options) {}

Consumer::Turn Consumer::turn() {
  if (busy_.exchange(true, std::memory_order_acquire)) {  // G1
    throw ConcurrentConsumerError(
        "two threads are iterating one pyloader loader at once: its batches come in one order, to "
        "one consumer. Iterate it from one thread (hand batches to the others, e.g. through a "
        "queue.Queue), or give each thread its own loader");
  }
  return Turn(*this);
}

std::string Consumer::starvation_message() const {
  const PoolInfo i = pool_->info();
  return "pyloader: workers have waited " + std::to_string(starved_ns_ / 1'000'000'000) +
         " s for a free buffer: all " + std::to_string(i.buffers) + " buffers (" +
         std::to_string(i.bytes >> 20) + " MiB, max_pool_bytes=" + std::to_string(i.max_bytes) +
         ") hold batches that are still referenced. Drop references to old batches (or copy what "
         "you keep), or raise max_pool_bytes.";
}

namespace {
std::string seconds(std::int64_t ns) {
  char out[32];
  std::snprintf(out, sizeof out, "%.1f s", static_cast<double>(ns) / 1e9);
  return out;
}
}  // namespace

std::string Consumer::exhausted_message() const {
  const PoolInfo i = pool_->info();
  const Task t = engine_->task_at(exhausted_position_);
  const std::size_t raise_to = std::max<std::size_t>(2 * i.max_bytes, i.bytes + i.max_bytes);
  return "pyloader: batch " + std::to_string(t.index) + " (epoch " + std::to_string(t.epoch) +
         ") has waited " + seconds(exhausted_ns_) +
         " for a buffer and none came free: the buffer pool is at its bound, max_pool_bytes=" +
         std::to_string(i.max_bytes) + ", and " + std::to_string(i.leased) +
         " batches you still reference hold " + std::to_string(i.leased) + " of its " +
         std::to_string(i.buffers) + " buffers (" + std::to_string(i.bytes) +
         " bytes in all). Drop references to old batches (or copy what you keep) and call next() "
         "again: the loader goes on with this batch. Or raise the bound, e.g. max_pool_bytes=" +
         std::to_string(raise_to) + ".";
}

std::string Consumer::stall_message(bool timeout_set) const {
  const Task t = engine_->task_at(stalled_position_);
  std::string out = "pyloader: batch " + std::to_string(t.index) + " (epoch " +
                    std::to_string(t.epoch) + ") has not arrived after " + seconds(stalled_ns_) +
                    ": ";
  WorkerActivity a = engine_->activity_on(stalled_position_);
  if (a.worker >= 0) {
    a.task = t;
    out += engine_->describe(a) + ".";
  } else {
    out +=
        "no worker is busy with it alone (the worker that loaded it may be loading the next "
        "batch of its run first, or every worker is busy);";
    bool any = false;
    for (const WorkerActivity& w : engine_->activity()) {
      if (w.phase == WorkerPhase::kIdle) continue;
      out += std::string(any ? ";" : "") + " " + engine_->describe(w);
      any = true;
    }
    out += any ? "." : " every worker is idle.";
  }
  out +=
      " It may be stuck (a __getitem__ that never returns, a stopped worker process) or very "
      "slow.";
  if (!timeout_set) {
    out += " timeout=None waits for ever: pass timeout= (seconds) to raise TimeoutError instead.";
  }
  return out;
}

Consumer::Turn::~Turn() { consumer_.busy_.store(false, std::memory_order_release); }  // G2

std::int64_t Consumer::Turn::now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

WaitOutcome Consumer::Turn::wait_slice(std::optional<std::chrono::nanoseconds> timeout) noexcept {
  Consumer& c = consumer_;
  if (wait_start_ns_ == 0) wait_start_ns_ = now_ns();
  const bool ready = c.engine_->wait_ready(c.options_.slice);
  slice_end_ns_ = now_ns();
  if (ready) return WaitOutcome::kReady;
  if (c.engine_->stopping()) return WaitOutcome::kStopped;
  if (timeout && slice_end_ns_ - wait_start_ns_ >= timeout->count()) return WaitOutcome::kTimedOut;
  const std::int64_t waited = slice_end_ns_ - wait_start_ns_;
  const std::chrono::nanoseconds starved = c.pool_->waiting_for();
  if (!c.warned_ && starved >= c.options_.starved_after) {
    c.warned_ = true;
    c.starved_ns_ = starved.count();
    return WaitOutcome::kPoolStarved;
  }
  const std::int64_t position = next_position();
  const std::int64_t exhausted_after = c.options_.exhausted_after.count();
  if (exhausted_after > 0 && c.warned_ && starved.count() >= exhausted_after &&
      waited >= exhausted_after) {
    const WorkerActivity a = c.engine_->activity_on(position);
    if (a.phase == WorkerPhase::kBuffer && a.elapsed.count() >= exhausted_after) {
      c.exhausted_position_ = position;
      c.exhausted_ns_ = std::min(a.elapsed.count(), waited);
      return WaitOutcome::kPoolExhausted;
    }
  }
  const std::int64_t stall_after = c.options_.stall_after.count();
  if (stall_after > 0 && waited >= stall_after && c.stalled_position_ != position) {
    c.stalled_position_ = position;
    c.stalled_ns_ = waited;
    return WaitOutcome::kStalled;
  }
  return WaitOutcome::kSlice;
}

void Consumer::Turn::resumed() noexcept { consumer_.engine_->add_wait(now_ns() - slice_end_ns_); }

Delivery Consumer::Turn::take() noexcept {
  taken_ns_ = now_ns();
  wait_start_ns_ = 0;
  return consumer_.engine_->take();
}

void Consumer::Turn::handed_over() noexcept { consumer_.engine_->add_wait(now_ns() - taken_ns_); }

}  // namespace pyloader
