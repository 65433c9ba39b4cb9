// Tests of OrderedRing<T> (ring.h): ordered multi-producer hand-off by ticket.
#include <array>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include "../core/ring.h"
#include "check.h"

using check::Tracker;
using pyloader::OrderedRing;
using namespace std::chrono_literals;

namespace {

// Per-position state of the exactly-once table (concurrentqueue's fuzz test keeps the same):
// 0 = unclaimed, 1 = published by exactly one producer, 2 = consumed once, in order.
enum : std::uint8_t { kUnclaimed = 0, kPublished = 1, kConsumed = 2 };

void random_pause(std::mt19937_64& rng) {
  const auto r = rng() % 256;
  if (r < 4) {
    std::this_thread::sleep_for(std::chrono::microseconds(rng() % 200));
  } else if (r < 32) {
    std::this_thread::yield();
  }
}

// One stress run: `producers` threads claim (claim or try_claim, at random) and publish
// positions [0, n) of a ring of `depth`; one consumer takes them in order.
void stress(std::uint64_t seed, std::size_t depth, int producers, std::int64_t n) {
  const std::int64_t live_before = Tracker::live();
  {
    OrderedRing<Tracker> ring(depth);
    const auto d = static_cast<std::int64_t>(depth);
    std::unique_ptr<std::atomic<std::uint8_t>[]> state(new std::atomic<std::uint8_t>[n]);
    for (std::int64_t i = 0; i < n; ++i) state[i].store(kUnclaimed, std::memory_order_relaxed);
    std::atomic<std::int64_t> via_try{0};

    std::vector<std::thread> threads;
    for (int w = 0; w < producers; ++w) {
      threads.emplace_back([&, w] {
        std::mt19937_64 rng(check::mix(seed, depth, static_cast<std::uint64_t>(w)));
        for (;;) {
          std::int64_t p = -1;
          if (rng() % 2 == 0 && ring.try_claim(n, p)) {
            via_try.fetch_add(1, std::memory_order_relaxed);
            // try_claim only hands out a position whose slot is already free: the position one
            // lap earlier has been consumed (its consumer marked it before take(), R2/A2).
            CHECK(p >= 0 && p < n);
            if (p >= d) CHECK_EQ(int(state[p - d].load(std::memory_order_acquire)), int(kConsumed));
          } else {
            p = ring.claim();
            if (p >= n) break;
            CHECK(ring.wait_free(p));
            if (p >= d) CHECK_EQ(int(state[p - d].load(std::memory_order_acquire)), int(kConsumed));
          }
          std::uint8_t expected = kUnclaimed;
          CHECK_MSG(
              state[p].compare_exchange_strong(expected, kPublished, std::memory_order_acq_rel),
              "position " << p << " claimed twice (state " << int(expected) << ")");
          random_pause(rng);
          ring.publish(p, Tracker(p));
        }
      });
    }

    std::mt19937_64 rng(check::mix(seed, depth, 999));
    for (std::int64_t p = 0; p < n; ++p) {
      switch (rng() % 3) {
        case 0:  // poll
          while (!ring.ready(p)) std::this_thread::yield();
          break;
        case 1:  // short timed waits, which may time out
          while (!ring.wait_ready(p, std::chrono::microseconds(rng() % 100))) {
          }
          break;
        default:
          CHECK(ring.wait_ready(p, std::chrono::nanoseconds(-1)));
      }
      CHECK_MSG(state[p].load(std::memory_order_acquire) == kPublished,
                "position " << p << " ready but its state is " << int(state[p].load()));
      state[p].store(kConsumed, std::memory_order_release);
      Tracker v = ring.take(p);
      CHECK_EQ(v.value(), p);
      random_pause(rng);
    }
    for (auto& t : threads) t.join();
    for (std::int64_t p = 0; p < n; ++p) CHECK_EQ(int(state[p].load()), int(kConsumed));
    CHECK_GE(ring.claimed(), n);
    std::printf("  depth=%zu producers=%d positions=%lld (try_claim: %lld)\n", depth, producers,
                static_cast<long long>(n), static_cast<long long>(via_try.load()));
  }
  CHECK_EQ(Tracker::live(), live_before);
}

}  // namespace

