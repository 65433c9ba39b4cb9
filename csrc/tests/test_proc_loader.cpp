// Tests of ProcLoader (proc_loader.h) with real worker processes: the test forks children that
// speak the wire protocol (in C++, as process/_worker.py does in Python), writes batches into a
// shared Arena, and kills or hangs some of them.
//
// The children only make syscalls and touch preallocated memory (no malloc after fork: the
// parent has threads), and end with _exit.
#include <signal.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <map>
#include <mutex>
#include <set>

#include "../core/engine.h"
#include "../core/proc_loader.h"
#include "check.h"

using namespace pyloader;
using namespace std::chrono_literals;

namespace {

constexpr int kIndices = 64;

// Shared with the children (MAP_SHARED | MAP_ANONYMOUS before any fork).
struct Shared {
  std::atomic<int> attempts[kIndices];
  std::atomic<int> deaths_in_write;
};

struct Behaviour {
  std::set<int> die_in_load_once, die_in_write_once, always_die, hang;
  // Per index, the fate of each attempt in turn: 'L' dies in its load, 'W' dies writing, '.'
  // lives; attempts past the end live.
  std::map<int, std::string> fates;
};

char fate(const Behaviour& how, int index, int attempt) {
  const auto it = how.fates.find(index);
  if (it == how.fates.end() || attempt >= static_cast<int>(it->second.size())) return '.';
  return it->second[static_cast<std::size_t>(attempt)];
}

std::size_t batch_bytes(std::int64_t index) {
  return index % 3 == 0 ? 300'000 + 64 * index : 17 * (index + 1);
}

bool read_exact(int fd, void* dst, std::size_t n) {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    const ssize_t got = ::read(fd, p, n);
    if (got < 0 && errno == EINTR) continue;
    if (got <= 0) return false;
    p += got;
    n -= static_cast<std::size_t>(got);
  }
  return true;
}

void write_all(int fd, const void* src, std::size_t n) {
  const auto* p = static_cast<const char*>(src);
  while (n > 0) {
    const ssize_t put = ::send(fd, p, n, MSG_NOSIGNAL);
    if (put < 0 && errno == EINTR) continue;
    if (put <= 0) _exit(0);
    p += put;
    n -= static_cast<std::size_t>(put);
  }
}

[[noreturn]] void die() {
  ::kill(::getpid(), SIGKILL);
  for (;;) pause();
}

// A worker process: the protocol of process/_worker.py, with canned batches: batch i is
// batch_bytes(i) bytes of value i, with meta "m<i>".
[[noreturn]] void child_main(int fd, std::byte* arena, Shared* shared, const Behaviour* how) {
  static char small[8192];
  WireHeader h;
  bool have = false;
  for (;;) {
    if (!have && !read_exact(fd, &h, sizeof h)) _exit(0);
    have = false;
    if (h.kind != kLoad) continue;
    const auto index = static_cast<int>(h.c);
    const std::int64_t position = h.a;
    const int attempt = shared->attempts[index].fetch_add(1);
    if (how->always_die.count(index) || (how->die_in_load_once.count(index) && attempt == 0) ||
        fate(*how, index, attempt) == 'L') {
      die();
    }
    while (how->hang.count(index)) pause();
    char meta[32];
    const int meta_len = std::snprintf(meta, sizeof meta, "m%d", index);
    const std::size_t bytes = batch_bytes(index);
    WireHeader size;
    size.kind = kSize;
    size.a = static_cast<std::int64_t>(bytes);
    size.b = meta_len;
    size.d = position;
    if (bytes <= sizeof small) {
      size.flags = kInline;
      size.length = static_cast<std::uint64_t>(meta_len) + bytes;
      std::memset(small, index, bytes);
      write_all(fd, &size, sizeof size);
      write_all(fd, meta, static_cast<std::size_t>(meta_len));
      write_all(fd, small, bytes);
      continue;
    }
    size.length = static_cast<std::uint64_t>(meta_len);
    write_all(fd, &size, sizeof size);
    write_all(fd, meta, static_cast<std::size_t>(meta_len));
    if (!read_exact(fd, &h, sizeof h)) _exit(0);
    if (h.kind == kLoad) {  // the batch was abandoned: serve the new request
      have = true;
      continue;
    }
    CHECK_EQ(h.kind, kWrite);
    CHECK_EQ(h.c, position);
    CHECK_GE(static_cast<std::size_t>(h.b), bytes);
    if ((how->die_in_write_once.count(index) && attempt == 0) ||
        fate(*how, index, attempt) == 'W') {
      std::memset(arena + h.a, 0xEE, bytes / 2);  // half written, then killed
      shared->deaths_in_write.fetch_add(1);
      die();
    }
    std::memset(arena + h.a, index, bytes);
    WireHeader done;
    done.kind = kDone;
    done.d = position;
    write_all(fd, &done, sizeof done);
  }
}

