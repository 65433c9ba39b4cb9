// bind_engine.cpp: pyloader._C.Engine, one run of the core Engine over a source (source.h), and
// pyloader._C.Source, the base of the native sources.
//
// The Engine binding converts and releases the GIL; the consumer's policy (the wait in slices,
// the timeout, the starvation report, pool exhaustion, stalls, one consumer thread at a time) is
// the core's Consumer (consumer.h), and the bounded join the core Engine's (join_for). What is
// left here: release the GIL around each slice and around the join, check for signals (Ctrl-C)
// between slices, and turn each outcome into its Python exception or warning (the warnings'
// categories, the thresholds and the grace come from the Prefetcher).
#include <pybind11/numpy.h>
#include <pybind11/stl.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "../core/consumer.h"
#include "../core/engine.h"
#include "bindings.h"
#include "errors.h"
#include "layout.h"
#include "pool.h"
#include "py_loader.h"
#include "source.h"

namespace pyloader::python {

namespace {

// A Python Sequence: PyLoader runs its __getitem__ on the engine's threads.
class SequenceSource final : public PySource {
 public:
  // `error_factory(exc, index, epoch, position, worker)` makes the exception the consumer sees
  // for a batch whose __getitem__ raised `exc`.
  SequenceSource(py::object sequence, py::object epoch_end, int workers, py::object error_factory)
      : loader_(std::make_shared<PyLoader>(std::move(sequence), std::move(epoch_end), workers)),
        error_factory_(std::move(error_factory)) {}

  std::shared_ptr<Loader> loader() const override { return loader_; }

  py::object deliver(Delivery d) override {
    auto* batch = static_cast<PyBatch*>(d.payload.get());
    if (d.failed) {
      raise_object(
          error_factory_(batch->error, d.task.index, d.task.epoch, d.task.position, d.worker));
    }
    const BatchMemory memory = hand_over(std::move(d.buffer));
    return build(batch->layout, memory.base, memory.lease);
  }

 private:
  std::shared_ptr<PyLoader> loader_;
  py::object error_factory_;
};

// One EpochStats as a dict; load_us is the histogram's counts (bucket b holds the load times in
// [LOAD_US_BUCKETS[b], LOAD_US_BUCKETS[b + 1]) microseconds).
py::dict stats_record(const EpochStats& s) {
  py::dict d;
  d["epoch"] = s.epoch;
  d["first_epoch"] = s.first_epoch;
  d["epochs"] = s.epochs;
  d["batches"] = s.batches;
  const auto& counts = s.load_us.counts();
  d["load_us"] = py::array_t<std::uint64_t>(static_cast<py::ssize_t>(counts.size()), counts.data());
  d["wait_ns"] = s.wait_ns;
  d["wall_ns"] = s.wall_ns();
  d["busy_ns"] = s.busy_ns();
  d["peak_in_flight"] = s.peak_in_flight;
  d["pool_buffers"] = s.pool_buffers;
  d["pool_bytes"] = s.pool_bytes;
  return d;
}

class PyEngine {
 public:
  PyEngine(py::object sequence, py::object epoch_end, const PyPool& pool, int workers,
           std::size_t depth, double run_budget_us, py::object error_factory,
           py::object warning_category, py::object stall_category,
           std::optional<double> stall_after_s, std::optional<double> pool_wait_s)
      : warning_category_(std::move(warning_category)),
        stall_category_(stall_category.is_none() ? warning_category_ : std::move(stall_category)) {
    EngineOptions options;
    options.workers = workers;
    options.depth = depth;
    options.run_budget = std::chrono::nanoseconds(static_cast<std::int64_t>(run_budget_us * 1000));
    if (py::isinstance<PySource>(sequence)) {  // a native source: it has its own hook and errors
      source_ = sequence.cast<std::shared_ptr<PySource>>();
    } else {
      source_ = std::make_shared<SequenceSource>(std::move(sequence), std::move(epoch_end), workers,
                                                 std::move(error_factory));
    }
    ConsumerOptions policy;
    if (stall_after_s) policy.stall_after = to_ns(*stall_after_s);
    if (pool_wait_s) policy.exhausted_after = to_ns(*pool_wait_s);
    consumer_ = std::make_shared<Consumer>(Engine::create(options, pool.pool, source_->loader()),
                                           pool.pool, policy);
  }
  ~PyEngine() {
    try {
      close(kDestructorGrace);  // the owner closes first; this is for an engine it never used
    } catch (...) {
    }
  }

  void start() { live()->engine().start(); }

