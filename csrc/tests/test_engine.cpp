// Tests of Engine (engine.h): plan segments, epoch gates, workers, in-order delivery, shutdown.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <thread>
#include <vector>

#include "../core/engine.h"
#include "check.h"

using pyloader::BufferPool;
using pyloader::Delivery;
using pyloader::Engine;
using pyloader::EngineOptions;
using pyloader::EpochStats;
using pyloader::LoadHistogram;
using pyloader::Payload;
using pyloader::PinRequest;
using pyloader::Prepared;
using pyloader::Task;
using namespace std::chrono_literals;

namespace {

const std::size_t kPage = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
// The test's own bookkeeping atomics are relaxed: acquire/release pairs in the test would order
// the engine's threads for it and hide from ThreadSanitizer a missing order in the engine. (One
// atomic's modification order still follows happens-before, so the recorded global sequence is
// exact wherever the engine orders two events.)
constexpr auto kRelaxed = std::memory_order_relaxed;
constexpr auto kForever = std::chrono::nanoseconds(-1);

// A payload that counts itself: after a test, live() == 0 proves that none leaked.
class TestPayload final : public Payload {
 public:
  TestPayload(std::int64_t index, std::int64_t epoch, bool error)
      : index(index), epoch(epoch), error(error) {
    counter().fetch_add(1, kRelaxed);
  }
  ~TestPayload() override { counter().fetch_sub(1, kRelaxed); }
  static std::int64_t live() { return counter().load(std::memory_order_acquire); }
  const std::int64_t index, epoch;
  const bool error;

 private:
  static std::atomic<std::int64_t>& counter() {
    static std::atomic<std::int64_t> n{0};
    return n;
  }
};

const TestPayload* as_test(const std::unique_ptr<Payload>& p) {
  return dynamic_cast<const TestPayload*>(p.get());
}

struct LoaderConfig {
  std::uint64_t seed = 0;
  bool hooks = false;
  int fail_permille = 0;       // positions whose prepare() "raises"
  int hook_fail_permille = 0;  // epochs whose hook "raises"
  int sleep_permille = 0;      // chance of a random sleep in prepare() and fill()
  int max_sleep_us = 0;
  int zero_bytes_permille = 100;
  std::size_t max_item_bytes = 3 * 4096;
  std::size_t fixed_bytes = 0;      // when set, every batch has this size
  std::int64_t capacity = 1 << 14;  // positions and epochs recorded
  std::chrono::milliseconds prepare_delay{0};
  std::chrono::milliseconds hook_delay{0};
  std::int64_t oom_index = -1;           // this index asks for more memory than exists
  std::int64_t refuse_enter_after = -1;  // enter() returns false once this many succeeded
  int error_permille = 0;                // positions whose prepare() reports a plain-words error
  std::int64_t slow_position = -1;       // this position's prepare() sleeps slow_delay
  std::chrono::milliseconds slow_delay{0};
  std::int64_t gated_position = -1;  // this position's prepare() waits for *gate_open
  const std::atomic<bool>* gate_open = nullptr;
  std::size_t max_run = static_cast<std::size_t>(-1);         // Loader::max_run()
  std::size_t engine_max_run = static_cast<std::size_t>(-1);  // EngineOptions::max_run, to check
};

constexpr std::size_t kHuge = std::size_t{1} << 47;

// A Loader that records, on one global sequence, when each position was prepared and filled and
// when each epoch hook began and ended, so that the test can check the epoch gates afterwards.
class TestLoader final : public pyloader::Loader {
 public:
  TestLoader(const LoaderConfig& cfg, int workers)
      : cfg_(cfg),
        entered_(new std::atomic<int>[static_cast<std::size_t>(workers)]),
        in_run_(new std::atomic<std::size_t>[static_cast<std::size_t>(workers)]),
        workers_(workers),
        prep_seq(new std::atomic<std::int64_t>[static_cast<std::size_t>(cfg.capacity)]),
        fill_seq(new std::atomic<std::int64_t>[static_cast<std::size_t>(cfg.capacity)]),
        prepared(new std::atomic<int>[static_cast<std::size_t>(cfg.capacity)]),
        hook_begin(new std::atomic<std::int64_t>[static_cast<std::size_t>(cfg.capacity)]),
        hook_end(new std::atomic<std::int64_t>[static_cast<std::size_t>(cfg.capacity)]),
        hook_calls(new std::atomic<int>[static_cast<std::size_t>(cfg.capacity)]) {
    for (int w = 0; w < workers; ++w) {
      entered_[w].store(0, kRelaxed);
      in_run_[w].store(0, kRelaxed);
    }
    for (std::int64_t i = 0; i < cfg.capacity; ++i) {
      prep_seq[i].store(-1, kRelaxed);
      fill_seq[i].store(-1, kRelaxed);
      prepared[i].store(0, kRelaxed);
      hook_begin[i].store(-1, kRelaxed);
      hook_end[i].store(-1, kRelaxed);
      hook_calls[i].store(0, kRelaxed);
    }
  }

  // ---- what a batch is, derived from (seed, epoch, index) only ----
  std::size_t bytes_for(std::int64_t index) const {
    if (index == cfg_.oom_index) return kHuge;
    if (cfg_.fixed_bytes) return cfg_.fixed_bytes;
    const std::uint64_t h = check::mix(cfg_.seed, static_cast<std::uint64_t>(index), 1);
    if (static_cast<int>(h % 1000) < cfg_.zero_bytes_permille) return 0;
    return 1 + (h >> 16) % cfg_.max_item_bytes;
  }
  bool fails(std::int64_t epoch, std::int64_t index) const {
    const auto h = check::mix(cfg_.seed, static_cast<std::uint64_t>(epoch),
                              static_cast<std::uint64_t>(index) + 7);
    return static_cast<int>(h % 1000) < cfg_.fail_permille;
  }
  bool plain_error(std::int64_t epoch, std::int64_t index) const {
    const auto h = check::mix(cfg_.seed, static_cast<std::uint64_t>(epoch),
                              static_cast<std::uint64_t>(index) + 31);
    return static_cast<int>(h % 1000) < cfg_.error_permille;
  }
  static std::string plain_error_text(std::int64_t index) {
    return "plain error at index " + std::to_string(index);
  }
  bool hook_fails(std::int64_t epoch) const {
    const auto h = check::mix(cfg_.seed, static_cast<std::uint64_t>(epoch), 12345);
    return static_cast<int>(h % 1000) < cfg_.hook_fail_permille;
  }
  static std::uint8_t pattern(std::uint64_t base, std::size_t i) {
    return static_cast<std::uint8_t>((base >> ((i & 7) * 8)) ^ (i * 131 >> 3));
  }
  std::uint64_t pattern_base(std::int64_t index) const {
    return check::mix(cfg_.seed, static_cast<std::uint64_t>(index), 99);
  }
  // First byte that differs from the pattern of `index`, or -1.
  std::int64_t check_pattern(std::int64_t index, const std::byte* p, std::size_t n) const {
    const std::uint64_t base = pattern_base(index);
    for (std::size_t i = 0; i < n; ++i) {
      if (static_cast<std::uint8_t>(p[i]) != pattern(base, i)) return static_cast<std::int64_t>(i);
    }
    return -1;
  }

  // ---- Loader ----
  void thread_start(int worker) override {
    CHECK(worker >= 0 && worker < workers_);
    started.fetch_add(1, kRelaxed);
  }
  void thread_exit(int worker) noexcept override {
    CHECK(worker >= 0 && worker < workers_);
    CHECK_EQ(entered_[worker].load(kRelaxed), 0);
    exited.fetch_add(1, kRelaxed);
  }
  bool enter(int worker) override {
    CHECK_EQ(entered_[worker].load(kRelaxed), 0);
    if (cfg_.refuse_enter_after >= 0 &&
        admitted.fetch_add(1, kRelaxed) >= cfg_.refuse_enter_after) {
      refused.fetch_add(1, kRelaxed);
      return false;  // the host is shutting down: the worker must end
    }
    CHECK_EQ(entered_[worker].exchange(1, kRelaxed), 0);
    in_run_[worker].store(0, kRelaxed);
    enters.fetch_add(1, kRelaxed);
    return true;
  }
  void leave(int worker) override { CHECK_EQ(entered_[worker].exchange(0, kRelaxed), 1); }