class Workers {
 public:
  Workers(std::byte* arena, const Behaviour& how) : arena_(arena), how_(how) {
    void* p =
        mmap(nullptr, sizeof(Shared), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED);
    shared_ = new (p) Shared{};
  }
  ~Workers() {
    std::lock_guard lock(mu_);
    for (auto& [fd, pid] : live_) {
      ::close(fd);
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
    munmap(shared_, sizeof(Shared));
  }
  ProcWorker spawn() {
    // One spawn at a time (engine threads replace workers concurrently): a child forked by another
    // thread between this socketpair() and close(sv[1]) would hold a copy of this worker's end, so
    // this worker's death would never read as EOF. (pyloader/process/ forks from a single-threaded
    // zygote.)
    std::lock_guard lock(mu_);
    int sv[2];
    CHECK_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    const pid_t pid = ::fork();
    CHECK_GE(pid, 0);
    if (pid == 0) {
      ::close(sv[0]);
      child_main(sv[1], arena_, shared_, &how_);
    }
    ::close(sv[1]);
    live_.emplace_back(sv[0], pid);
    return {sv[0], pid};
  }
  // The replace callback: reaps the old worker of `slot` and says how it died.
  ProcWorker replace(int fd, std::string& death) {
    pid_t pid = 0;
    {
      std::lock_guard lock(mu_);
      for (auto it = live_.begin(); it != live_.end(); ++it) {
        if (it->first == fd) {
          pid = it->second;
          live_.erase(it);
          break;
        }
      }
    }
    CHECK_GT(pid, 0);
    ::close(fd);
    ::kill(pid, SIGKILL);  // a hung or confused one too
    int status = 0;
    CHECK_EQ(::waitpid(pid, &status, 0), pid);
    death = WIFSIGNALED(status) ? "killed by signal " + std::to_string(WTERMSIG(status))
                                : "exited with status " + std::to_string(WEXITSTATUS(status));
    return spawn();
  }
  Shared& shared() { return *shared_; }

 private:
  std::byte* arena_;
  Behaviour how_;
  Shared* shared_ = nullptr;
  std::mutex mu_;
  std::vector<std::pair<int, pid_t>> live_;
};

struct Setup {
  std::shared_ptr<BufferPool> pool =
      BufferPool::create(std::size_t{64} << 20, PinRequest::kOff, std::size_t{256} << 20);
  std::unique_ptr<Workers> workers;
  std::shared_ptr<ProcLoader> loader;
  std::shared_ptr<Engine> engine;