  void append(std::int64_t epoch,
              py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> indices,
              bool gated) {
    std::vector<std::int64_t> v(indices.data(), indices.data() + indices.size());
    live()->engine().append(epoch, std::move(v), gated);
  }

  // Called from inside an epoch hook (on an engine thread, GIL held): see Engine::replan.
  bool replan(std::int64_t epoch,
              py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> indices) {
    std::vector<std::int64_t> v(indices.data(), indices.data() + indices.size());
    return live()->engine().replan(epoch, std::move(v));
  }

  py::list segments() {
    py::list out;
    for (const SegmentSpan& s : live()->engine().segments())
      out.append(py::make_tuple(s.epoch, s.start, s.end));
    return out;
  }

  std::int64_t next_position() { return live()->engine().next_position(); }

  // The next batch; StopIteration once the position reaches `end` (checked in the same turn as
  // the take, so that of two threads racing for the last batch of an epoch, one gets it and the
  // other StopIteration or ConcurrentConsumerError: never the first batch of the next epoch).
  py::object next_batch(std::optional<double> timeout, std::optional<std::int64_t> end) {
    const std::shared_ptr<Consumer> consumer =
        live();  // alive until we return, even if closed meanwhile
    Consumer::Turn turn = consumer->turn();
    if (end && turn.next_position() >= *end) throw py::stop_iteration();
    if (!turn.ready()) wait(*consumer, turn, timeout);
    Delivery d = turn.take();
    if (!d.error.empty()) {
      raise(d.out_of_memory ? PyExc_MemoryError : PyExc_RuntimeError,
            "pyloader: batch " + std::to_string(d.task.index) + ": " + d.error);
    }
    py::object batch = source_->deliver(std::move(d));
    turn.handed_over();
    return batch;
  }

  // Skips every position below `position`: they are not loaded (those already loaded are dropped).
  // A position whose load was in progress is waited for, at most `timeout` (TimeoutError).
  void drain_to(std::int64_t position, std::optional<double> timeout) {
    const std::shared_ptr<Consumer> consumer = live();
    Consumer::Turn turn = consumer->turn();
    turn.skip_to(position);
    while (turn.next_position() < position) {
      if (!turn.ready()) wait(*consumer, turn, timeout);
      Delivery d = turn.take();  // dropped here, with the GIL held
    }
  }

  py::object epoch_error(std::int64_t epoch) {
    std::unique_ptr<Payload> p = live()->engine().take_epoch_error(epoch);
    if (!p) return py::none();
    return static_cast<PyBatch*>(p.get())->error;  // every source's hook reports a PyBatch
  }

  // {"recent": [record per epoch, in order], "earlier": the older epochs merged, or None}
  py::dict stats() {
    const StatsWindow w = live()->engine().stats();
    py::list recent;
    for (const EpochStats& s : w.recent) recent.append(stats_record(s));
    py::dict out;
    out["recent"] = std::move(recent);
    out["earlier"] = w.earlier.epochs > 0 ? py::object(stats_record(w.earlier)) : py::none();
    return out;
  }

  // Workers that are inside a position (loading, waiting for its buffer, filling, running the
  // epoch hook): a stop now would interrupt them (process mode: mid-conversation, so the worker
  // process is replaced). Idle ones are between positions (e.g. waiting for a ring slot).
  int busy_workers() const {
    int busy = 0;
    for (const WorkerActivity& a : live()->engine().activity()) {
      if (a.phase != WorkerPhase::kIdle) ++busy;
    }
    return busy;
  }

  // Stops the engine (at once: no new position starts, no batch is taken any more) without
  // waiting for its workers; close() then joins them. Idempotent.
  void stop() {
    if (consumer_) consumer_->engine().stop();
  }

  // Stops and joins the workers. `grace_s`: wait at most that long, then abandon the workers
  // still inside user code (Engine::join_for); returns what each abandoned one was doing, in
  // words, for the caller's warning. None: wait for ever.
  std::vector<std::string> close(std::optional<double> grace_s) {
    std::vector<std::string> abandoned;
    if (!consumer_) return abandoned;
    // From here on the engine is closed to new calls; a call waiting in another thread holds its
    // own reference and returns once the stop wakes it.
    const std::shared_ptr<Consumer> consumer = std::move(consumer_);
    Engine& e = consumer->engine();
    e.stop();
    if (e.on_worker_thread()) {
      e.join();  // detaches: the threads hold the engine and end on their own
      return abandoned;
    }
    {
      py::gil_scoped_release release;
      // no Python below
      if (grace_s) {
        for (const WorkerActivity& a : e.join_for(to_ns(*grace_s))) {
          abandoned.push_back(e.describe(a));
        }
      } else {
        e.join();
      }
    }
    return abandoned;
  }  // with the GIL held: undelivered batches drop their Python objects with the last reference

