// Tests of what a forked child's copies of the core's objects leave alone (fork.h): the parent's
// threads, its shared arena and its stop eventfd. The child destroys its copies and exits; the
// parent checks the child's exit status and that its own objects still work.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <memory>
#include <thread>

#include "../core/buffer_pool.h"
#include "../core/thread_pool.h"
#include "check.h"

using pyloader::BufferLease;
using pyloader::BufferPool;
using pyloader::PinRequest;
using pyloader::ThreadPool;

namespace {

const std::atomic<bool> kNoCancel{false};

// Forks; the child runs `child` and exits 0 (a crash or abort shows in the status). Returns the
// child's wait status.
template <class F>
int in_forked_child(F child) {
  const pid_t pid = ::fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    child();
    ::_exit(0);
  }
  int status = 0;
  CHECK_EQ(::waitpid(pid, &status, 0), pid);
  return status;
}

}  // namespace

// The child's copy of a running ThreadPool has handles of threads that are not there: destroying
// it must not join them (ESRCH -> std::system_error -> terminate).
TEST(forked_child_destroys_a_running_thread_pool) {
  std::atomic<bool> go{false};
  auto threads = std::make_unique<ThreadPool>();
  threads->start(2, [&go](int) {
    while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
  });
  const int status = in_forked_child([&] { threads.reset(); });
  CHECK(WIFEXITED(status));
  CHECK_EQ(WEXITSTATUS(status), 0);
  go.store(true, std::memory_order_release);
  threads->join();  // the parent's threads were never touched
}

// The child's copy of an arena pool maps the parent's memfd: destroying it (and the lease it
// holds) must not punch holes in the parent's buffers.
TEST(forked_child_destroys_a_shared_pool_without_freeing_the_parents_buffers) {
  auto pool = BufferPool::create(8 << 20, PinRequest::kOff, 64 << 20);
  BufferLease kept = pool->acquire(1 << 20, kNoCancel, 0);
  BufferLease freed = pool->acquire(1 << 20, kNoCancel, 1);
  CHECK(kept && freed);
  std::memset(kept.data(), 0x5a, kept.capacity());
  std::memset(freed.data(), 0x3c, freed.capacity());
  std::byte* const freed_data = freed.data();
  const std::size_t freed_capacity = freed.capacity();
  freed.reset();  // back in the pool, unleased: the child's destructor would drop (free) it
  const int status = in_forked_child([&] {
    kept.reset();
    pool.reset();
  });
  CHECK(WIFEXITED(status));
  CHECK_EQ(WEXITSTATUS(status), 0);
  for (std::size_t i = 0; i < kept.capacity(); i += 4093) {
    CHECK_EQ(static_cast<int>(kept.data()[i]), 0x5a);
  }
  // The free buffer's pages are still the parent's too: reused as they are, not zeroed.
  BufferLease again = pool->acquire(freed_capacity, kNoCancel, 2);
  CHECK(again.data() == freed_data);
  CHECK_EQ(static_cast<int>(again.data()[freed_capacity - 1]), 0x3c);
}

TEST_MAIN()