// Many producers, one in-order consumer, depths 1..8: every position exactly once, in order.
TEST(stress_exactly_once_in_order) {
  const std::uint64_t seed = check::test_seed();
  const std::int64_t total = check::scaled(200'000);
  for (std::size_t depth = 1; depth <= 8; ++depth) {
    stress(seed, depth, 4, total / 8);
  }
  CHECK_EQ(Tracker::live(), 0);
}

// Values published but never taken are destroyed with the ring, also after stop().
TEST(tracker_values_left_in_ring) {
  check::test_seed();
  {
    OrderedRing<Tracker> ring(8);
    for (int i = 0; i < 6; ++i) {
      const std::int64_t p = ring.claim();
      CHECK(ring.wait_free(p));
      ring.publish(p, Tracker(p));
    }
    CHECK_EQ(Tracker::live(), 6);
    for (std::int64_t p = 0; p < 2; ++p) {
      CHECK(ring.ready(p));
      Tracker v = ring.take(p);
      CHECK_EQ(v.value(), p);
    }
    CHECK_EQ(Tracker::live(), 4);
    ring.stop();
    CHECK(ring.stopped());
    CHECK(!ring.ready(2));  // stopped: nothing more is handed out
    // A producer that claimed before the stop may still publish; that value is destroyed too.
    ring.publish(6, Tracker(6));
    CHECK_EQ(Tracker::live(), 5);
  }
  CHECK_EQ(Tracker::live(), 0);
  {
    OrderedRing<Tracker> ring(3);  // never stopped, destroyed full
    for (std::int64_t p = 0; p < 3; ++p) ring.publish(ring.claim(), Tracker(p));
  }
  CHECK_EQ(Tracker::live(), 0);
}

// stop() wakes producers blocked in wait_free and a consumer blocked in wait_ready at once.
TEST(stop_wakes_blocked_threads) {
  check::test_seed();
  OrderedRing<Tracker> ring(2);
  // Position 0 published, 1 claimed but not published: the consumer takes 0 and blocks on 1.
  ring.publish(ring.claim(), Tracker(0));
  const std::int64_t held = ring.claim();
  CHECK_EQ(held, 1);
  std::atomic<int> returned{0};
  std::atomic<int> returned_true{0};
  std::thread consumer([&] {
    Tracker v = ring.take(0);
    CHECK_EQ(v.value(), 0);
    if (ring.wait_ready(1, std::chrono::nanoseconds(-1))) returned_true.fetch_add(1);
    returned.fetch_add(1);
  });
  // Position 2 fits (slot 0 is free once 0 is taken); 3, 4 and 5 must wait for laps to turn.
  CHECK(check::eventually([&] { return !ring.ready(0); }));
  const std::int64_t p2 = ring.claim();
  CHECK(ring.wait_free(p2));
  ring.publish(p2, Tracker(p2));
  std::vector<std::thread> producers;
  for (int i = 0; i < 3; ++i) {
    producers.emplace_back([&] {
      const std::int64_t p = ring.claim();
      if (ring.wait_free(p)) returned_true.fetch_add(1);
      returned.fetch_add(1);
    });
  }
  std::this_thread::sleep_for(100ms);
  CHECK_EQ(returned.load(), 0);  // all four are really blocked
  const auto t0 = check::Clock::now();
  ring.stop();
  consumer.join();
  for (auto& t : producers) t.join();
  const double took = check::seconds_since(t0);
  std::printf("  woke 4 blocked threads in %.1f ms\n", took * 1e3);
  CHECK_EQ(returned.load(), 4);
  CHECK_EQ(returned_true.load(), 0);
  CHECK_LT(took, 1.0);
  // After stop every wait returns false at once, timed or not.
  CHECK(!ring.wait_free(ring.claim()));
  CHECK(!ring.wait_ready(1, std::chrono::seconds(10)));
  std::int64_t out = -1;
  CHECK(!ring.try_claim(1'000, out));
}

// try_claim claims only a position whose slot is free, and only below its limit.
TEST(try_claim_never_claims_busy_slot) {
  check::test_seed();
  OrderedRing<Tracker> ring(3);
  std::int64_t p = -1;
  CHECK(!ring.try_claim(0, p));  // limit
  for (std::int64_t want = 0; want < 3; ++want) {
    CHECK(ring.try_claim(100, p));
    CHECK_EQ(p, want);
    ring.publish(p, Tracker(p));
  }
  // Slot of 3 holds position 0 (published, not taken): busy.
  CHECK(!ring.try_claim(100, p));
  CHECK_EQ(ring.claimed(), 3);
  // A claimed but unpublished position also keeps its next lap out.
  {
    Tracker v = ring.take(0);
  }
  CHECK(ring.try_claim(100, p));
  CHECK_EQ(p, 3);                  // slot 0 is free for lap 1 now
  CHECK(!ring.try_claim(100, p));  // slot 1 still holds position 1
  {
    Tracker v = ring.take(1);
  }
  CHECK(!ring.try_claim(4, p));  // free, but at the limit
  CHECK(ring.try_claim(5, p));
  CHECK_EQ(p, 4);
  // Position 3 is claimed, not published: the consumer of 2 can go on, position 6 (slot 0,
  // lap 2) cannot be claimed until 3 is published and taken.
  {
    Tracker v = ring.take(2);
  }
  CHECK(ring.try_claim(100, p));
  CHECK_EQ(p, 5);
  CHECK(!ring.try_claim(100, p));
  ring.publish(3, Tracker(3));
  CHECK(!ring.try_claim(100, p));
  {
    Tracker v = ring.take(3);
  }
  CHECK(ring.try_claim(100, p));
  CHECK_EQ(p, 6);
  // Done: positions 4, 5, 6 are claimed and never published; nothing is in the ring.
  CHECK_EQ(Tracker::live(), 0);
}

// wait_ready with a timeout returns false after about that long, and true once published.
TEST(wait_ready_timeout) {
  check::test_seed();
  OrderedRing<Tracker> ring(4);
  CHECK(!ring.wait_ready(0, std::chrono::nanoseconds(0)));
  auto t0 = check::Clock::now();
  CHECK(!ring.wait_ready(0, 30ms));
  const double took = check::seconds_since(t0);
  std::printf("  30 ms timeout took %.1f ms\n", took * 1e3);
  CHECK_GE(took, 0.029);
  CHECK_LT(took, 2.0);
  // A publish while the consumer waits wakes it before the timeout.
  std::thread producer([&] {
    std::this_thread::sleep_for(20ms);
    ring.publish(ring.claim(), Tracker(0));
  });
  t0 = check::Clock::now();
  CHECK(ring.wait_ready(0, std::chrono::seconds(30)));
  CHECK_LT(check::seconds_since(t0), 5.0);
  producer.join();
  CHECK(ring.wait_ready(0, std::chrono::nanoseconds(0)));  // ready: true without waiting
  {
    Tracker v = ring.take(0);
  }
  CHECK(!ring.wait_ready(1, 1ms));
}

TEST(depth_zero_throws) {
  check::test_seed();
  bool threw = false;
  try {
    OrderedRing<Tracker> ring(0);
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
  OrderedRing<Tracker> one(1);
  CHECK_EQ(one.depth(), 1u);
}

TEST_MAIN()
