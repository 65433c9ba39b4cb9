// Tests of Consumer (consumer.h): the wait policy (timeout, stop, pool starvation) and the
// single-consumer guard, in every build.
#include <atomic>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "../core/consumer.h"
#include "check.h"

using pyloader::BufferPool;
using pyloader::ConcurrentConsumerError;
using pyloader::Consumer;
using pyloader::ConsumerOptions;
using pyloader::Delivery;
using pyloader::Engine;
using pyloader::EngineOptions;
using pyloader::Payload;
using pyloader::PinRequest;
using pyloader::Prepared;
using pyloader::WaitOutcome;
using namespace std::chrono_literals;

namespace {

constexpr auto kRelaxed = std::memory_order_relaxed;
const std::size_t kPage = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));

class IndexPayload final : public Payload {
 public:
  explicit IndexPayload(std::int64_t index) : index(index) {}
  const std::int64_t index;
};

// A Loader whose prepare() waits until the gate opens; each batch needs `bytes` of buffer and
// carries its index.
class GateLoader final : public pyloader::Loader {
 public:
  explicit GateLoader(std::size_t bytes, bool open) : bytes_(bytes), open_(open) {}
  void open() { open_.store(true, kRelaxed); }

  void thread_start(int) override {}
  void thread_exit(int) noexcept override {}
  bool enter(int) override { return true; }
  void leave(int) override {}
  void prepare(int, Prepared& item) noexcept override {
    while (!open_.load(kRelaxed) && !interrupted_.load(kRelaxed)) std::this_thread::sleep_for(1ms);
    item.bytes = bytes_;
    item.payload = std::make_unique<IndexPayload>(item.task.index);
  }
  void fill(int, Prepared&, std::byte*, std::size_t) noexcept override {}
  bool has_epoch_end() const noexcept override { return false; }
  std::unique_ptr<Payload> epoch_end(int, std::int64_t) noexcept override { return nullptr; }
  void interrupt() noexcept override { interrupted_.store(true, kRelaxed); }

 private:
  const std::size_t bytes_;
  std::atomic<bool> open_;
  std::atomic<bool> interrupted_{false};
};

struct Rig {
  std::shared_ptr<GateLoader> loader;
  std::shared_ptr<BufferPool> pool;
  std::shared_ptr<Engine> engine;
  std::unique_ptr<Consumer> consumer;

  Rig(int workers, std::size_t depth, std::size_t bytes, bool open,
      std::size_t pool_bytes = 1 << 20, ConsumerOptions options = {}) {
    loader = std::make_shared<GateLoader>(bytes, open);
    pool = BufferPool::create(pool_bytes, PinRequest::kOff);
    EngineOptions eo;
    eo.workers = workers;
    eo.depth = depth;
    engine = Engine::create(eo, pool, loader);
    consumer = std::make_unique<Consumer>(engine, pool, options);
    engine->start();
  }
  ~Rig() {
    engine->stop();
    engine->join();
  }
  void plan(std::int64_t epoch, std::vector<std::int64_t> indices) {
    engine->append(epoch, std::move(indices), false);
  }
};

// Waits slice by slice until the outcome is something else than kSlice.
WaitOutcome wait(Consumer::Turn& turn, std::optional<std::chrono::nanoseconds> timeout) {
  for (;;) {
    const WaitOutcome w = turn.wait_slice(timeout);
    turn.resumed();
    if (w != WaitOutcome::kSlice) return w;
  }
}

std::int64_t index_of(const Delivery& d) {
  return dynamic_cast<const IndexPayload&>(*d.payload).index;
}

}  // namespace

TEST(timeout_names_the_pending_task_and_the_wait_goes_on_after_it) {
  check::test_seed();
  Rig rig(1, 2, 0, /*open=*/false, 1 << 20, {.slice = 5ms});
  rig.plan(3, {7, 8});
  {
    auto turn = rig.consumer->turn();
    CHECK(!turn.ready());
    CHECK(wait(turn, 30ms) == WaitOutcome::kTimedOut);
    const pyloader::Task t = turn.pending();
    CHECK_EQ(t.position, 0);
    CHECK_EQ(t.epoch, 3);
    CHECK_EQ(t.index, 7);
  }
  rig.loader->open();
  auto turn = rig.consumer->turn();  // a new turn: the timed-out wait is over, a new one begins
  CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
  Delivery d = turn.take();
  turn.handed_over();
  CHECK_EQ(d.task.index, 7);
  CHECK_EQ(index_of(d), 7);
  CHECK_EQ(turn.next_position(), 1);
}

