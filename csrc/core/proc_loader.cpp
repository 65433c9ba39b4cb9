#include "proc_loader.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>
#if defined(__GLIBCXX__)  // libstdc++ (known once a standard header is in)
#include <cxxabi.h>       // abi::__forced_unwind
#endif

namespace pyloader {

namespace {
constexpr std::uint64_t kMaxMessage = std::uint64_t{1}
                                      << 36;  // a sanity bound, not a limit in practice

std::string join(const std::vector<std::string>& parts) {
  std::string out;
  for (std::size_t i = 0; i < parts.size(); ++i) {
    if (i) out += "; ";
    out += "attempt " + std::to_string(i + 1) + ": " + parts[i];
  }
  return out;
}
}  // namespace

ProcLoader::ProcLoader(std::vector<ProcWorker> workers, std::byte* arena_base,
                       std::size_t arena_size, Replace replace, Hook hook, int max_retries,
                       std::int64_t hooks_before)
    : arena_base_(arena_base),
      arena_size_(arena_size),
      replace_(std::move(replace)),
      hook_(std::move(hook)),
      max_retries_(max_retries),
      hooks_(hooks_before),
      slots_(workers.size()) {
  for (std::size_t i = 0; i < workers.size(); ++i) slots_[i].worker = workers[i];
  stop_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (stop_fd_ < 0) throw std::system_error(errno, std::generic_category(), "eventfd");
}

ProcLoader::~ProcLoader() {
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

void ProcLoader::interrupt() noexcept {
  interrupted_.store(true, std::memory_order_release);
  // A forked child's copy: the eventfd is shared, a write would stop the parent's (fork.h).
  if (!owner_.here()) return;
  const std::uint64_t one = 1;
  [[maybe_unused]] const ssize_t n = ::write(stop_fd_, &one, sizeof one);
}

std::vector<ProcWorker> ProcLoader::workers() const {
  std::lock_guard lock(mu_);
  std::vector<ProcWorker> out;
  for (const Slot& s : slots_) out.push_back(s.worker);
  return out;
}

std::vector<int> ProcLoader::dirty() const {
  std::lock_guard lock(mu_);
  std::vector<int> out;
  for (std::size_t i = 0; i < slots_.size(); ++i) {
    if (slots_[i].busy || slots_[i].worker.fd < 0) out.push_back(static_cast<int>(i));
  }
  return out;
}

void ProcLoader::set_busy(int worker, bool busy) {
  std::lock_guard lock(mu_);
  slots_[static_cast<std::size_t>(worker)].busy = busy;
}

int ProcLoader::fd_of(int worker) const {
  std::lock_guard lock(mu_);
  return slots_[static_cast<std::size_t>(worker)].worker.fd;
}

int ProcLoader::pid_of(int worker) const {
  std::lock_guard lock(mu_);
  return slots_[static_cast<std::size_t>(worker)].worker.pid;
}

std::string ProcLoader::worker_name(int worker) const {
  const int pid = pid_of(worker);
  std::string out = "worker process " + std::to_string(pid) + " (worker " + std::to_string(worker);
  if (pid <= 0) return out + ", none running)";
  // /proc/<pid>/stat: "pid (comm) state ...", where comm may hold spaces and parentheses.
  std::string stat;
  if (FILE* f = std::fopen(("/proc/" + std::to_string(pid) + "/stat").c_str(), "r")) {
    char buf[512];
    const std::size_t n = std::fread(buf, 1, sizeof buf, f);
    std::fclose(f);
    stat.assign(buf, n);
  }
  const std::size_t close = stat.rfind(')');
  const char state = close != std::string::npos && close + 2 < stat.size() ? stat[close + 2] : '?';
  switch (state) {
    case 'T':
      return out + ", stopped: it received SIGSTOP (or SIGTSTP); SIGCONT resumes it)";
    case 't':
      return out + ", stopped by a debugger)";
    case 'Z':
    case 'X':
      return out + ", exited)";
    case 'R':
      return out + ", running)";
    case 'S':
    case 'D':
      return out + ", sleeping)";
    case '?':
      return out + ", gone)";
    default:
      return out + ", state " + std::string(1, state) + ")";
  }
}

// ---- socket I/O: every wait also watches stop_fd_ ---------------------------------------------

ProcLoader::Io ProcLoader::send_msg(int fd, const WireHeader& h) noexcept {
  if (interrupted_.load(std::memory_order_acquire)) return Io::kStopped;
  if (fd < 0) return Io::kDead;
  const auto* p = reinterpret_cast<const char*>(&h);
  std::size_t left = sizeof h;
  while (left > 0) {  // 48 bytes to a peer that is reading: never blocks for long
    const ssize_t n = ::send(fd, p, left, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return Io::kDead;  // EPIPE / ECONNRESET: the worker is gone
    p += n;
    left -= static_cast<std::size_t>(n);
  }
  return Io::kOk;
}

ProcLoader::Io ProcLoader::recv_exact(int fd, void* dst, std::size_t n) noexcept {
  auto* p = static_cast<char*>(dst);
  while (n > 0) {
    pollfd fds[2] = {{fd, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    const int r = ::poll(fds, 2, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      return Io::kDead;
    }
    if (fds[1].revents & POLLIN) return Io::kStopped;
    if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR | POLLNVAL))) continue;
    const ssize_t got = ::recv(fd, p, n, MSG_DONTWAIT);
    if (got < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)) continue;
    if (got <= 0) return Io::kDead;  // EOF: the worker's end closed, i.e. it exited or was killed
    p += got;
    n -= static_cast<std::size_t>(got);
  }
  return Io::kOk;
}

ProcLoader::Io ProcLoader::recv_msg(int fd, WireHeader& h, std::string& body) noexcept {
  if (fd < 0) return Io::kDead;
  Io io = recv_exact(fd, &h, sizeof h);
  if (io != Io::kOk) return io;
  if (h.length > kMaxMessage) return Io::kDead;  // garbage: treat the worker as broken
  try {
    body.resize(static_cast<std::size_t>(h.length));
  } catch (const std::bad_alloc&) {
    return Io::kDead;
  }
  return h.length ? recv_exact(fd, body.data(), body.size()) : Io::kOk;
}

ProcLoader::Io ProcLoader::request(int worker, const Task& task, WireHeader& h,
                                   std::string& body) noexcept {
  const int fd = fd_of(worker);
  WireHeader load;
  load.kind = kLoad;
  load.a = task.position;
  load.b = task.epoch;
  load.c = task.index;
  load.d = hooks_.load(std::memory_order_acquire);
  set_busy(worker, true);
  Io io = send_msg(fd, load);
  if (io == Io::kOk) io = recv_reply(fd, task.position, h, body);
  return io;
}

ProcLoader::Io ProcLoader::recv_reply(int fd, std::int64_t position, WireHeader& h,
                                      std::string& body) noexcept {
  for (;;) {
    const Io io = recv_msg(fd, h, body);
    // An answer about another position belongs to a conversation that was abandoned (the
    // engine stopped, or found no buffer for it): the worker has moved on to ours since.
    if (io != Io::kOk || h.d == position) return io;
  }
}

bool ProcLoader::accept(Prepared& item, const WireHeader& h, std::string& body) {
  auto batch = std::make_unique<ProcBatch>();
  if (h.kind == kError) {
    batch->kind = ProcBatch::kRaised;
    batch->message = std::move(body);
    item.failed = true;
    item.payload = std::move(batch);
    return true;
  }
  if (h.kind != kSize || h.a < 0 || h.b < 0 || static_cast<std::uint64_t>(h.b) > body.size())
    return false;
  const auto bytes = static_cast<std::size_t>(h.a);
  const auto meta_len = static_cast<std::size_t>(h.b);
  const bool is_inline = (h.flags & kInline) != 0;
  if (is_inline ? body.size() - meta_len != bytes : body.size() != meta_len) return false;
  if (bytes > arena_size_) return false;
  batch->meta.assign(body, 0, meta_len);
  if (is_inline) batch->data.assign(body, meta_len, std::string::npos);
  item.bytes = bytes;
  item.payload = std::move(batch);
  return true;
}

bool ProcLoader::replace(int worker, std::vector<std::string>& deaths) {
  std::string death;
  ProcWorker fresh;
  try {
    fresh = replace_(worker, death);
  } catch (const std::exception& e) {
    death += std::string(death.empty() ? "" : "; ") + "starting a new worker failed: " + e.what();
    fresh = ProcWorker{};
  }
  try {
    deaths.push_back(death.empty() ? "the worker process ended" : death);
  } catch (...) {
  }
  deaths_.fetch_add(1, std::memory_order_relaxed);
  std::lock_guard lock(mu_);
  Slot& s = slots_[static_cast<std::size_t>(worker)];
  s.worker = fresh;
  s.busy = false;
  return fresh.fd >= 0;
}

void ProcLoader::fail_died(Prepared& item, const std::vector<std::string>& deaths,
                           const std::string& why) {
  auto batch = std::make_unique<ProcBatch>();
  batch->kind = ProcBatch::kDied;
  batch->message = std::to_string(deaths.size()) +
                   (deaths.size() == 1 ? " worker process" : " worker processes") +
                   " died loading it (" + join(deaths) + ")" + (why.empty() ? "" : "; " + why);
  item.failed = true;
  item.bytes = 0;
  item.payload = std::move(batch);
}

bool ProcLoader::retry_after_death(int worker, Prepared& item, std::vector<std::string>& deaths) {
  if (!replace(worker, deaths)) {
    fail_died(item, deaths, "no new worker process could be started");
    return false;
  }
  if (static_cast<int>(deaths.size()) > max_retries_) {
    fail_died(item, deaths, "");
    return false;
  }
  return true;
}

// ---- Loader ---------------------------------------------------------------------------------

void ProcLoader::prepare(int worker, Prepared& item) {
  try {
    std::vector<std::string> deaths;
    for (;;) {
      WireHeader h;
      std::string body;
      const Io io = request(worker, item.task, h, body);
      if (io == Io::kStopped) {
        item.error = "the loader was stopped";
        return;
      }
      if (io == Io::kOk) {
        if (accept(item, h, body)) {
          auto* batch = static_cast<ProcBatch*>(item.payload.get());
          batch->pid = pid_of(worker);
          batch->deaths = std::move(deaths);  // fill() counts on from these
          // The conversation stays open only while the worker waits for a buffer to write.
          if (item.failed || item.bytes == 0 || !batch->data.empty()) set_busy(worker, false);
          return;
        }
        // A malformed answer: the worker is broken; it is replaced like a dead one.
      }
      if (!retry_after_death(worker, item, deaths)) return;
    }
  } catch (const std::exception& e) {
    item.error = std::string("process mode: ") + e.what();
  }
}

void ProcLoader::fill(int worker, Prepared& item, std::byte* dst, std::size_t capacity) {
  if (item.failed || !item.payload || item.bytes == 0 || dst == nullptr) return;
  auto* batch = static_cast<ProcBatch*>(item.payload.get());
  if (!batch->data.empty()) {  // inline: the bytes came with the answer
    std::memcpy(dst, batch->data.data(), batch->data.size());
    batch->data.clear();
    batch->data.shrink_to_fit();
    return;
  }
  try {
    std::vector<std::string> deaths = std::move(batch->deaths);  // prepare()'s: one budget
    bool reload = false;  // the worker that answered died: ask a new one from the start
    for (;;) {
      WireHeader h;
      std::string body;
      Io io;
      if (reload) {
        io = request(worker, item.task, h, body);
        if (io == Io::kOk) {
          Prepared again;
          again.task = item.task;
          if (accept(again, h, body)) {
            auto* fresh = static_cast<ProcBatch*>(again.payload.get());
            fresh->pid = pid_of(worker);
            if (again.failed || again.bytes != item.bytes) {
              if (!again.failed) {  // it waits for a buffer we will not give: discard it
                fresh->kind = ProcBatch::kDied;
                fresh->message = "the batch was " + std::to_string(item.bytes) + " bytes, then " +
                                 std::to_string(again.bytes) +
                                 " bytes when loaded again after a worker died";
                std::vector<std::string> ignored;
                replace(worker, ignored);
              } else {
                set_busy(worker, false);
              }
              item.failed = true;
              item.payload = std::move(again.payload);
              return;
            }
            *batch = std::move(*fresh);
            if (!batch->data.empty()) {
              set_busy(worker, false);
              std::memcpy(dst, batch->data.data(), batch->data.size());
              batch->data.clear();
              return;
            }
            reload = false;
            continue;  // now write it
          }
          io = Io::kDead;  // malformed: replace it
        }
      } else {
        WireHeader write;
        write.kind = kWrite;
        write.a = static_cast<std::int64_t>(dst - arena_base_);
        write.b = static_cast<std::int64_t>(capacity);
        write.c = item.task.position;
        io = send_msg(fd_of(worker), write);
        if (io == Io::kOk) io = recv_reply(fd_of(worker), item.task.position, h, body);
        if (io == Io::kOk && h.kind == kDone) {
          set_busy(worker, false);
          return;
        }
        if (io == Io::kOk && h.kind == kError) {
          set_busy(worker, false);
          batch->kind = ProcBatch::kRaised;
          batch->message = std::move(body);
          item.failed = true;
          return;
        }
        if (io == Io::kOk) io = Io::kDead;  // malformed
      }
      if (io == Io::kStopped) {  // the consumer will never see it
        item.failed = true;
        batch->kind = ProcBatch::kDied;
        batch->message = "the loader was stopped";
        return;
      }
      if (!retry_after_death(worker, item, deaths)) return;
      reload = true;
    }
  } catch (const std::exception& e) {
    item.failed = true;
    batch->kind = ProcBatch::kDied;
    batch->message = std::string("process mode: ") + e.what();
  }
}

std::unique_ptr<Payload> ProcLoader::epoch_end(int worker, std::int64_t epoch) {
  std::unique_ptr<Payload> error;
  if (hook_) {
    try {
      error = hook_(worker, epoch);
#if defined(__GLIBCXX__)
    } catch (abi::__forced_unwind&) {
      throw;  // the host ends this thread (loader.h, "Thread exit"): let it unwind
#endif
    } catch (...) {
    }
  }
  hooks_.fetch_add(1, std::memory_order_acq_rel);
  return error;
}

}  // namespace pyloader
