#include "consumer.h"

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
  if (!c.warned_) {
    const std::chrono::nanoseconds starved = c.pool_->waiting_for();
    if (starved >= c.options_.starved_after) {
      c.warned_ = true;
      c.starved_ns_ = starved.count();
      return WaitOutcome::kPoolStarved;
    }
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
