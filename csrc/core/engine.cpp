#include "engine.h"

#include <algorithm>
#include <cassert>
#include <cstdio>
#include <functional>
#include <limits>
#include <new>
#include <stdexcept>
#include <utility>

namespace pyloader {

namespace {
std::int64_t now_ns() noexcept {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

#ifndef NDEBUG
// Debug-only: fires when two threads are inside consumer calls at once.
class RoleGuard {
 public:
  explicit RoleGuard(std::atomic<bool>& busy) : busy_(busy) {
    const bool was_busy = busy_.exchange(true, std::memory_order_acquire);
    assert(!was_busy && "two threads are using the consumer side of one Engine at once");
    (void)was_busy;
  }
  ~RoleGuard() { busy_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool>& busy_;
};
#define PYLOADER_CONSUMER_ROLE() RoleGuard role_guard_(consumer_busy_)
#else
#define PYLOADER_CONSUMER_ROLE() (void)0
#endif

// Counts a buffer leased by a worker for a position the consumer has not taken yet. The first
// one (0 -> 1) can turn may_exceed of the position the consumer needs next true (it asks for
// in_flight > 0), so a worker waiting for that position must re-check: the pool's wake_all()
// orders the increment before its re-check (B1 pairs with B2 in buffer_pool.h).
void count_in_flight_buffer(std::atomic<std::int64_t>& in_flight, BufferPool& pool) noexcept {
  if (in_flight.fetch_add(1, std::memory_order_acq_rel) == 0) pool.wake_all();
}
}  // namespace

std::shared_ptr<Engine> Engine::create(const EngineOptions& options,
                                       std::shared_ptr<BufferPool> pool,
                                       std::shared_ptr<Loader> loader) {
  return std::shared_ptr<Engine>(new Engine(options, std::move(pool), std::move(loader)));
}

Engine::Engine(const EngineOptions& options, std::shared_ptr<BufferPool> pool,
               std::shared_ptr<Loader> loader)
    : options_(options),
      pool_(std::move(pool)),
      loader_(std::move(loader)),
      ring_(options.depth),
      busy_ns_(new PaddedCounter[static_cast<std::size_t>(std::max(options.workers, 1))]),
      activity_(new ActivitySlot[static_cast<std::size_t>(std::max(options.workers, 1))]) {
  if (options.workers < 1) throw std::invalid_argument("an engine needs at least one worker");
}

Engine::~Engine() {
  stop();
  join();
}

void Engine::start() {
  std::shared_ptr<Engine> self = shared_from_this();
  // Each thread holds a reference, so that a detached thread never outlives its engine.
  threads_.start(options_.workers, [self](int w) { self->worker_main(w); });
}

// ---- planner --------------------------------------------------------------------------------

void Engine::append(std::int64_t epoch, std::vector<std::int64_t> indices, bool gated) {
  std::vector<std::shared_ptr<Segment>> pruned;  // destroyed below, outside plan_mu_
  {
    std::lock_guard lock(plan_mu_);
    auto seg = std::make_shared<Segment>();
    seg->epoch = epoch;
    seg->start = segments_.empty() ? 0 : segments_.back()->end();
    seg->indices = std::move(indices);
    seg->gated = gated && loader_->has_epoch_end();
    seg->remaining.store(static_cast<std::int64_t>(seg->indices.size()), std::memory_order_relaxed);
    // An empty segment has nothing to load: its hook (if any) is the owner's to call.
    seg->hook_done = seg->indices.empty();
    segments_.push_back(std::move(seg));
    pruned = prune_locked();
    recompute_open_locked();
  }
  bump_plan_word();
}

bool Engine::replan(std::int64_t epoch, std::vector<std::int64_t> indices) {
  {
    std::lock_guard lock(plan_mu_);
    // Shut: gated behind a hook not yet done. Every position of it is at or past open_end_, so no
    // worker has looked it up (see "Re-planning" in engine.h).
    if (segments_.empty() || open_segments_ >= segments_.size()) return false;
    Segment& seg = *segments_.back();
    if (seg.epoch != epoch || open_segments_ + 1 != segments_.size()) return false;
    seg.indices = std::move(indices);
    seg.remaining.store(static_cast<std::int64_t>(seg.indices.size()), std::memory_order_relaxed);
    seg.hook_done = seg.indices.empty();
    recompute_open_locked();
  }
  bump_plan_word();
  return true;
}

// NOTE [ Engine prunes segments behind the consumer ] (engine.h). Ordering: a worker's last use
// of a job's raw Segment* (count_finished, run_epoch_hook) comes before it publishes the position
// (R1); the consumer takes it (A1) before it stores consumer_next_ past it (release, U1); so a
// segment that ends before the consumer_next_ loaded here (acquire, U1) is no worker's any more.
std::vector<std::shared_ptr<Engine::Segment>> Engine::prune_locked() {
  const std::int64_t consumer = consumer_next_.load(std::memory_order_acquire);  // U1
  std::size_t drop = 0;
  while (drop < open_segments_ && segments_[drop]->end() < consumer) ++drop;
  const auto cut = segments_.begin() + static_cast<std::ptrdiff_t>(drop);
  std::vector<std::shared_ptr<Segment>> pruned(std::make_move_iterator(segments_.begin()),
                                               std::make_move_iterator(cut));
  segments_.erase(segments_.begin(), cut);
  open_segments_ -= drop;
  return pruned;
}

std::int64_t Engine::planned_end() const {
  std::lock_guard lock(plan_mu_);
  return segments_.empty() ? 0 : segments_.back()->end();
}

Task Engine::task_at(std::int64_t position) const {
  std::lock_guard lock(plan_mu_);  // the segment may be re-planned (replan) while shut
  const std::shared_ptr<Segment>* found = segment_locked(position);
  if (!found) return {};
  const Segment& seg = **found;
  return {position, seg.epoch, seg.indices[static_cast<std::size_t>(position - seg.start)]};
}

std::vector<SegmentSpan> Engine::segments() const {
  std::lock_guard lock(plan_mu_);
  std::vector<SegmentSpan> out;
  out.reserve(segments_.size());
  for (const auto& seg : segments_) out.push_back({seg->epoch, seg->start, seg->end()});
  return out;
}

std::shared_ptr<Engine::Segment> Engine::segment_of(std::int64_t position,
                                                    const std::shared_ptr<Segment>& cached) const {
  if (cached && position >= cached->start && position < cached->end()) return cached;
  std::lock_guard lock(plan_mu_);
  const std::shared_ptr<Segment>* seg = segment_locked(position);
  return seg ? *seg : nullptr;
}

const std::shared_ptr<Engine::Segment>* Engine::segment_locked(std::int64_t position) const {
  auto it = std::upper_bound(
      segments_.begin(), segments_.end(), position,
      [](std::int64_t p, const std::shared_ptr<Segment>& s) { return p < s->start; });
  while (it != segments_.begin()) {
    --it;
    if (position >= (*it)->start && position < (*it)->end()) return &*it;
    if (position >= (*it)->end()) break;
  }
  return nullptr;
}

// Segments [0, open_segments_) are loadable: ungated, or gated behind a finished hook.
void Engine::recompute_open_locked() {
  while (open_segments_ < segments_.size()) {
    const Segment& seg = *segments_[open_segments_];
    if (seg.gated && open_segments_ > 0 && !segments_[open_segments_ - 1]->hook_done) break;
    ++open_segments_;
  }
  const std::int64_t end = open_segments_ == 0 ? 0 : segments_[open_segments_ - 1]->end();
  open_end_.store(end, std::memory_order_release);  // P1
}

void Engine::bump_plan_word() noexcept {
  std::uint32_t cur = plan_word_.load(std::memory_order_relaxed);
  while (!plan_word_.compare_exchange_weak(cur, (cur & kStopBit) | ((cur + 1) & ~kStopBit),
                                           std::memory_order_release, std::memory_order_relaxed)) {
  }
  wake_all(plan_word_);  // P1
}

// ---- workers --------------------------------------------------------------------------------

bool Engine::wait_loadable(std::int64_t position) noexcept {
  for (;;) {
    const std::uint32_t word = plan_word_.load(std::memory_order_acquire);  // P2
    if (word & kStopBit) return false;
    if (position < open_end_.load(std::memory_order_acquire)) break;  // P2
    wait_for_change(plan_word_, word, std::chrono::nanoseconds(-1));
  }
  return ring_.wait_free(position);
}

void Engine::worker_main(int worker) {
  loader_->thread_start(worker);
  std::atomic<std::int64_t>& busy = busy_ns_[static_cast<std::size_t>(worker)].value;
  const std::size_t max_run = std::min(options_.max_run, loader_->max_run());
  std::vector<Job> run;
  run.reserve(max_run);
  std::vector<std::pair<Delivery, Segment*>> deferred;
  std::shared_ptr<Segment> cached;  // keeps a segment pruned meanwhile alive (see the NOTE)
  // Loader::round_robin: this worker's positions are worker, worker + workers, ... (no claim
  // counter: each position has exactly one owner, which waits for it as a claimer would).
  const bool round_robin = loader_->round_robin();
  std::int64_t own_next = worker;
  while (!stopping()) {
    const std::int64_t p = round_robin ? own_next : ring_.claim();
    if (round_robin) own_next += options_.workers;
    if (!wait_loadable(p)) break;
    const std::int64_t start = now_ns();
    // The first position is ours; more follow while they are ready and cheap (one enter/leave).
    bool entered = false;
    std::size_t taken = 0;
    for (std::int64_t q = p;;) {
      // A hit copies no shared_ptr: no reference-count traffic per position.
      if (!cached || q < cached->start || q >= cached->end()) cached = segment_of(q, nullptr);
      Job& job = run.emplace_back();
      ++taken;
      job.segment = cached.get();
      job.prep.task = {q, cached->epoch,
                       cached->indices[static_cast<std::size_t>(q - cached->start)]};
      job.skip = q < skip_before_.load(std::memory_order_acquire);
      if (!job.skip) {
        if (!entered) {
          if (!loader_->enter(worker)) {
            run.clear();
            loader_->thread_exit(worker);
            return;
          }
          entered = true;
        }
        const std::int64_t t0 = now_ns();
        set_activity(worker, WorkerPhase::kLoading, q);
        loader_->prepare(worker, job.prep);
        job.load_ns = now_ns() - t0;
      }
      if (taken >= max_run || now_ns() - start >= options_.run_budget.count() || stopping()) break;
      if (max_run > 1 && publish_early(worker, job, deferred)) run.pop_back();
      if (round_robin || !ring_.try_claim(open_end_.load(std::memory_order_acquire), q))
        break;  // P2
    }
    if (entered) loader_->leave(worker);
    for (auto& [d, segment] : deferred) {  // last positions of their epochs: hook, then publish
      set_activity(worker, WorkerPhase::kHook, d.task.position);
      run_epoch_hook(worker, segment);
      publish(std::move(d));
    }
    deferred.clear();
    bool stopped = false;
    for (Job& job : run) {
      if (!stopped && !deliver(worker, job)) stopped = true;
    }
    run.clear();  // leftover payloads (after a stop) release what they hold
    set_activity(worker, WorkerPhase::kIdle, -1);
    busy.store(busy.load(std::memory_order_relaxed) + (now_ns() - start),
               std::memory_order_release);
    if (stopped) break;
  }
  loader_->thread_exit(worker);
}

bool Engine::publish_early(int worker, Job& job,
                           std::vector<std::pair<Delivery, Segment*>>& deferred) {
  if (job.prep.bytes > kEarlyPublishBytes) return false;
  BufferLease buffer;
  const bool needs_buffer =
      !job.skip && job.prep.error.empty() && !job.prep.failed && job.prep.bytes > 0;
  if (needs_buffer) {
    buffer = pool_->try_acquire(job.prep.bytes, job.prep.task.position);
    if (!buffer) return false;
    count_in_flight_buffer(in_flight_buffers_, *pool_);
  }
  Delivery d = fill_delivery(worker, job, std::move(buffer));
  if (count_finished(job.segment)) {
    deferred.emplace_back(std::move(d), job.segment);
  } else {
    publish(std::move(d));
  }
  return true;
}

// Fills the job's buffer and publishes it. False when the engine stopped while waiting.
bool Engine::deliver(int worker, Job& job) {
  BufferLease buffer;
  bool out_of_memory = false;
  if (!job.skip && job.prep.error.empty() && !job.prep.failed && job.prep.bytes > 0) {
    const std::int64_t position = job.prep.task.position;
    const std::function<bool()> may_exceed = [this, position] {
      return position <= consumer_next_.load(std::memory_order_acquire) &&  // U1
             in_flight_buffers_.load(std::memory_order_acquire) > 0;
    };
    try {
      set_activity(worker, WorkerPhase::kBuffer, position);
      buffer = pool_->acquire(job.prep.bytes, stopping_, position, &may_exceed);
      if (!buffer) return false;  // stopped while waiting for a buffer
      count_in_flight_buffer(in_flight_buffers_, *pool_);
    } catch (const std::bad_alloc&) {
      job.prep.error = "out of memory: the buffer pool could not allocate " +
                       std::to_string(job.prep.bytes) + " bytes";
      out_of_memory = true;
    }
  }
  set_activity(worker, WorkerPhase::kFilling, job.prep.task.position);
  Delivery d = fill_delivery(worker, job, std::move(buffer));
  d.out_of_memory = out_of_memory;
  if (count_finished(job.segment)) {
    set_activity(worker, WorkerPhase::kHook, job.prep.task.position);
    run_epoch_hook(worker, job.segment);
  }
  publish(std::move(d));
  return true;
}

Delivery Engine::fill_delivery(int worker, Job& job, BufferLease buffer) {
  Delivery d;
  d.task = job.prep.task;
  d.worker = worker;
  d.skipped = job.skip;
  if (job.skip) return d;
  const std::int64_t t0 = now_ns();
  d.error = std::move(job.prep.error);
  d.buffer = std::move(buffer);
  if (d.error.empty()) {
    loader_->fill(worker, job.prep, d.buffer.data(), d.buffer.capacity());
    d.failed = job.prep.failed;
    d.payload = std::move(job.prep.payload);
  }
  d.load_ns = job.load_ns + (now_ns() - t0);
  return d;
}

void Engine::publish(Delivery d) {
  published_.fetch_add(1, std::memory_order_relaxed);
  const std::int64_t position = d.task.position;
  ring_.publish(position, std::move(d));
}

bool Engine::count_finished(Segment* segment) {
  return segment->remaining.fetch_sub(1, std::memory_order_acq_rel) == 1;
}

void Engine::run_epoch_hook(int worker, Segment* segment) {
  std::unique_ptr<Payload> error;
  // Not after stop(): a worker whose user call returned late (abandoned by join_for) must not run
  // more user code, e.g. a hook the owner has run itself meanwhile.
  if (loader_->has_epoch_end() && !stopping()) error = loader_->epoch_end(worker, segment->epoch);
  {
    std::lock_guard lock(plan_mu_);
    segment->hook_error = std::move(error);
    segment->hook_done = true;
    recompute_open_locked();
  }
  bump_plan_word();
}

// ---- consumer -------------------------------------------------------------------------------

bool Engine::ready() noexcept {
  if (asked_ns_ == 0) asked_ns_ = now_ns();
  return ring_.ready(next_);
}

bool Engine::wait_ready(std::chrono::nanoseconds timeout) noexcept {
  PYLOADER_CONSUMER_ROLE();
  const std::int64_t t0 = now_ns();
  if (asked_ns_ == 0) asked_ns_ = t0;
  const bool ok = ring_.wait_ready(next_, timeout);
  pending_wait_ns_ += now_ns() - t0;
  return ok;
}

Delivery Engine::take() noexcept {
  PYLOADER_CONSUMER_ROLE();
  const std::int64_t now = now_ns();
  const std::int64_t in_flight = published_.load(std::memory_order_relaxed) - next_;
  Delivery d = ring_.take(next_++);
  if (d.buffer) in_flight_buffers_.fetch_sub(1, std::memory_order_acq_rel);
  consumer_next_.store(next_, std::memory_order_release);  // U1: pairs with may_exceed's load
  // The new next position may now grow the pool: a worker waiting for it must re-check
  // may_exceed. wake_all() bumps the pool's wake word (and makes a syscall only when a waiter is
  // registered); a waiter registers and loads the word before its check, so one that checked
  // before the store above cannot sleep through it (B1 pairs with B2 in buffer_pool.h).
  pool_->wake_all();
  if (!d.skipped) {
    std::lock_guard lock(stats_mu_);
    if (stats_.empty() || stats_.back().epoch != d.task.epoch) {
      if (stats_.size() >= std::max<std::size_t>(options_.stats_window, 1)) {
        earlier_stats_.merge(stats_.front());
        stats_.pop_front();
      }
      EpochStats& e = stats_.emplace_back();
      e.epoch = e.first_epoch = d.task.epoch;
      e.epochs = 1;
      e.first_ns = asked_ns_ ? asked_ns_ : now;
      e.busy_first_ns = worker_busy_ns();
    }
    EpochStats& e = stats_.back();
    ++e.batches;
    e.load_us.record(static_cast<std::uint32_t>(
        std::min<std::int64_t>(d.load_ns / 1000, std::numeric_limits<std::uint32_t>::max())));
    e.wait_ns += pending_wait_ns_;
    e.last_ns = now;
    e.busy_last_ns = worker_busy_ns();
    e.peak_in_flight = std::max(e.peak_in_flight, in_flight);
    e.pool_buffers = pool_->buffers_now();
    e.pool_bytes = pool_->bytes_now();
  }
  pending_wait_ns_ = 0;
  asked_ns_ = 0;
  return d;
}

void Engine::skip_to(std::int64_t position) noexcept {
  std::int64_t cur = skip_before_.load(std::memory_order_relaxed);
  while (cur < position &&
         !skip_before_.compare_exchange_weak(cur, position, std::memory_order_release,
                                             std::memory_order_relaxed)) {
  }
}

std::unique_ptr<Payload> Engine::take_epoch_error(std::int64_t epoch) {
  std::lock_guard lock(plan_mu_);
  for (auto& seg : segments_) {
    if (seg->epoch == epoch && seg->hook_error) return std::move(seg->hook_error);
  }
  return nullptr;
}

StatsWindow Engine::stats() const {
  std::lock_guard lock(stats_mu_);
  return {{stats_.begin(), stats_.end()}, earlier_stats_};
}

std::int64_t Engine::worker_busy_ns() const noexcept {
  std::int64_t total = 0;
  for (int w = 0; w < options_.workers; ++w) {
    total += busy_ns_[static_cast<std::size_t>(w)].value.load(std::memory_order_acquire);
  }
  return total;
}

// ---- diagnostics ----------------------------------------------------------------------------

void Engine::set_activity(int worker, WorkerPhase phase, std::int64_t position) noexcept {
  ActivitySlot& slot = activity_[static_cast<std::size_t>(worker)];
  const std::int64_t now = now_ns();
  std::lock_guard lock(slot.mu);
  slot.phase = phase;
  slot.position = position;
  slot.since_ns = now;
}

// The task is left with only its position set; callers look the rest up (task_at) if they need it.
WorkerActivity Engine::read_activity(int worker, std::int64_t now) const noexcept {
  const ActivitySlot& slot = activity_[static_cast<std::size_t>(worker)];
  WorkerActivity a;
  a.worker = worker;
  std::lock_guard lock(slot.mu);
  a.phase = slot.phase;
  a.task.position = slot.position;
  a.elapsed = std::chrono::nanoseconds(std::max<std::int64_t>(0, now - slot.since_ns));
  return a;
}

std::vector<WorkerActivity> Engine::activity() const {
  std::vector<WorkerActivity> out;
  const std::int64_t now = now_ns();
  for (int w = 0; w < options_.workers; ++w) {
    WorkerActivity a = read_activity(w, now);
    if (a.task.position >= 0) a.task = task_at(a.task.position);
    out.push_back(a);
  }
  return out;
}

WorkerActivity Engine::activity_on(std::int64_t position) const noexcept {
  const std::int64_t now = now_ns();
  for (int w = 0; w < options_.workers; ++w) {
    const WorkerActivity a = read_activity(w, now);
    if (a.phase != WorkerPhase::kIdle && a.task.position == position) return a;
  }
  return {};
}

std::string Engine::describe(const WorkerActivity& a) const {
  char seconds[32];
  std::snprintf(seconds, sizeof seconds, "%.1f s",
                std::chrono::duration<double>(a.elapsed).count());
  const std::string where = " (epoch " + std::to_string(a.task.epoch) + ", for " + seconds + ")";
  std::string what;
  switch (a.phase) {
    case WorkerPhase::kIdle:
      what = "not loading any batch";
      break;
    case WorkerPhase::kLoading:
      what = "inside " + loader_->call_name(a.task.index) + where;
      break;
    case WorkerPhase::kBuffer:
      what = "waiting for a free buffer for batch " + std::to_string(a.task.index) + where;
      break;
    case WorkerPhase::kFilling:
      what = "writing batch " + std::to_string(a.task.index) + where;
      break;
    case WorkerPhase::kHook:
      what = "inside on_epoch_end() after epoch " + std::to_string(a.task.epoch) + " (for " +
             seconds + ")";
      break;
  }
  return loader_->worker_name(a.worker) + ", " + what;
}

// ---- shutdown -------------------------------------------------------------------------------

void Engine::stop() noexcept {
  if (stopping_.exchange(true, std::memory_order_acq_rel)) return;
  ring_.stop();
  plan_word_.fetch_or(kStopBit, std::memory_order_release);
  wake_all(plan_word_);
  pool_->wake_all();
  loader_->interrupt();
}

void Engine::join() noexcept {
  if (threads_.is_member()) {
    threads_.detach();  // each thread holds a reference to us and ends on its own
  } else {
    threads_.join();
  }
}

std::vector<WorkerActivity> Engine::join_for(std::chrono::nanoseconds grace) {
  std::vector<WorkerActivity> abandoned;
  if (threads_.is_member()) {
    threads_.detach();  // each thread holds a reference to us and ends on its own
    return abandoned;
  }
  const std::vector<int> ids = threads_.join_for(grace);
  if (ids.empty()) return abandoned;
  const std::vector<WorkerActivity> now = activity();
  for (int w : ids) abandoned.push_back(now[static_cast<std::size_t>(w)]);
  return abandoned;
}

}  // namespace pyloader
