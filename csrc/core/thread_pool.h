// thread_pool.h: a fixed set of native threads running one body each.
//
// The pool knows nothing of what the threads do: the owner supplies body(worker_id) and a way to
// make it return (its own stop flag and wake-ups). Shutdown recipe, as in the owner's stop():
//   1. the owner sets its stop flag and wakes every wait its threads can be blocked in;
//   2. join() waits for every body to return. join() is idempotent and must not be called from
//      one of the pool's own threads (it would wait for itself): is_member() tells.
// The destructor joins.
//
// Fork (fork.h): a forked child has copies of the std::thread handles but not the threads.
// Joining or detaching such a handle fails (ESRCH) and a joinable std::thread may not be
// destroyed, so there join() and detach() move the handles to a graveyard that is never freed
// (reachable from a static: no leak report) and return at once.
#pragma once

#include <algorithm>
#include <functional>
#include <thread>
#include <vector>

#include "fork.h"

namespace pyloader {

class ThreadPool {
 public:
  ThreadPool() = default;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() { join(); }

  void start(int workers, const std::function<void(int)>& body) {
    owner_ = OwnerProcess();
    threads_.reserve(static_cast<std::size_t>(workers));
    for (int w = 0; w < workers; ++w) threads_.emplace_back(body, w);
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

  std::vector<std::thread> threads_;
  OwnerProcess owner_;
};

}  // namespace pyloader