  void prepare(int worker, Prepared& item) noexcept override {
    CHECK_EQ(entered_[worker].load(kRelaxed), 1);  // prepare runs between enter() and leave()
    // A run prepares at most min(EngineOptions::max_run, Loader::max_run()) positions.
    CHECK_LE(in_run_[worker].fetch_add(1, kRelaxed) + 1,
             std::min(cfg_.max_run, cfg_.engine_max_run));
    const Task t = item.task;
    CHECK(t.position >= 0 && t.position < cfg_.capacity);
    CHECK(t.epoch >= 0 && t.epoch < cfg_.capacity);
    CHECK_MSG(prepared[t.position].fetch_add(1, kRelaxed) == 0,
              "position " << t.position << " loaded twice");
    prep_seq[t.position].store(seq.fetch_add(1, kRelaxed), kRelaxed);
    prepares.fetch_add(1, kRelaxed);
    maybe_sleep(t.position, 1);
    if (cfg_.prepare_delay.count() > 0) std::this_thread::sleep_for(cfg_.prepare_delay);
    if (t.position == cfg_.slow_position) std::this_thread::sleep_for(cfg_.slow_delay);
    if (t.position == cfg_.gated_position) {
      while (!cfg_.gate_open->load(kRelaxed)) std::this_thread::sleep_for(1ms);
    }
    item.failed = fails(t.epoch, t.index);
    item.bytes = bytes_for(t.index);
    item.payload = std::make_unique<TestPayload>(t.index, t.epoch, item.failed);
    if (plain_error(t.epoch, t.index)) item.error = plain_error_text(t.index);
  }

  void fill(int worker, Prepared& item, std::byte* dst, std::size_t capacity) noexcept override {
    // fill runs outside enter()/leave(), but for small batches published early inside a run
    CHECK(entered_[worker].load(kRelaxed) == 0 || item.bytes <= pyloader::kEarlyPublishBytes);
    const Task t = item.task;
    if (item.failed) {
      // A failed batch gets no buffer (the core skips acquire() for it).
      CHECK(dst == nullptr);
    } else if (item.bytes == 0) {
      CHECK(dst == nullptr);
      CHECK_EQ(capacity, 0u);
    } else {
      CHECK(dst != nullptr);
      CHECK_GE(capacity, item.bytes);
      CHECK_EQ(reinterpret_cast<std::uintptr_t>(dst) % kPage, 0u);
      const std::uint64_t base = pattern_base(t.index);
      for (std::size_t i = 0; i < item.bytes; ++i) dst[i] = std::byte{pattern(base, i)};
    }
    maybe_sleep(t.position, 2);
    fill_seq[t.position].store(seq.fetch_add(1, kRelaxed), kRelaxed);
  }

  bool has_epoch_end() const noexcept override { return cfg_.hooks; }
  std::size_t max_run() const noexcept override { return cfg_.max_run; }

  std::unique_ptr<Payload> epoch_end(int worker, std::int64_t epoch) noexcept override {
    CHECK(cfg_.hooks);
    CHECK_EQ(entered_[worker].load(kRelaxed), 0);
    CHECK_MSG(hook_calls[epoch].fetch_add(1, kRelaxed) == 0,
              "hook of epoch " << epoch << " ran twice");
    hook_begin[epoch].store(seq.fetch_add(1, kRelaxed), kRelaxed);
    if (cfg_.hook_delay.count() > 0) std::this_thread::sleep_for(cfg_.hook_delay);
    maybe_sleep(epoch, 3);
    hook_end[epoch].store(seq.fetch_add(1, kRelaxed), kRelaxed);
    if (on_hook) on_hook(epoch);  // still inside the hook: the next epoch's gate is shut
    if (hook_fails(epoch)) return std::make_unique<TestPayload>(-1, epoch, true);
    return nullptr;
  }

  // Called at the end of each epoch hook, on the worker that runs it (set before start()).
  std::function<void(std::int64_t)> on_hook;

  std::atomic<int> started{0}, exited{0};
  std::atomic<std::int64_t> seq{0}, prepares{0}, enters{0}, refused{0}, admitted{0};

 private:
  void maybe_sleep(std::int64_t key, std::uint64_t salt) const {
    if (cfg_.sleep_permille == 0) return;
    const auto h = check::mix(cfg_.seed, static_cast<std::uint64_t>(key), salt);
    if (static_cast<int>(h % 1000) < cfg_.sleep_permille) {
      std::this_thread::sleep_for(std::chrono::microseconds((h >> 20) % (cfg_.max_sleep_us + 1)));
    } else if (h % 8 == 0) {
      std::this_thread::yield();
    }
  }

  const LoaderConfig cfg_;
  std::unique_ptr<std::atomic<int>[]> entered_;
  std::unique_ptr<std::atomic<std::size_t>[]> in_run_;  // positions prepared since enter()
  const int workers_;