 private:
  static constexpr double kDestructorGrace = 5.0;  // seconds

  static std::chrono::nanoseconds to_ns(double seconds) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::duration<double>(seconds));
  }

  std::shared_ptr<Consumer> live() const {
    if (!consumer_) raise(PyExc_RuntimeError, "this pyloader engine is closed");
    return consumer_;
  }

  void wait(const Consumer& consumer, Consumer::Turn& turn, std::optional<double> timeout) {
    std::optional<std::chrono::nanoseconds> limit;
    if (timeout) {
      limit = std::chrono::duration_cast<std::chrono::nanoseconds>(
          std::chrono::duration<double>(*timeout));
    }
    for (;;) {
      WaitOutcome outcome;
      {
        py::gil_scoped_release release;
        // no Python below
        outcome = turn.wait_slice(limit);
      }
      turn.resumed();  // taking the GIL back is part of the stall (a worker may hold it)
      if (outcome == WaitOutcome::kReady) return;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      switch (outcome) {
        case WaitOutcome::kStopped:
          raise(PyExc_RuntimeError, "this pyloader engine was closed while waiting for a batch");
        case WaitOutcome::kTimedOut: {
          const Task t = turn.pending();
          raise(PyExc_TimeoutError, "pyloader: batch " + std::to_string(t.index) + " (epoch " +
                                        std::to_string(t.epoch) +
                                        ") was not loaded within timeout=" +
                                        py::str(py::float_(*timeout)).cast<std::string>() + " s");
        }
        case WaitOutcome::kPoolStarved:
          if (PyErr_WarnEx(warning_category_.ptr(), consumer.starvation_message().c_str(), 1) !=
              0) {
            throw py::error_already_set();
          }
          break;
        case WaitOutcome::kPoolExhausted:
          raise(pool_exhausted_error(), consumer.exhausted_message());
        case WaitOutcome::kStalled:
          if (PyErr_WarnEx(stall_category_.ptr(),
                           consumer.stall_message(timeout.has_value()).c_str(), 1) != 0) {
            throw py::error_already_set();
          }
          break;
        case WaitOutcome::kReady:
        case WaitOutcome::kSlice:
          break;
      }
    }
  }

  std::shared_ptr<PySource> source_;
  std::shared_ptr<Consumer> consumer_;  // null once closed
  py::object warning_category_;
  py::object stall_category_;
};

}  // namespace

void register_engine(py::module_& m) {
  std::vector<std::uint64_t> bounds(LoadHistogram::kBuckets + 1);
  for (std::size_t b = 0; b < bounds.size(); ++b) bounds[b] = LoadHistogram::bucket_low(b);
  m.attr("LOAD_US_BUCKETS") =
      py::array_t<std::uint64_t>(static_cast<py::ssize_t>(bounds.size()), bounds.data());

  py::class_<PySource, std::shared_ptr<PySource>>(
      m, "Source", "A native source an Engine loads from (made by pyloader only).");

  py::class_<PyEngine>(m, "Engine")
      .def(py::init<py::object, py::object, const PyPool&, int, std::size_t, double, py::object,
                    py::object, py::object, std::optional<double>, std::optional<double>>(),
           py::arg("sequence"), py::arg("epoch_end"), py::arg("pool"), py::arg("workers"),
           py::arg("depth"), py::arg("run_budget_us"), py::arg("error_factory"),
           py::arg("warning_category"), py::arg("stall_category") = py::none(),
           py::arg("stall_after_s") = py::none(), py::arg("pool_wait_s") = py::none())
      .def("start", &PyEngine::start)
      .def("append", &PyEngine::append, py::arg("epoch"), py::arg("indices"), py::arg("gated"))
      .def("replan", &PyEngine::replan, py::arg("epoch"), py::arg("indices"))
      .def("segments", &PyEngine::segments)
      .def_property_readonly("next_position", &PyEngine::next_position)
      .def("next_batch", &PyEngine::next_batch, py::arg("timeout") = py::none(),
           py::arg("end") = py::none())
      .def("drain_to", &PyEngine::drain_to, py::arg("position"), py::arg("timeout") = py::none())
      .def("epoch_error", &PyEngine::epoch_error, py::arg("epoch"))
      .def("stats", &PyEngine::stats)
      .def("busy_workers", &PyEngine::busy_workers)
      .def("stop", &PyEngine::stop)
      .def("close", &PyEngine::close, py::arg("grace_s") = py::none());
}

}  // namespace pyloader::python
