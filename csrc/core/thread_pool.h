// thread_pool.h: a fixed set of native threads running one body each.
//
// The pool knows nothing of what the threads do: the owner supplies body(worker_id) and a way to
// make it return (its own stop flag and wake-ups). Shutdown recipe, as in the owner's stop():
//   1. the owner sets its stop flag and wakes every wait its threads can be blocked in;
//   2. join() waits for every body to return; join_for(grace) waits at most `grace` and then
//      *abandons* (detaches) the threads whose body has not returned, and says which. join() and
//      join_for() are idempotent and must not be called from one of the pool's own threads (it
//      would wait for itself): is_member() tells; detach() is for that case.
// An abandoned thread runs on until its body returns (it may be stuck in the owner's user code
// forever) and then ends on its own: whatever its body uses must therefore be owned by the body
// itself (the Engine's threads each hold a shared_ptr to their engine). Its end is not waited for
// by anyone, including process exit.
//
// Completion: each thread, after its body returns, sets its done flag (release) and bumps ended_
// (release), then wakes ended_'s sleepers (wait.h). join_for() loads ended_ (acquire) before
// checking the flags, and sleeps on ended_ only while it still holds the value it loaded, so no
// end is missed; a flag read as set (acquire) means the body has returned, and join() of that
// thread returns as soon as it has destroyed its copy of the body. The flags and the word live in
// a block that every thread shares (shared_ptr), so an abandoned thread never touches the pool.
// The destructor joins (without bound: owners with threads that may be stuck call join_for first).
//
// Fork (fork.h): a forked child has copies of the std::thread handles but not the threads.
// Joining or detaching such a handle fails (ESRCH) and a joinable std::thread may not be
// destroyed, so there join(), join_for() and detach() move the handles to a graveyard that is
// never freed (reachable from a static: no leak report) and return at once.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "fork.h"
#include "wait.h"

namespace pyloader {

class ThreadPool {
 public:
  ThreadPool() = default;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() { join(); }

  void start(int workers, const std::function<void(int)>& body) {
    owner_ = OwnerProcess();
    ends_ = std::make_shared<Ends>(static_cast<std::size_t>(workers));
    threads_.reserve(static_cast<std::size_t>(workers));
    for (int w = 0; w < workers; ++w) {
      threads_.emplace_back([body, w, ends = ends_] {
        body(w);
        ends->done[static_cast<std::size_t>(w)].store(true, std::memory_order_release);
        ends->ended.fetch_add(1, std::memory_order_release);
        wake_all(ends->ended);
      });
    }
  }

  bool is_member() const noexcept {
    const auto me = std::this_thread::get_id();
    return std::any_of(threads_.begin(), threads_.end(),
                       [me](const std::thread& t) { return t.get_id() == me; });
  }

  void join() noexcept {
    if (forked_away()) return;
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
    threads_.clear();
  }

  // Waits at most `grace` for every body to return; joins those that did and detaches the rest.
  // Returns the ids of the abandoned (detached) threads, in order.
  std::vector<int> join_for(std::chrono::nanoseconds grace) noexcept {
    std::vector<int> abandoned;
    if (threads_.empty() || forked_away()) return abandoned;
    const auto deadline = std::chrono::steady_clock::now() + grace;
    const auto total = static_cast<std::uint32_t>(threads_.size());
    for (;;) {
      const std::uint32_t ended = ends_->ended.load(std::memory_order_acquire);
      if (ended >= total) break;
      const auto left = deadline - std::chrono::steady_clock::now();
      if (left <= std::chrono::nanoseconds::zero()) break;
      wait_for_change(ends_->ended, ended,
                      std::chrono::duration_cast<std::chrono::nanoseconds>(left));
    }
    for (std::size_t w = 0; w < threads_.size(); ++w) {
      std::thread& t = threads_[w];
      if (!t.joinable()) continue;
      if (ends_->done[w].load(std::memory_order_acquire)) {
        t.join();
      } else {
        t.detach();
        abandoned.push_back(static_cast<int>(w));
      }
    }
    threads_.clear();
    return abandoned;
  }

  // For an owner destroyed on one of its own threads: let the threads finish on their own.
  void detach() noexcept {
    if (forked_away()) return;
    for (std::thread& t : threads_) {
      if (t.joinable()) t.detach();
    }
    threads_.clear();
  }

  std::size_t size() const noexcept { return threads_.size(); }

 private:
  // In a forked child: buries the parent's thread handles (see Fork above); true if it did.
  bool forked_away() noexcept {
    if (threads_.empty() || owner_.here()) return false;
    static auto* graveyard = new std::vector<std::thread>();
    for (std::thread& t : threads_) graveyard->push_back(std::move(t));
    threads_.clear();
    return true;
  }

  // Shared by the pool and every thread: outlives the pool when a thread is abandoned.
  struct Ends {
    explicit Ends(std::size_t n) : done(n) {}
    std::vector<std::atomic<bool>> done;  // per thread: its body returned
    std::atomic<std::uint32_t> ended{0};  // how many bodies returned (a futex word)
  };
  std::vector<std::thread> threads_;
  std::shared_ptr<Ends> ends_;
  OwnerProcess owner_;
};

}  // namespace pyloader