 public:
  std::unique_ptr<std::atomic<std::int64_t>[]> prep_seq, fill_seq;
  std::unique_ptr<std::atomic<int>[]> prepared;
  std::unique_ptr<std::atomic<std::int64_t>[]> hook_begin, hook_end;
  std::unique_ptr<std::atomic<int>[]> hook_calls;
};

// A planned segment as the test sees it.
struct Seg {
  std::int64_t epoch = 0, start = 0;
  std::vector<std::int64_t> indices;
  bool gated = false;
  std::int64_t end() const { return start + static_cast<std::int64_t>(indices.size()); }
};

std::vector<std::int64_t> shuffled_plan(std::uint64_t seed, std::int64_t epoch, std::int64_t len,
                                        std::int64_t take) {
  std::vector<std::int64_t> idx(static_cast<std::size_t>(len));
  std::iota(idx.begin(), idx.end(), 0);
  std::mt19937_64 rng(check::mix(seed, static_cast<std::uint64_t>(epoch), 5));
  std::shuffle(idx.begin(), idx.end(), rng);
  idx.resize(static_cast<std::size_t>(take));
  return idx;
}

// Drops the engine (and what it still holds) and checks that every payload was destroyed.
void expect_every_payload_gone(std::shared_ptr<Engine>& engine) {
  engine.reset();
  CHECK_EQ(TestPayload::live(), 0);
}

// An engine over `loader` whose pool (1 GiB) never bounds these tests.
std::shared_ptr<Engine> make_engine(std::shared_ptr<pyloader::Loader> loader,
                                    const EngineOptions& options) {
  return Engine::create(options, BufferPool::create(std::size_t{1} << 30, PinRequest::kOff),
                        std::move(loader));
}

// Appends `epochs` gated epochs to the engine, each `take` shuffled indices out of `len`, and
// returns their segments.
std::vector<Seg> append_gated_epochs(Engine& engine, std::uint64_t seed, int epochs,
                                     std::int64_t len, std::int64_t take) {
  std::vector<Seg> segs;
  std::int64_t start = 0;
  for (int e = 0; e < epochs; ++e) {
    Seg s{e, start, shuffled_plan(seed, e, len, take), true};
    start = s.end();
    engine.append(s.epoch, s.indices, s.gated);
    segs.push_back(std::move(s));
  }
  return segs;
}

// Waits for the engine's next position in one of three ways, and takes it.
Delivery wait_and_take(Engine& e, std::mt19937_64& rng) {
  switch (rng() % 3) {
    case 0:
      while (!e.ready()) std::this_thread::yield();
      break;
    case 1:
      while (!e.wait_ready(std::chrono::microseconds(rng() % 300))) {
      }
      break;
    default:
      CHECK(e.wait_ready(std::chrono::seconds(60)));
  }
  return e.take();
}

// Checks a delivery of a position that was loaded (not skipped).
void verify_loaded(const TestLoader& loader, const Delivery& d, const Task& want, int workers) {
  CHECK_EQ(d.task.position, want.position);
  CHECK_EQ(d.task.epoch, want.epoch);
  CHECK_EQ(d.task.index, want.index);
  CHECK(!d.skipped);
  CHECK(d.worker >= 0 && d.worker < workers);
  CHECK_GE(d.load_ns, 0);
  CHECK_EQ(loader.prepared[want.position].load(kRelaxed), 1);
  if (loader.plain_error(want.epoch, want.index)) {
    // A plain-words error from prepare(): no payload, no buffer, no fill.
    CHECK_EQ(d.error, TestLoader::plain_error_text(want.index));
    CHECK(!d.out_of_memory);
    CHECK(!d.payload);
    CHECK(!d.buffer);
    CHECK_EQ(loader.fill_seq[want.position].load(kRelaxed), -1);
    return;
  }
  if (!d.error.empty()) {
    CHECK_EQ(loader.bytes_for(want.index), kHuge);
    CHECK(d.out_of_memory);
    CHECK(d.error.find("out of memory") != std::string::npos);
    CHECK(!d.payload);
    CHECK(!d.buffer);
    return;
  }
  CHECK(!d.out_of_memory);
  const bool failed = loader.fails(want.epoch, want.index);
  CHECK_EQ(d.failed, failed);
  const TestPayload* p = as_test(d.payload);
  CHECK(p != nullptr);
  CHECK_EQ(p->index, want.index);
  CHECK_EQ(p->epoch, want.epoch);
  CHECK_EQ(p->error, failed);
  const std::size_t bytes = loader.bytes_for(want.index);
  if (failed || bytes == 0) {
    CHECK(!d.buffer);
    return;
  }
  CHECK(d.buffer);
  CHECK_GE(d.buffer.capacity(), bytes);
  CHECK_EQ(reinterpret_cast<std::uintptr_t>(d.buffer.data()) % kPage, 0u);
  const std::int64_t bad = loader.check_pattern(want.index, d.buffer.data(), bytes);
  CHECK_MSG(bad < 0, "buffer of position " << want.position << " (index " << want.index
                                           << ") differs at byte " << bad);
}

// Every constraint of the epoch gates, from the loader's global sequence:
//   - the hook of a segment begins after every position of it was filled;
//   - a position is prepared only after the hooks that gate its segment have ended: segment s
//     opens after segment s-1 opened and, when s is gated, after s-1's hook ran.
void verify_gates(const TestLoader& loader, const std::vector<Seg>& segs, bool hooks) {
  for (std::size_t s = 0; s < segs.size(); ++s) {
    const Seg& seg = segs[s];
    if (seg.indices.empty()) {
      CHECK_EQ(loader.hook_calls[seg.epoch].load(kRelaxed), 0);  // empty: the owner's to call
      continue;
    }
    if (!hooks) {
      CHECK_EQ(loader.hook_calls[seg.epoch].load(kRelaxed), 0);
      continue;
    }
    CHECK_EQ(loader.hook_calls[seg.epoch].load(kRelaxed), 1);
    const std::int64_t begin = loader.hook_begin[seg.epoch].load(kRelaxed);
    for (std::int64_t p = seg.start; p < seg.end(); ++p) {
      const std::int64_t f = loader.fill_seq[p].load(kRelaxed);
      if (f >= 0) CHECK_MSG(f < begin, "position " << p << " filled after its epoch's hook began");
    }
    for (std::size_t u = 1; u <= s; ++u) {
      if (!segs[u].gated || segs[u - 1].indices.empty()) continue;
      const std::int64_t gate = loader.hook_end[segs[u - 1].epoch].load(kRelaxed);
      CHECK_GE(gate, 0);
      for (std::int64_t p = seg.start; p < seg.end(); ++p) {
        const std::int64_t q = loader.prep_seq[p].load(kRelaxed);
        if (q >= 0) {
          CHECK_MSG(q > gate, "position " << p << " (epoch " << seg.epoch
                                          << ") loaded before the hook of epoch "
                                          << segs[u - 1].epoch << " ended");
        }
      }
    }
  }
}

struct StressParams {
  int workers = 1;
  std::size_t depth = 1;
};

// One randomized run: a plan of shuffled epochs (some appended ahead, the rest appended by a
// planner thread while loading runs), random loads, hooks and failures; the consumer (which
// changes threads between epochs) checks every delivery; a monitor thread reads stats meanwhile.
void stress_round(std::uint64_t seed, const StressParams& sp) {
  std::mt19937_64 rng(seed);
  LoaderConfig cfg{.seed = seed};
  cfg.hooks = rng() % 3 != 0;
  cfg.fail_permille = static_cast<int>(rng() % 100);
  cfg.hook_fail_permille = cfg.hooks ? 400 : 0;
  cfg.sleep_permille = static_cast<int>(rng() % 150);
  cfg.max_sleep_us = 300;
  cfg.max_item_bytes = 1 + rng() % (3 * kPage);
  cfg.error_permille = rng() % 2 ? static_cast<int>(rng() % 50) : 0;
  const std::size_t loader_runs[] = {1, 2, 5, static_cast<std::size_t>(-1)};
  cfg.max_run = loader_runs[rng() % 4];
  const int kEpochs = 3 + static_cast<int>(rng() % 4);
  const std::int64_t kLen = 120;
  std::vector<Seg> segs;
  std::int64_t start = 0;
  for (int e = 0; e < kEpochs; ++e) {
    Seg s;
    s.epoch = e;
    s.start = start;
    const std::int64_t n = rng() % 10 == 0 ? 0 : 1 + static_cast<std::int64_t>(rng() % kLen);
    s.indices = shuffled_plan(seed, e, kLen, n);
    s.gated = rng() % 4 != 0;
    start = s.end();
    segs.push_back(std::move(s));
  }
  const std::size_t kHold = rng() % 4;  // batches the consumer keeps alive for a while
  const std::size_t item_max = (cfg.max_item_bytes + kPage - 1) / kPage * kPage;
  const std::size_t bound = rng() % 2 ? (sp.depth + kHold + 1) * item_max : std::size_t{1} << 30;

  EngineOptions opt;
  opt.workers = sp.workers;
  opt.depth = sp.depth;
  const std::chrono::nanoseconds budgets[] = {0ns, 50us, 200us, 2ms};
  opt.run_budget = budgets[rng() % 4];
  const std::size_t runs[] = {1, 3, 64};
  opt.max_run = runs[rng() % 3];
  cfg.engine_max_run = opt.max_run;
  std::printf(
      "  workers=%d depth=%zu epochs=%d positions=%lld hooks=%d fail=%d%% error=%d%% "
      "bound=%zu hold=%zu run_budget=%lldus max_run=%zu/%lld\n",
      sp.workers, sp.depth, kEpochs, static_cast<long long>(start), int(cfg.hooks),
      cfg.fail_permille / 10, cfg.error_permille / 10, bound, kHold,
      static_cast<long long>(opt.run_budget.count() / 1000), opt.max_run,
      static_cast<long long>(cfg.max_run));
  std::fflush(stdout);

  auto loader = std::make_shared<TestLoader>(cfg, sp.workers);
  auto pool = BufferPool::create(bound, PinRequest::kOff);
  auto engine = Engine::create(opt, pool, loader);
  const std::size_t ahead = 1 + rng() % segs.size();
  for (std::size_t s = 0; s < ahead; ++s) {
    engine->append(segs[s].epoch, segs[s].indices, segs[s].gated);
  }
  engine->start();
  std::thread planner([&, pseed = rng()] {
    std::mt19937_64 prng(pseed);
    for (std::size_t s = ahead; s < segs.size(); ++s) {
      std::this_thread::sleep_for(std::chrono::microseconds(prng() % 3000));
      engine->append(segs[s].epoch, segs[s].indices, segs[s].gated);
    }
  });
  std::atomic<bool> done{false};
  std::thread monitor([&] {
    std::mt19937_64 mrng(check::mix(seed, 77));
    while (!done.load(std::memory_order_acquire)) {
      const auto st = engine->stats().recent;
      for (const auto& e : st) CHECK_EQ(e.load_us.total(), static_cast<std::uint64_t>(e.batches));
      CHECK_GE(engine->worker_busy_ns(), 0);
      const std::int64_t end = engine->planned_end();
      if (end > 0) {
        const auto p = static_cast<std::int64_t>(mrng() % static_cast<std::uint64_t>(end));
        const Task t = engine->task_at(p);
        if (t.position != p) {  // pruned: behind the consumer (engine.h's NOTE)
          CHECK_EQ(t.position, -1);
          const auto kept = engine->segments();
          CHECK_LT(p, kept.front().start);
        }
      }
      CHECK_EQ(engine->task_at(start + 5).position, -1);
      (void)pool->info();
      (void)pool->waiting_for();
      std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  });

  std::deque<Delivery> held;
  std::int64_t delivered = 0;
  auto consume_segment = [&](const Seg& seg, std::uint64_t cseed) {
    std::mt19937_64 crng(cseed);
    for (std::int64_t p = seg.start; p < seg.end(); ++p) {
      CHECK_EQ(engine->next_position(), p);
      Delivery d = wait_and_take(*engine, crng);
      verify_loaded(*loader, d,
                    {p, seg.epoch, seg.indices[static_cast<std::size_t>(p - seg.start)]},
                    sp.workers);
      ++delivered;
      if (kHold > 0 && crng() % 2 == 0) held.push_back(std::move(d));
      while (held.size() > kHold || (!held.empty() && crng() % 4 == 0)) {
        // A kept batch is still intact: its buffer was not handed out again meanwhile.
        const Delivery& old = held.front();
        if (old.buffer) {
          CHECK_LT(loader->check_pattern(old.task.index, old.buffer.data(),
                                         loader->bytes_for(old.task.index)),
                   0);
        }
        held.pop_front();
      }
    }
    if (!seg.indices.empty() && cfg.hooks) {
      // Having taken the last position of the epoch, the consumer knows its hook has run.
      CHECK_EQ(loader->hook_calls[seg.epoch].load(kRelaxed), 1);
      auto err = engine->take_epoch_error(seg.epoch);
      CHECK_EQ(err != nullptr, loader->hook_fails(seg.epoch));
      if (err) {
        CHECK_EQ(as_test(err)->epoch, seg.epoch);
        CHECK(!engine->take_epoch_error(seg.epoch));  // once
      }
    }
  };
  for (const Seg& seg : segs) {
    const std::uint64_t cseed = rng();
    if (rng() % 3 == 0) {
      // The consumer role may move to another thread, one thread at a time.
      std::thread other([&] { consume_segment(seg, cseed); });
      other.join();
    } else {
      consume_segment(seg, cseed);
    }
  }
  planner.join();
  CHECK_EQ(delivered, start);
  CHECK_EQ(engine->planned_end(), start);
  CHECK(!engine->wait_ready(1ms));  // nothing more is planned
  done.store(true, std::memory_order_release);
  monitor.join();

  // Stats: one entry per non-empty epoch, in order, counting its batches.
  const std::vector<EpochStats> st = engine->stats().recent;
  std::size_t k = 0;
  for (const Seg& seg : segs) {
    if (seg.indices.empty()) continue;
    CHECK_LT(k, st.size());
    const EpochStats& e = st[k++];
    CHECK_EQ(e.epoch, seg.epoch);
    CHECK_EQ(e.batches, static_cast<std::int64_t>(seg.indices.size()));
    CHECK_EQ(e.load_us.total(), seg.indices.size());
    CHECK_GE(e.wait_ns, 0);
    CHECK_LE(e.first_ns, e.last_ns);
    CHECK_LE(e.busy_first_ns, e.busy_last_ns);
    CHECK_GE(e.peak_in_flight, 1);
    CHECK_LE(e.peak_in_flight, static_cast<std::int64_t>(sp.depth));
  }
  CHECK_EQ(k, st.size());

  engine->stop();
  engine->join();
  CHECK_EQ(loader->started.load(), sp.workers);
  CHECK_EQ(loader->exited.load(), sp.workers);
  verify_gates(*loader, segs, cfg.hooks);
  const auto info = pool->info();
  // The bound may be exceeded only by the position the consumer needs next, while later positions
  // (at most depth of them) hold buffers: then waiting would deadlock.
  CHECK_LE(info.peak_bytes, std::max(bound, item_max) + sp.depth * item_max);
  std::printf("    ok: prepares=%lld enters=%lld pool buffers=%zu peak=%zu allocations=%zu\n",
              static_cast<long long>(loader->prepares.load()),
              static_cast<long long>(loader->enters.load()), info.buffers, info.peak_bytes,
              info.allocations);
  held.clear();
  engine.reset();
  CHECK_EQ(pool->info().leased, 0u);
  CHECK_EQ(TestPayload::live(), 0);
}

// Runs `body` in a forked child and returns its wait status. For death tests: fork happens
// before this process starts any thread (each test runs in its own process).
template <class F>
int in_child(F body) {
  std::fflush(stdout);
  std::fflush(stderr);
  const pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    body();
    std::fflush(stdout);
    _exit(0);
  }
  int status = 0;
  CHECK_EQ(waitpid(pid, &status, 0), pid);
  return status;
}

}  // namespace

