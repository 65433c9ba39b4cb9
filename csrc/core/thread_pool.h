// thread_pool.h: a fixed set of native threads running one body each.
//
// The pool knows nothing of what the threads do: the owner supplies body(worker_id) and a way to
// make it return (its own stop flag and wake-ups). Shutdown recipe, as in the owner's stop():
//   1. the owner sets its stop flag and wakes every wait its threads can be blocked in;
//   2. join() waits for every body to return. join() is idempotent and must not be called from
//      one of the pool's own threads (it would wait for itself): is_member() tells.
// The destructor joins.
#pragma once

#include <algorithm>
#include <functional>
#include <thread>
#include <vector>

namespace pyloader {

class ThreadPool {
 public:
  ThreadPool() = default;
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;
  ~ThreadPool() { join(); }

  void start(int workers, const std::function<void(int)>& body) {
    threads_.reserve(static_cast<std::size_t>(workers));
    for (int w = 0; w < workers; ++w) threads_.emplace_back(body, w);
  }

  bool is_member() const noexcept {
    const auto me = std::this_thread::get_id();
    return std::any_of(threads_.begin(), threads_.end(),
                       [me](const std::thread& t) { return t.get_id() == me; });
  }

  void join() noexcept {
    for (std::thread& t : threads_) {
      if (t.joinable()) t.join();
    }
    threads_.clear();
  }

  // For an owner destroyed on one of its own threads: let the threads finish on their own.
  void detach() noexcept {
    for (std::thread& t : threads_) {
      if (t.joinable()) t.detach();
    }
    threads_.clear();
  }

  std::size_t size() const noexcept { return threads_.size(); }

 private:
  std::vector<std::thread> threads_;
};

}  // namespace pyloader