  Setup(const Behaviour& how, int n, int max_retries) {
    workers = std::make_unique<Workers>(pool->arena()->base(), how);
    std::vector<ProcWorker> initial;
    for (int i = 0; i < n; ++i) initial.push_back(workers->spawn());
    Workers* w = workers.get();
    loader = std::make_shared<ProcLoader>(
        initial, pool->arena()->base(), pool->arena()->size(),
        [this, w](int slot, std::string& death) {
          return w->replace(loader->workers()[static_cast<std::size_t>(slot)].fd, death);
        },
        nullptr, max_retries, 0);
    EngineOptions opt;
    opt.workers = n;
    opt.depth = 6;
    engine = Engine::create(opt, pool, loader);
  }
  ~Setup() {
    engine->stop();
    engine->join();
    engine.reset();
    loader.reset();
    workers.reset();
  }
};

Delivery take(Engine& e) {
  CHECK_MSG(e.wait_ready(10s), "no batch within 10 s at position " << e.next_position());
  return e.take();
}

void verify_batch(const Delivery& d, std::int64_t index) {
  CHECK(d.error.empty());
  CHECK(!d.failed);
  const auto* b = dynamic_cast<const ProcBatch*>(d.payload.get());
  CHECK(b != nullptr);
  CHECK_EQ(b->kind, ProcBatch::kOk);
  CHECK_EQ(b->meta, "m" + std::to_string(index));
  CHECK(d.buffer);
  const std::size_t bytes = batch_bytes(index);
  CHECK_GE(d.buffer.capacity(), bytes);
  for (std::size_t k = 0; k < bytes; k += 997) {
    CHECK_EQ(static_cast<int>(d.buffer.data()[k]), index);
  }
  CHECK_EQ(static_cast<int>(d.buffer.data()[bytes - 1]), index);
}

std::vector<std::int64_t> plan(std::uint64_t seed, int epoch) {
  std::vector<std::int64_t> v(kIndices);
  for (int i = 0; i < kIndices; ++i) v[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 rng(check::mix(seed, static_cast<std::uint64_t>(epoch)));
  std::shuffle(v.begin(), v.end(), rng);
  return v;
}

}  // namespace

// Every position is delivered once, in order, with the bytes its worker wrote: inline (small)
// and written into the shared arena (large), over several epochs.
TEST(delivers_every_batch_in_order) {
  const std::uint64_t seed = check::test_seed();
  Setup s({}, 2, 2);
  std::vector<std::vector<std::int64_t>> epochs;
  for (int e = 0; e < 3; ++e) {
    epochs.push_back(plan(seed, e));
    s.engine->append(e, epochs.back(), false);
  }
  s.engine->start();
  for (const auto& indices : epochs) {
    for (std::int64_t index : indices) verify_batch(take(*s.engine), index);
  }
  CHECK_EQ(s.loader->deaths(), 0);
  CHECK(s.loader->dirty().empty());
}

// Worker w loads positions w, w + workers, ... (ProcLoader::round_robin): which worker process
// loads a position depends on the position only, as torch's batch i goes to worker
// i % num_workers. A killed worker's replacement keeps its slot, so its positions too.
TEST(positions_go_to_workers_round_robin) {
  Behaviour how;
  how.die_in_load_once = {5, 9};
  Setup s(how, 3, 6);
  const std::vector<std::int64_t> indices = plan(check::test_seed(), 0);
  s.engine->append(0, indices, false);
  s.engine->start();
  for (std::size_t p = 0; p < indices.size(); ++p) {
    const Delivery d = take(*s.engine);
    verify_batch(d, indices[p]);
    CHECK_EQ(d.worker, static_cast<std::int32_t>(p % 3));
  }
  CHECK_EQ(s.loader->deaths(), 2);
}

// Workers killed while loading and while writing are replaced; their positions are loaded again
// from the start: every batch arrives once, in order, intact.
TEST(killed_workers_are_replaced_and_positions_reissued) {
  const std::uint64_t seed = check::test_seed();
  Behaviour how;
  std::mt19937_64 rng(seed);
  while (how.die_in_load_once.size() < 6)
    how.die_in_load_once.insert(static_cast<int>(rng() % kIndices));
  for (int i = 0; i < kIndices; i += 3) {  // large batches only: they are written, not inline
    if (!how.die_in_load_once.count(i) && how.die_in_write_once.size() < 4)
      how.die_in_write_once.insert(i);
  }
  Setup s(how, 2, 2);
  const auto indices = plan(seed, 0);
  s.engine->append(0, indices, false);
  s.engine->start();
  for (std::int64_t index : indices) verify_batch(take(*s.engine), index);
  CHECK_EQ(s.loader->deaths(), 10);
  CHECK_EQ(s.workers->shared().deaths_in_write.load(), 4);
}

// A position that kills every worker fails after max_retries + 1 deaths, saying how each died;
// the positions after it load normally.
TEST(poison_position_fails_after_max_retries) {
  const std::uint64_t seed = check::test_seed();
  Behaviour how;
  how.always_die = {7};
  Setup s(how, 2, 2);
  const auto indices = plan(seed, 0);
  s.engine->append(0, indices, false);
  s.engine->start();
  for (std::int64_t index : indices) {
    Delivery d = take(*s.engine);
    if (index != 7) {
      verify_batch(d, index);
      continue;
    }
    CHECK(d.failed);
    CHECK(!d.buffer);
    const auto* b = dynamic_cast<const ProcBatch*>(d.payload.get());
    CHECK(b != nullptr);
    CHECK_EQ(b->kind, ProcBatch::kDied);
    CHECK_MSG(b->message.find("3 worker processes died") == 0, b->message);
    CHECK_MSG(b->message.find("killed by signal 9") != std::string::npos, b->message);
  }
  CHECK_EQ(s.loader->deaths(), 3);
  CHECK_EQ(s.workers->shared().attempts[7].load(), 3);
}

namespace {
std::size_t count_of(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (std::size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}
}  // namespace

// One retry budget per position, whichever phase its workers die in: deaths in the load
// (prepare()) and in the write (fill()) add up, and the position fails at its
// (max_retries + 1)-th death, never later, with a message that lists every one of them. A
// position with fewer deaths loads. (Large batches only: an inline batch has no write phase.)
TEST(one_retry_budget_across_load_and_write) {
  const std::uint64_t seed = check::test_seed();
  const int kMaxRetries = 2;
  Behaviour how;
  // Index -> the fate of each attempt. Failing ones die max_retries + 1 times in all.
  how.fates = {
      {0, "LWL"},   // dies in the load, then writing, then loading: fails at the third death
      {3, "WLW"},   // writing first
      {9, "LLW"},   // two in the load, the third writing
      {15, "WWW"},  // writing only
      {6, "LW"},    // two deaths: the third attempt loads it
      {12, "WL"},   // likewise
      {18, "L"},    // one
  };
  const std::set<int> fails = {0, 3, 9, 15};
  Setup s(how, 2, kMaxRetries);
  std::vector<std::int64_t> indices(24);
  for (int i = 0; i < 24; ++i) indices[static_cast<std::size_t>(i)] = i;
  std::mt19937_64 rng(seed);
  std::shuffle(indices.begin(), indices.end(), rng);
  s.engine->append(0, indices, false);
  s.engine->start();
  std::int64_t expected_deaths = 0;
  for (std::int64_t index : indices) {
    Delivery d = take(*s.engine);
    const auto i = static_cast<int>(index);
    const int deaths = how.fates.count(i) ? static_cast<int>(how.fates[i].size()) : 0;
    expected_deaths += deaths;
    // No attempt after the last death of a failing position; one more (the good one) otherwise.
    const int want_attempts = fails.count(i) ? deaths : deaths + 1;
    CHECK_EQ(s.workers->shared().attempts[index].load(), want_attempts);
    if (!fails.count(i)) {
      verify_batch(d, index);
      continue;
    }
    CHECK_EQ(deaths, kMaxRetries + 1);
    CHECK(d.failed);
    const auto* b = dynamic_cast<const ProcBatch*>(d.payload.get());
    CHECK(b != nullptr);
    CHECK_EQ(b->kind, ProcBatch::kDied);
    std::printf("  index %d (%s): %s\n", i, how.fates[i].c_str(), b->message.c_str());
    CHECK_MSG(b->message.find("3 worker processes died loading it (") == 0, b->message);
    CHECK_MSG(count_of(b->message, "killed by signal 9") == 3, b->message);  // every death listed
    CHECK_MSG(b->message.find("attempt 3: ") != std::string::npos, b->message);
    CHECK_MSG(b->message.find("attempt 4") == std::string::npos, b->message);
  }
  CHECK_EQ(s.loader->deaths(), expected_deaths);
}

// stop() returns promptly although a worker hangs in its load; its slot is reported dirty.
TEST(stop_interrupts_a_hung_worker) {
  check::test_seed();
  Behaviour how;
  how.hang = {5};
  Setup s(how, 2, 2);
  std::vector<std::int64_t> indices(20);
  for (int i = 0; i < 20; ++i) indices[static_cast<std::size_t>(i)] = i;
  s.engine->append(0, indices, false);
  s.engine->start();
  for (int i = 0; i < 5; ++i) verify_batch(take(*s.engine), i);
  CHECK(!s.engine->wait_ready(200ms));  // position 5 hangs
  const auto t0 = std::chrono::steady_clock::now();
  s.engine->stop();
  s.engine->join();
  CHECK_LT(std::chrono::steady_clock::now() - t0, 2s);
  CHECK_EQ(s.loader->dirty().size(), std::size_t{1});
}

// The arena hands out aligned ranges, coalesces freed ones and can be filled again.
TEST(arena_allocates_and_coalesces) {
  check::test_seed();
  auto arena = Arena::create(std::size_t{16} << 20);
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  std::byte* a = arena->allocate(3 * page, page);
  std::byte* b = arena->allocate(std::size_t{2} << 20, std::size_t{2} << 20);
  std::byte* c = arena->allocate(page, page);
  CHECK(a && b && c);
  CHECK_EQ(static_cast<std::size_t>(b - arena->base()) % (std::size_t{2} << 20), 0u);
  std::memset(b, 1, std::size_t{2} << 20);
  CHECK(arena->allocate(std::size_t{32} << 20, page) == nullptr);
  arena->free(b, std::size_t{2} << 20);
  arena->free(a, 3 * page);
  arena->free(c, page);
  CHECK_EQ(arena->free_bytes(), arena->size());
  CHECK(arena->allocate(arena->size(), page) == arena->base());
}

TEST_MAIN()