// Debug builds: two threads inside the consumer calls at once abort (SIGABRT). First in this file,
// so that the fork happens before any thread exists even when all tests run in one process.
TEST(consumer_role_guard_fires_on_two_threads) {
  check::test_seed();
#ifdef NDEBUG
  std::printf("  skipped: the guard exists only in debug builds (NDEBUG is set)\n");
#else
  const int status = in_child([] {
    LoaderConfig cfg;
    auto loader = std::make_shared<TestLoader>(cfg, 1);
    auto engine = Engine::create({}, BufferPool::create(1 << 20, PinRequest::kOff), loader);
    engine->start();
    // Nothing is planned: the first consumer sleeps in wait_ready(); a second one enters.
    std::thread first([&] { engine->wait_ready(std::chrono::seconds(5)); });
    std::this_thread::sleep_for(200ms);
    std::fprintf(stderr, "(expected) a second consumer thread enters; the guard should abort:\n");
    engine->wait_ready(1ms);
    std::fprintf(stderr, "guard did not fire\n");
    _exit(3);
  });
  CHECK_MSG(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT,
            "child status " << status << " (exited=" << WIFEXITED(status)
                            << " code=" << (WIFEXITED(status) ? WEXITSTATUS(status) : -1) << ")");
#endif
}

// Every position delivered exactly once, in order, with the right index and intact buffer, over
// workers 1..8 and depths 1..16, with epoch gates and hooks, failures, and variable sizes.
TEST(stress_ordered_exactly_once) {
  const std::uint64_t seed = check::test_seed();
  std::vector<StressParams> grid = {{1, 1}, {1, 16}, {2, 1}, {2, 3}, {3, 5},  {4, 2},
                                    {4, 8}, {4, 16}, {8, 1}, {8, 4}, {8, 16}, {6, 7}};
  std::mt19937_64 rng(seed);
  const std::int64_t extra = check::scaled(36);
  for (std::int64_t i = 0; i < extra; ++i) {
    grid.push_back({1 + static_cast<int>(rng() % 8), 1 + static_cast<std::size_t>(rng() % 16)});
  }
  for (std::size_t r = 0; r < grid.size(); ++r) stress_round(check::mix(seed, r), grid[r]);
}

// The hook of epoch e runs after all of e is loaded and before any of e+1 is; its error reaches
// take_epoch_error(e) once.
TEST(epoch_hook_gates_next_epoch) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.hooks = true;
  cfg.hook_fail_permille = 500;
  cfg.sleep_permille = 200;
  cfg.max_sleep_us = 500;
  cfg.hook_delay = 20ms;  // a slow hook: broken gating would let e+1 load meanwhile
  const int kWorkers = 4;
  auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
  auto engine = make_engine(loader, {.workers = kWorkers, .depth = 16});
  const std::vector<Seg> segs = append_gated_epochs(*engine, seed, 5, 30, 20);
  engine->start();
  std::mt19937_64 rng(seed);
  int errors = 0;
  for (const Seg& seg : segs) {
    for (std::int64_t p = seg.start; p < seg.end(); ++p) {
      Delivery d = wait_and_take(*engine, rng);
      verify_loaded(*loader, d,
                    {p, seg.epoch, seg.indices[static_cast<std::size_t>(p - seg.start)]}, kWorkers);
    }
    auto err = engine->take_epoch_error(seg.epoch);
    CHECK_EQ(err != nullptr, loader->hook_fails(seg.epoch));
    errors += err != nullptr;
    CHECK(!engine->take_epoch_error(seg.epoch));
  }
  std::printf("  %d of 5 hooks failed\n", errors);
  engine->stop();
  engine->join();
  verify_gates(*loader, segs, true);
  // The gate is tight: the first load of e+1 comes after the hook of e, not merely after its
  // last load.
  for (std::size_t s = 1; s < segs.size(); ++s) {
    std::int64_t first = std::numeric_limits<std::int64_t>::max();
    for (std::int64_t p = segs[s].start; p < segs[s].end(); ++p) {
      first = std::min(first, loader->prep_seq[p].load());
    }
    CHECK_GT(first, loader->hook_end[segs[s - 1].epoch].load());
  }
  expect_every_payload_gone(engine);
}