TEST(stop_from_another_thread_ends_the_wait) {
  check::test_seed();
  Rig rig(1, 2, 0, /*open=*/false, 1 << 20, {.slice = 5ms});
  rig.plan(0, {0, 1, 2});
  std::thread stopper([&] {
    std::this_thread::sleep_for(50ms);
    rig.engine->stop();
  });
  auto turn = rig.consumer->turn();
  CHECK(wait(turn, std::nullopt) == WaitOutcome::kStopped);
  stopper.join();
  CHECK(wait(turn, std::nullopt) == WaitOutcome::kStopped);  // and stays so
}

// A pool bound of one page, one worker, and the consumer keeping its first batch (position 0)
// and so the pool's only buffer: position 1 gets none until `kept` is cleared.
struct AtTheBound {
  Rig rig;
  std::vector<Delivery> kept;
  explicit AtTheBound(ConsumerOptions options)
      : rig(1, 2, kPage, /*open=*/true, /*pool_bytes=*/kPage, options) {
    rig.plan(0, {0, 1, 2, 3});
    auto turn = rig.consumer->turn();
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
    kept.push_back(turn.take());
    CHECK(static_cast<bool>(kept.back().buffer));
  }
  // The kept lease returns: position 1 loads, and `turn` takes it.
  void release_and_take_next(Consumer::Turn& turn) {
    kept.clear();
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
    CHECK_EQ(turn.take().task.position, 1);
  }
};

// The consumer keeps every batch (its lease) while the pool is at its bound: the worker that loads
// the next position waits for a buffer, and the consumer is told so once. (One worker: positions
// get buffers in order, so position 0 has the only one. With two, position 1 could take it first
// and position 0 would then grow the pool, as the consumer needs it next.)
TEST(pool_starvation_is_reported_once) {
  check::test_seed();
  AtTheBound at({.slice = 5ms, .starved_after = 50ms});
  Rig& rig = at.rig;
  auto turn = rig.consumer->turn();
  int starved = 0;
  // Position 1 cannot get a buffer while position 0's lease is kept: nothing else ends the wait.
  for (int slices = 0; starved == 0 || slices < 20; ++slices) {
    const WaitOutcome w = turn.wait_slice(std::nullopt);
    turn.resumed();
    CHECK(w == WaitOutcome::kSlice || w == WaitOutcome::kPoolStarved);
    if (w == WaitOutcome::kPoolStarved) ++starved;
  }
  CHECK_EQ(starved, 1);
  CHECK(rig.consumer->starvation_message().find("max_pool_bytes") != std::string::npos);
  at.release_and_take_next(turn);
}

// Past `exhausted_after` (and after the starvation warning) the wait ends with kPoolExhausted,
// every time, and the position stays: once a kept batch is released the same position loads.
TEST(pool_exhaustion_ends_the_wait_and_the_position_stays) {
  check::test_seed();
  AtTheBound at({.slice = 5ms, .starved_after = 20ms, .exhausted_after = 60ms});
  Rig& rig = at.rig;
  {
    auto turn = rig.consumer->turn();
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kPoolStarved);  // the warning first
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kPoolExhausted);
  }
  const std::string message = rig.consumer->exhausted_message();
  CHECK_MSG(message.find("batch 1 (epoch 0)") != std::string::npos, message);
  CHECK_MSG(message.find("max_pool_bytes=" + std::to_string(kPage)) != std::string::npos, message);
  CHECK_MSG(message.find("1 batches you still reference") != std::string::npos, message);
  CHECK_MSG(message.find("raise the bound, e.g. max_pool_bytes=") != std::string::npos, message);
  {
    auto turn = rig.consumer->turn();  // a new wait: bounded again, and again exhausted
    CHECK_EQ(turn.next_position(), 1);
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kPoolExhausted);
  }
  auto turn = rig.consumer->turn();
  at.release_and_take_next(turn);
}