// replan() from inside the hook of epoch 0 resizes epoch 1, which is gated on it and shut: workers
// waiting for positions past its new end load them for epoch 2 instead; every position is loaded
// once, with the new plan. Once the gate is open (or for another epoch), replan() refuses.
TEST(replan_resizes_the_shut_segment_from_the_hook_before_it) {
  const std::uint64_t seed = check::test_seed();
  for (const std::int64_t resized : {25, 3, 0}) {
    LoaderConfig cfg{.seed = seed};
    cfg.hooks = true;
    cfg.sleep_permille = 200;
    cfg.max_sleep_us = 300;
    const int kWorkers = 4;
    auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
    auto engine = make_engine(loader, {.workers = kWorkers, .depth = 8});
    Engine* raw = engine.get();  // the loader must not own its engine
    const std::vector<std::int64_t> plan0 = shuffled_plan(seed, 0, 40, 10);
    const std::vector<std::int64_t> stale = shuffled_plan(seed, 1, 40, 10);
    const std::vector<std::int64_t> plan1 = shuffled_plan(seed, 11, 40, resized);
    const std::vector<std::int64_t> plan2 = shuffled_plan(seed, 2, 40, 7);
    std::atomic<int> replanned{0};
    loader->on_hook = [&](std::int64_t epoch) {
      if (epoch != 0) return;
      CHECK(!raw->replan(0, plan1));  // not the last segment
      CHECK(raw->replan(1, plan1));
      replanned.fetch_add(1, kRelaxed);
    };
    engine->append(0, plan0, false);
    engine->append(1, stale, true);
    engine->start();
    std::mt19937_64 rng(seed);
    for (std::int64_t p = 0; p < 10; ++p) {
      verify_loaded(*loader, wait_and_take(*engine, rng), {p, 0, plan0[p]}, kWorkers);
    }
    CHECK_EQ(replanned.load(kRelaxed), 1);
    CHECK_EQ(engine->planned_end(), 10 + resized);
    CHECK(!engine->replan(1, stale));  // open now
    engine->append(2, plan2, true);
    for (std::int64_t p = 10; p < 10 + resized; ++p) {
      verify_loaded(*loader, wait_and_take(*engine, rng), {p, 1, plan1[p - 10]}, kWorkers);
    }
    // An empty epoch 1 has no last load: its hook is the owner's to call, and epoch 2 is open.
    CHECK_EQ(loader->hook_calls[1].load(), resized > 0 ? 1 : 0);
    for (std::int64_t p = 10 + resized; p < 17 + resized; ++p) {
      verify_loaded(*loader, wait_and_take(*engine, rng), {p, 2, plan2[p - 10 - resized]},
                    kWorkers);
    }
    CHECK(!engine->wait_ready(1ms));
    engine->stop();
    engine->join();
    loader->on_hook = nullptr;
    for (std::int64_t p = 0; p < 17 + resized; ++p) CHECK_EQ(loader->prepared[p].load(), 1);
    expect_every_payload_gone(engine);
  }
}

// A planner that appends each epoch as the consumer reaches the one before (as the Prefetcher
// does) leaves at most three segments in the engine, however many epochs run; the epoch just
// finished keeps its hook error, and a pruned position has no task.
TEST(append_prunes_segments_behind_the_consumer) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.hooks = true;
  cfg.hook_fail_permille = 1000;
  const int kWorkers = 2;
  auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
  auto engine = make_engine(loader, {.workers = kWorkers, .depth = 4});
  const int kEpochs = 300;
  const std::int64_t kLen = 3;
  auto plan = [&](int e) { return shuffled_plan(seed, e, 10, kLen); };
  engine->append(0, plan(0), false);
  engine->append(1, plan(1), true);
  engine->start();
  std::mt19937_64 rng(seed);
  std::size_t most = 0;
  for (int e = 0; e < kEpochs; ++e) {
    const std::vector<std::int64_t> indices = plan(e);
    for (std::int64_t k = 0; k < kLen; ++k) {
      const std::int64_t p = e * kLen + k;
      verify_loaded(*loader, wait_and_take(*engine, rng), {p, e, indices[k]}, kWorkers);
    }
    if (e + 2 < kEpochs) engine->append(e + 2, plan(e + 2), true);  // the next pass plans ahead
    auto err = engine->take_epoch_error(e);
    CHECK(err != nullptr);
    CHECK_EQ(as_test(err)->epoch, e);
    const auto kept = engine->segments();
    most = std::max(most, kept.size());
    if (e + 2 < kEpochs) {  // append() pruned: the epoch just finished is the first kept
      CHECK_EQ(kept.front().epoch, e);
      if (e >= 1) CHECK_EQ(engine->task_at((e - 1) * kLen).position, -1);
    }
  }
  std::printf("  at most %zu segments kept over %d epochs\n", most, kEpochs);
  CHECK_LE(most, 3u);
  engine->stop();
  engine->join();
  expect_every_payload_gone(engine);
}

// stats() keeps stats_window epochs in detail and merges the older ones into `earlier`; each
// record's load-time histogram counts its batches.
TEST(stats_keep_a_window_and_merge_older_epochs) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  const int kWorkers = 2;
  auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
  auto engine = make_engine(loader, {.workers = kWorkers, .depth = 4, .stats_window = 4});
  const int kEpochs = 10;
  const std::int64_t kLen = 5;
  for (int e = 0; e < kEpochs; ++e) engine->append(e, shuffled_plan(seed, e, 10, kLen), false);
  engine->start();
  std::mt19937_64 rng(seed);
  for (std::int64_t p = 0; p < kEpochs * kLen; ++p) (void)wait_and_take(*engine, rng);
  const pyloader::StatsWindow st = engine->stats();
  CHECK_EQ(st.recent.size(), 4u);
  for (std::size_t k = 0; k < st.recent.size(); ++k) {
    const EpochStats& e = st.recent[k];
    CHECK_EQ(e.epoch, static_cast<std::int64_t>(kEpochs - 4 + k));
    CHECK_EQ(e.first_epoch, e.epoch);
    CHECK_EQ(e.epochs, 1);
    CHECK_EQ(e.batches, kLen);
    CHECK_EQ(e.load_us.total(), static_cast<std::uint64_t>(kLen));
  }
  CHECK_EQ(st.earlier.epochs, kEpochs - 4);
  CHECK_EQ(st.earlier.first_epoch, 0);
  CHECK_EQ(st.earlier.epoch, kEpochs - 5);
  CHECK_EQ(st.earlier.batches, (kEpochs - 4) * kLen);
  CHECK_EQ(st.earlier.load_us.total(), static_cast<std::uint64_t>((kEpochs - 4) * kLen));
  CHECK_GE(st.earlier.wall_ns(), 0);
  CHECK_GE(st.earlier.busy_ns(), 0);
  engine->stop();
  engine->join();
  expect_every_payload_gone(engine);
}

// Every uint32 value lies in its bucket; a log-scale bucket is at most 1/16 of its low end wide.
TEST(load_histogram_buckets_hold_their_values) {
  std::mt19937_64 rng(check::test_seed());
  auto check_value = [](std::uint32_t v) {
    const std::size_t b = LoadHistogram::bucket_of(v);
    CHECK_LT(b, LoadHistogram::kBuckets);
    const std::uint64_t lo = LoadHistogram::bucket_low(b), hi = LoadHistogram::bucket_low(b + 1);
    CHECK_LE(lo, v);
    CHECK_LT(v, hi);
    if (v >= LoadHistogram::kExact) CHECK_LE((hi - lo) * LoadHistogram::kSub, lo);
  };
  for (std::uint32_t v = 0; v < 5000; ++v) check_value(v);
  for (int i = 0; i < 100000; ++i) check_value(static_cast<std::uint32_t>(rng()));
  check_value(std::numeric_limits<std::uint32_t>::max());
  LoadHistogram h;
  for (std::uint32_t v = 0; v < 100; ++v) h.record(v);
  LoadHistogram g;
  g.merge(h);
  g.merge(h);
  CHECK_EQ(g.total(), 200u);
  CHECK_EQ(g.counts()[LoadHistogram::bucket_of(7)], 2u);
}

// skip_to() before start: positions below it are delivered skipped and never loaded; the epoch
// hooks still run (the gates open); stats count only loaded batches.
TEST(skip_to_before_start) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.hooks = true;
  const int kWorkers = 3;
  auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
  auto engine = make_engine(loader, {.workers = kWorkers, .depth = 4});
  const std::vector<Seg> segs = append_gated_epochs(*engine, seed, 3, 20, 10);
  const std::int64_t kSkip = 14;  // all of epoch 0 and 4 positions of epoch 1
  engine->skip_to(kSkip);
  engine->skip_to(3);  // never lowers it
  engine->start();
  std::mt19937_64 rng(seed);
  for (const Seg& seg : segs) {
    for (std::int64_t p = seg.start; p < seg.end(); ++p) {
      Delivery d = wait_and_take(*engine, rng);
      const std::int64_t index = seg.indices[static_cast<std::size_t>(p - seg.start)];
      if (p < kSkip) {
        CHECK(d.skipped);
        CHECK_EQ(d.task.position, p);
        CHECK_EQ(d.task.epoch, seg.epoch);
        CHECK_EQ(d.task.index, index);
        CHECK(!d.payload);
        CHECK(!d.buffer);
        CHECK(!d.failed);
        CHECK(d.error.empty());
        CHECK_EQ(loader->prepared[p].load(), 0);
      } else {
        verify_loaded(*loader, d, {p, seg.epoch, index}, kWorkers);
      }
    }
  }
  engine->stop();
  engine->join();
  CHECK_EQ(loader->prepares.load(), segs.back().end() - kSkip);
  for (const Seg& seg : segs) CHECK_EQ(loader->hook_calls[seg.epoch].load(), 1);
  const auto st = engine->stats().recent;
  CHECK_EQ(st.size(), 2u);  // epoch 0 was skipped entirely
  CHECK_EQ(st[0].epoch, 1);
  CHECK_EQ(st[0].batches, 6);
  CHECK_EQ(st[1].epoch, 2);
  CHECK_EQ(st[1].batches, 10);
  expect_every_payload_gone(engine);
}

// skip_to() while loading: positions already loaded are delivered as loaded, the rest below the
// mark skipped; nothing at or past the mark is skipped.
TEST(skip_to_while_running) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.prepare_delay = 2ms;
  const int kWorkers = 2;
  auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
  auto engine = make_engine(loader, {.workers = kWorkers, .depth = 4, .max_run = 1});
  const auto plan = shuffled_plan(seed, 0, 80, 80);
  engine->append(0, plan, false);
  engine->start();
  std::mt19937_64 rng(seed);
  std::int64_t p = 0;
  for (; p < 10; ++p)
    verify_loaded(*loader, wait_and_take(*engine, rng), {p, 0, plan[p]}, kWorkers);
  const std::int64_t mark = p + 40;
  engine->skip_to(mark);
  engine->skip_to(p + 5);
  std::int64_t skipped = 0;
  for (; p < 80; ++p) {
    Delivery d = wait_and_take(*engine, rng);
    if (d.skipped) {
      CHECK_LT(p, mark);
      CHECK_EQ(d.task.position, p);
      CHECK_EQ(d.task.index, plan[p]);
      CHECK(!d.payload);
      CHECK_EQ(loader->prepared[p].load(), 0);
      ++skipped;
    } else {
      verify_loaded(*loader, d, {p, 0, plan[p]}, kWorkers);
    }
  }
  std::printf("  skipped %lld of the 40 positions below the mark\n",
              static_cast<long long>(skipped));
  // Only positions already claimed when skip_to() ran (at most depth + workers) can be loaded.
  CHECK_GE(skipped, 40 - static_cast<std::int64_t>(engine->depth()) - 2 * kWorkers);
  const auto st = engine->stats().recent;
  CHECK_EQ(st.size(), 1u);
  CHECK_EQ(st[0].batches, 80 - skipped);
  engine->stop();
  engine->join();
  expect_every_payload_gone(engine);
}

namespace {
// Starts an engine, lets `setup` make its workers block, then checks that stop() + join() return
// promptly, and that destroying the engine releases every payload and buffer.
struct StopFixture {
  std::shared_ptr<TestLoader> loader;
  std::shared_ptr<BufferPool> pool;
  std::shared_ptr<Engine> engine;
  StopFixture(const LoaderConfig& cfg, const EngineOptions& opt, std::size_t bound) {
    loader = std::make_shared<TestLoader>(cfg, opt.workers);
    pool = BufferPool::create(bound, PinRequest::kOff);
    engine = Engine::create(opt, pool, loader);
  }
  double stop_promptly(double limit = 2.0) {
    const auto t0 = check::Clock::now();
    engine->stop();
    engine->join();
    const double took = check::seconds_since(t0);
    std::printf("  stop() + join() took %.1f ms\n", took * 1e3);
    CHECK_LT(took, limit);
    CHECK(engine->stopping());
    CHECK_EQ(loader->exited.load(), engine->workers());
    engine->stop();  // idempotent
    engine->join();
    return took;
  }
  // Epoch 0 of `batches` positions in a seeded order, then the workers: returns the order.
  std::vector<std::int64_t> start(std::uint64_t seed, std::int64_t batches) {
    std::vector<std::int64_t> plan = shuffled_plan(seed, 0, batches, batches);
    engine->append(0, plan, false);
    engine->start();
    return plan;
  }
  void destroy_and_check_nothing_leaks() {
    std::weak_ptr<Engine> weak = engine;
    engine.reset();
    CHECK(weak.expired());
    CHECK_EQ(pool->info().leased, 0u);
    CHECK_EQ(TestPayload::live(), 0);
  }
};

// A StopFixture whose `workers` workers are all inside a prepare() that takes `delay`, on an
// epoch of `batches` positions.
StopFixture all_loading(std::chrono::milliseconds delay, int workers, std::int64_t batches) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.prepare_delay = delay;
  StopFixture f(cfg, {.workers = workers, .depth = 4}, std::size_t{1} << 30);
  f.start(seed, batches);
  CHECK(check::eventually([&] { return f.loader->prepares.load() >= workers; }));
  return f;
}
}  // namespace

// Workers blocked because the ring is full (nobody consumes): stop() returns them, and the
// published but undelivered batches are released with the engine.
TEST(stop_while_ring_full_and_destroy_undelivered) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.zero_bytes_permille = 0;
  StopFixture f(cfg, {.workers = 4, .depth = 3}, std::size_t{1} << 30);
  f.start(seed, 100);
  CHECK(f.engine->wait_ready(10s));
  // Depth 3 fills; the 4 workers then sleep on ring slots.
  CHECK(check::eventually([&] {
    return f.loader->fill_seq[0].load() >= 0 && f.loader->fill_seq[1].load() >= 0 &&
           f.loader->fill_seq[2].load() >= 0;
  }));
  std::this_thread::sleep_for(50ms);
  CHECK_EQ(f.loader->prepares.load(), 3);
  CHECK_EQ(TestPayload::live(), 3);  // in the ring
  CHECK_EQ(f.pool->info().leased, 3u);
  f.stop_promptly();
  CHECK(!f.engine->wait_ready(10s));  // stopped: returns at once
  f.destroy_and_check_nothing_leaks();
}