// A loader stuck on a position: kStalled once for it, naming the worker and the call; the wait
// goes on (and, in a new Turn, is not reported again) until the batch arrives.
TEST(a_stall_is_reported_once_per_position) {
  check::test_seed();
  Rig rig(1, 2, 0, /*open=*/false, 1 << 20, {.slice = 5ms, .stall_after = 40ms});
  rig.plan(2, {7, 8});
  {
    auto turn = rig.consumer->turn();
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kStalled);
    const std::string message = rig.consumer->stall_message(false);
    CHECK_MSG(message.find("batch 7 (epoch 2) has not arrived after") == 0 ||
                  message.find("pyloader: batch 7 (epoch 2) has not arrived after") == 0,
              message);
    CHECK_MSG(
        message.find("worker thread 0, inside loading index 7 (epoch 2, for ") != std::string::npos,
        message);
    CHECK_MSG(message.find("timeout=None") != std::string::npos, message);
    CHECK(rig.consumer->stall_message(true).find("timeout=None") == std::string::npos);
    CHECK(wait(turn, 60ms) == WaitOutcome::kTimedOut);  // no second kStalled meanwhile
  }
  {
    auto turn = rig.consumer->turn();
    CHECK(wait(turn, 80ms) == WaitOutcome::kTimedOut);  // a new Turn: still once per position
  }
  rig.loader->open();
  auto turn = rig.consumer->turn();
  CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
  CHECK_EQ(turn.take().task.index, 7);
}

TEST(a_second_thread_gets_an_error_instead_of_the_role) {
  check::test_seed();
  Rig rig(1, 2, 0, /*open=*/false);
  rig.plan(0, {0, 1});
  std::atomic<int> refused{0};
  {
    auto turn = rig.consumer->turn();
    std::thread second([&] {
      try {
        auto other = rig.consumer->turn();
      } catch (const ConcurrentConsumerError& e) {
        CHECK(std::string(e.what()).find("two threads") != std::string::npos);
        refused.fetch_add(1, kRelaxed);
      }
    });
    second.join();
    CHECK_EQ(refused.load(kRelaxed), 1);
  }
  // The role is free again once the turn ends: any thread may take it (one at a time).
  rig.loader->open();
  std::thread later([&] {
    auto turn = rig.consumer->turn();
    CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
    CHECK_EQ(turn.take().task.index, 0);
  });
  later.join();
  auto turn = rig.consumer->turn();
  CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
  CHECK_EQ(turn.take().task.index, 1);
}

// Threads race for the role on every batch: each position is taken exactly once, in order, by
// whichever thread held the role; the others were refused, never let in beside it.
TEST(racing_threads_take_every_position_exactly_once) {
  const std::uint64_t seed = check::test_seed();
  const std::int64_t n = check::scaled(2000);
  Rig rig(3, 4, 64, /*open=*/true);
  std::vector<std::int64_t> indices(static_cast<std::size_t>(n));
  std::iota(indices.begin(), indices.end(), 0);
  rig.plan(0, indices);
  std::vector<std::atomic<int>> taken(static_cast<std::size_t>(n));
  for (auto& t : taken) t.store(0, kRelaxed);
  std::atomic<std::int64_t> done{0}, refusals{0};
  std::vector<std::thread> threads;
  for (int k = 0; k < 3; ++k) {
    threads.emplace_back([&, k] {
      std::uint64_t r = check::mix(seed, static_cast<std::uint64_t>(k));
      while (done.load(kRelaxed) < n) {
        try {
          auto turn = rig.consumer->turn();
          if (turn.next_position() >= n) break;
          CHECK(wait(turn, std::nullopt) == WaitOutcome::kReady);
          Delivery d = turn.take();
          CHECK_EQ(d.task.index, d.task.position);
          CHECK_EQ(taken[static_cast<std::size_t>(d.task.position)].fetch_add(1, kRelaxed), 0);
          done.fetch_add(1, kRelaxed);
        } catch (const ConcurrentConsumerError&) {
          refusals.fetch_add(1, kRelaxed);
        }
        r = check::mix(r);
        if (r % 4 == 0) std::this_thread::yield();
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK_EQ(done.load(kRelaxed), n);
  for (std::int64_t p = 0; p < n; ++p)
    CHECK_EQ(taken[static_cast<std::size_t>(p)].load(kRelaxed), 1);
  std::printf("  %lld refusals\n", static_cast<long long>(refusals.load(kRelaxed)));
}

TEST_MAIN()