// Workers blocked waiting for a plan (nothing appended yet, or the plan ran out), and a consumer
// blocked in wait_ready(forever): stop() wakes all of them.
TEST(stop_while_waiting_for_plan) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  StopFixture f(cfg, {.workers = 3, .depth = 8}, std::size_t{1} << 30);
  f.engine->start();
  f.engine->append(0, {0, 1}, false);
  std::atomic<int> outcome{-1};
  std::thread consumer([&] {
    std::mt19937_64 rng(seed);
    for (std::int64_t p = 0; p < 2; ++p) wait_and_take(*f.engine, rng);
    outcome.store(f.engine->wait_ready(kForever) ? 1 : 0);
  });
  std::this_thread::sleep_for(100ms);
  CHECK_EQ(outcome.load(), -1);  // the consumer is really blocked
  f.stop_promptly();
  consumer.join();
  CHECK_EQ(outcome.load(), 0);
  f.destroy_and_check_nothing_leaks();
}

// Workers blocked in the buffer pool at its bound (nobody takes their batches): stop() cancels
// their wait at once; the pool said meanwhile how long they had waited.
TEST(stop_while_waiting_in_pool) {
  const std::uint64_t seed = check::test_seed();
  double best = 1e9;
  for (int trial = 0; trial < 3; ++trial) {
    LoaderConfig cfg;
    cfg.seed = seed;
    cfg.fixed_bytes = kPage;
    EngineOptions opt;
    opt.workers = 3;
    opt.depth = 8;
    StopFixture f(cfg, opt, 2 * kPage);  // room for two batches
    f.engine->append(0, shuffled_plan(seed, 0, 50, 50), false);
    f.engine->start();
    CHECK(check::eventually([&] { return f.pool->waiting_for() > 0ns; }));
    // Two batches fill the bound; the worker of the position the consumer needs next may take a
    // third past it (it could otherwise wait forever), when the other two got their buffers first.
    const std::size_t leased = f.pool->info().leased;
    CHECK_GE(leased, 2u);
    CHECK_LE(leased, 3u);
    if (trial == 0) {
      std::this_thread::sleep_for(30ms);
      CHECK_GE(f.pool->waiting_for(), 20ms);
      f.stop_promptly();
    } else {
      // Stopped just after a worker started to wait: only stop()'s wake-up can end its sleep.
      best = std::min(best, f.stop_promptly());
    }
    CHECK_EQ(f.pool->waiting_for().count(), 0);
    f.destroy_and_check_nothing_leaks();
  }
  // stop() wakes the waiters at once (the pool has no re-check timer to fall back on).
  CHECK_LT(best, 0.06);
}

// A worker inside the Loader finishes its call, then returns.
TEST(stop_while_in_loader) {
  StopFixture f = all_loading(300ms, 2, 10);
  f.stop_promptly(2.0);
  CHECK_LE(f.loader->prepares.load(), 2 + 2);  // no new loads after stop() beyond a run's first
  f.destroy_and_check_nothing_leaks();
}

// A worker stuck inside the Loader (a __getitem__ that never returns) does not hold up a bounded
// join: join_for() abandons it and reports what it is doing; the abandoned thread keeps the engine
// alive until its call returns, then ends on its own and destroys the engine, leaking nothing.
TEST(join_for_abandons_a_worker_stuck_in_the_loader) {
  const std::uint64_t seed = check::test_seed();
  std::atomic<bool> gate_open{false};
  LoaderConfig cfg{.seed = seed};
  cfg.gated_position = 3;  // ignores stop(): only the gate ends its call
  cfg.gate_open = &gate_open;
  StopFixture f(cfg, {.workers = 2, .depth = 4}, std::size_t{1} << 30);
  const std::vector<std::int64_t> plan = f.start(seed, 10);
  std::mt19937_64 rng(seed);
  for (std::int64_t p = 0; p < 3; ++p) CHECK_EQ(wait_and_take(*f.engine, rng).task.position, p);
  const auto stuck_on_3 = [&] {
    for (const pyloader::WorkerActivity& a : f.engine->activity()) {
      if (a.phase == pyloader::WorkerPhase::kLoading && a.task.position == 3) return true;
    }
    return false;
  };
  CHECK(check::eventually(stuck_on_3));
  f.engine->stop();
  const auto t0 = check::Clock::now();
  const std::vector<pyloader::WorkerActivity> abandoned = f.engine->join_for(50ms);
  std::printf("  join_for(50 ms) took %.1f ms\n", check::seconds_since(t0) * 1e3);
  CHECK_EQ(abandoned.size(), 1u);
  const pyloader::WorkerActivity& a = abandoned[0];
  CHECK(a.phase == pyloader::WorkerPhase::kLoading);
  CHECK_EQ(a.task.position, 3);
  CHECK_EQ(a.task.index, plan[3]);
  CHECK_GE(a.elapsed, 50ms);
  const std::string words = f.engine->describe(a);
  CHECK_MSG(words.find("worker thread " + std::to_string(a.worker) + ", inside loading index " +
                       std::to_string(plan[3]) + " (epoch 0, for ") == 0,
            words);
  CHECK(f.engine->join_for(50ms).empty());  // idempotent: nothing left to join
  CHECK_EQ(f.loader->exited.load(), 1);     // the other worker ended and was joined
  std::weak_ptr<Engine> weak = f.engine;
  f.engine.reset();
  CHECK(!weak.expired());  // the abandoned worker holds it
  gate_open.store(true, kRelaxed);
  // The last reference goes on the worker's thread, which then runs ~Engine: a weak_ptr expires
  // before the destructor has freed the ring's deliveries, so wait for those too.
  CHECK(check::eventually([&] { return weak.expired(); }));
  CHECK(check::eventually(
      [&] { return TestPayload::live() == 0 && f.pool->info().leased == 0; }));  // ~Engine ran
  CHECK_EQ(f.loader->exited.load(), 2);
}

// The abandoned worker was loading its epoch's last position: when its call returns after the
// stop it runs no epoch hook (the owner may have run it itself meanwhile).
TEST(an_abandoned_worker_runs_no_epoch_hook_when_its_call_returns) {
  const std::uint64_t seed = check::test_seed();
  std::atomic<bool> gate_open{false};
  LoaderConfig cfg{.seed = seed, .hooks = true};
  cfg.gated_position = 3;  // the last position of epoch 0
  cfg.gate_open = &gate_open;
  cfg.zero_bytes_permille = 1000;  // no buffer to wait for after the stop: straight to the hook
  StopFixture f(cfg, {.workers = 2, .depth = 4}, std::size_t{1} << 30);
  f.start(seed, 4);
  std::mt19937_64 rng(seed);
  for (std::int64_t p = 0; p < 3; ++p) CHECK_EQ(wait_and_take(*f.engine, rng).task.position, p);
  CHECK(check::eventually([&] { return f.loader->prepares.load() == 4; }));
  f.engine->stop();
  CHECK_EQ(f.engine->join_for(20ms).size(), 1u);
  std::weak_ptr<Engine> weak = f.engine;
  f.engine.reset();
  gate_open.store(true, kRelaxed);
  CHECK(check::eventually([&] { return weak.expired(); }));
  CHECK(check::eventually([&] { return TestPayload::live() == 0; }));  // ~Engine ran (see above)
  CHECK_EQ(f.loader->hook_calls[0].load(kRelaxed), 0);
}

// join_for() of workers that all end within the grace joins them all and abandons none.
TEST(join_for_joins_workers_that_end_in_time) {
  StopFixture f = all_loading(100ms, 3, 20);
  f.engine->stop();
  CHECK(f.engine->join_for(10s).empty());
  CHECK_EQ(f.loader->exited.load(), 3);
  f.destroy_and_check_nothing_leaks();
}

// A batch whose buffer the OS refuses arrives as an error at its position; the others load.
TEST(out_of_memory_is_delivered_as_error) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  const auto plan = shuffled_plan(seed, 0, 20, 20);
  cfg.oom_index = plan[7];
  const int kWorkers = 2;
  auto loader = std::make_shared<TestLoader>(cfg, kWorkers);
  EngineOptions opt;
  opt.workers = kWorkers;
  opt.depth = 4;
  auto engine =
      Engine::create(opt, BufferPool::create(std::size_t{1} << 48, PinRequest::kOff), loader);
  engine->append(0, plan, false);
  engine->start();
  std::mt19937_64 rng(seed);
  for (std::int64_t p = 0; p < 20; ++p) {
    Delivery d = wait_and_take(*engine, rng);
    verify_loaded(*loader, d, {p, 0, plan[p]}, kWorkers);
    CHECK_EQ(!d.error.empty(), p == 7);
    if (p == 7) std::printf("  error: %s\n", d.error.c_str());
  }
  engine->stop();
  engine->join();
  expect_every_payload_gone(engine);
}

// enter() returning false (the host is shutting down) ends that worker: with one worker, the
// positions loaded before are delivered and the thread ends on its own, without a stop().
TEST(enter_refused_ends_workers) {
  const std::uint64_t seed = check::test_seed();
  for (int workers : {1, 3}) {
    LoaderConfig cfg;
    cfg.seed = seed;
    cfg.refuse_enter_after = 5;
    EngineOptions opt;
    opt.workers = workers;
    opt.depth = 4;
    opt.max_run = 1;
    auto loader = std::make_shared<TestLoader>(cfg, opt.workers);
    auto pool = BufferPool::create(std::size_t{1} << 30, PinRequest::kOff);
    auto engine = Engine::create(opt, pool, loader);
    const auto plan = shuffled_plan(seed, 0, 100, 100);
    engine->append(0, plan, false);
    engine->start();
    std::int64_t p = 0;
    while (engine->wait_ready(300ms)) {
      verify_loaded(*loader, engine->take(), {p, 0, plan[static_cast<std::size_t>(p)]}, workers);
      ++p;
    }
    std::printf("  workers=%d: %lld positions delivered, %lld workers refused\n", workers,
                static_cast<long long>(p), static_cast<long long>(loader->refused.load()));
    CHECK_EQ(loader->enters.load(), 5);
    CHECK_LE(p, 5);
    if (workers == 1) {
      // Exactly the five entered positions, and the thread ended without stop().
      CHECK_EQ(p, 5);
      CHECK(check::eventually([&] { return loader->exited.load() == 1; }));
      CHECK_EQ(loader->refused.load(), 1);
      CHECK(!engine->stopping());
    } else {
      // Refusals can leave a gap (a later position was entered first): other workers may then
      // wait on ring slots, and stop() ends them.
      CHECK_GE(loader->refused.load(), 1);
      engine->stop();
    }
    const auto t0 = check::Clock::now();
    engine->join();
    CHECK_LT(check::seconds_since(t0), 2.0);
    CHECK_EQ(loader->exited.load(), workers);
    engine.reset();
    CHECK_EQ(TestPayload::live(), 0);
    CHECK_EQ(pool->info().leased, 0u);
  }
}

// Formerly a deadlock: with max_bytes below depth batches, workers of later positions could take
// every buffer the bound allows and publish them out of order, and the worker of the position the
// consumer needs next waited at the bound forever although the consumer kept nothing.
// A pool bound below depth: later positions may take every buffer first; the position the
// consumer needs next then grows the pool instead of waiting forever.
TEST(pool_bound_below_depth_never_deadlocks) {
  const std::uint64_t seed = check::test_seed();
  LoaderConfig cfg{.seed = seed};
  cfg.fixed_bytes = kPage;
  cfg.slow_position = 0;  // positions 1 and 2 take both buffers first
  cfg.slow_delay = 200ms;
  EngineOptions opt;
  opt.workers = 3;
  opt.depth = 4;
  opt.max_run = 1;
  auto loader = std::make_shared<TestLoader>(cfg, opt.workers);
  auto pool = BufferPool::create(2 * kPage, PinRequest::kOff);  // room for 2 batches < depth 4
  auto engine = Engine::create(opt, pool, loader);
  const auto plan = shuffled_plan(seed, 0, 20, 20);
  engine->append(0, plan, false);
  engine->start();
  for (std::int64_t p = 0; p < 20; ++p) {
    const bool ok = engine->wait_ready(3s);
    if (!ok) {
      const auto info = pool->info();
      std::printf(
          "  stuck at position %lld: %zu of %zu buffers leased (by later positions), "
          "a worker has waited %.1f s\n",
          static_cast<long long>(p), info.leased, info.buffers,
          std::chrono::duration<double>(pool->waiting_for()).count());
      engine->stop();
      engine->join();
    }
    CHECK_MSG(ok, "the consumer, keeping nothing, waits forever for position " << p);
    verify_loaded(*loader, engine->take(), {p, 0, plan[static_cast<std::size_t>(p)]},
                  opt.workers);  // dropped at once
  }
  engine->stop();
  engine->join();
}

// The consumer's advance is a change that a worker waiting in the pool must see: the worker of
// the next position checks may_exceed (false: the consumer has not taken the position before it)
// and, before it sleeps, the consumer takes that position. take() must wake it (buffer_pool.h,
// B1 pairs with B2): nothing else would, since the consumer keeps the batch it took and then
// waits for this very position. The pool's test hook holds the worker in the window until the
// take has returned.
TEST(take_wakes_a_worker_that_checked_before_it) {
  const std::uint64_t seed = check::test_seed();
  std::atomic<bool> gate{false};
  LoaderConfig cfg{.seed = seed};
  cfg.fixed_bytes = kPage;
  cfg.gated_position = 1;  // positions 0 and 2 take both buffers first
  cfg.gate_open = &gate;
  cfg.engine_max_run = 1;
  EngineOptions opt;
  opt.workers = 2;
  opt.depth = 4;
  opt.max_run = 1;  // no early publish: every buffer comes from acquire()
  auto loader = std::make_shared<TestLoader>(cfg, opt.workers);
  auto pool = BufferPool::create(2 * kPage, PinRequest::kOff);  // room for two batches
  // The test's handshake is relaxed: only the engine and the pool may order the take before the
  // worker's re-check.
  std::atomic<int> in_window{0};
  std::atomic<bool> taken{false};
  pool->set_before_sleep_hook([&](std::int64_t priority) {
    if (priority != 1 || in_window.fetch_add(1, kRelaxed) != 0) return;
    // Between the check that made position 1 wait and its sleep: let the consumer take 0.
    check::eventually([&] { return taken.load(kRelaxed); }, 30.0);
  });
  auto engine = Engine::create(opt, pool, loader);
  const auto plan = shuffled_plan(seed, 0, 3, 3);
  engine->append(0, plan, false);
  engine->start();
  CHECK(check::eventually([&] {
    return loader->fill_seq[0].load(kRelaxed) >= 0 && loader->fill_seq[2].load(kRelaxed) >= 0;
  }));
  CHECK_EQ(pool->info().leased, 2u);
  gate.store(true, kRelaxed);  // position 1 is prepared and waits at the bound
  CHECK(check::eventually([&] { return in_window.load(kRelaxed) == 1; }, 30.0));
  CHECK(engine->wait_ready(30s));
  Delivery first = engine->take();  // kept: its buffer does not come back
  verify_loaded(*loader, first, {0, 0, plan[0]}, opt.workers);
  taken.store(true, kRelaxed);
  const bool woken = engine->wait_ready(30s);
  if (!woken) {
    engine->stop();
    engine->join();
  }
  CHECK_MSG(woken, "position 1 never came: its worker slept through the consumer's advance");
  verify_loaded(*loader, engine->take(), {1, 0, plan[1]}, opt.workers);
  // It grew the pool past its bound (position 2 held the other buffer): it had no other way.
  CHECK_EQ(pool->info().bytes, 3 * kPage);
  CHECK_EQ(in_window.load(kRelaxed), 1);  // it slept at most once, and never again
  CHECK(engine->wait_ready(30s));
  verify_loaded(*loader, engine->take(), {2, 0, plan[2]}, opt.workers);
  engine->stop();
  engine->join();
  first = Delivery{};
  engine.reset();
  CHECK_EQ(pool->info().leased, 0u);
  CHECK_EQ(TestPayload::live(), 0);
}

// Engine options are validated.
TEST(invalid_options_throw) {
  check::test_seed();
  auto loader = std::make_shared<TestLoader>(LoaderConfig{}, 1);
  auto pool = BufferPool::create(1 << 20, PinRequest::kOff);
  for (auto [workers, depth] : {std::pair{0, std::size_t{2}}, std::pair{1, std::size_t{0}}}) {
    EngineOptions opt;
    opt.workers = workers;
    opt.depth = depth;
    bool threw = false;
    try {
      Engine::create(opt, pool, loader);
    } catch (const std::invalid_argument&) {
      threw = true;
    }
    CHECK(threw);
  }
}

TEST_MAIN()
