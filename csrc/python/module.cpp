// module.cpp: pyloader._C, the pybind11 face of the core. No scheduling logic lives here: this
// file converts between Python objects and core types, and decides where the GIL is released.
//
// Classes
//   BufferPool  the core pool (shared by every engine a Prefetcher starts).
//   Lease       the base object of every array of one delivered batch; the buffer returns to the
//               pool when the last array (and the lease) dies.
//   Engine      one run of the core Engine over a Python Sequence: append epochs, take batches.
//   ProcLoader  process mode's core loader (proc_loader.h) with its Python callbacks; an Engine
//               made over one decodes each batch's layout (meta) into views of the shared buffer.
//   Packed      the worker process's side: one batch flattened, to be written into a buffer.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <optional>
#include <string>
#include <system_error>

#include "../core/buffer_pool.h"
#include "../core/engine.h"
#include "../core/gather.h"
#include "../core/proc_loader.h"
#include "layout.h"
#include "py_loader.h"

namespace py = pybind11;

namespace pyloader::python {
namespace {

constexpr auto kPollSlice = std::chrono::milliseconds(20);  // how often a waiting consumer checks signals
constexpr double kStarvedWarnSeconds = 2.0;

PinRequest parse_pin(const std::string& pin) {
  if (pin == "auto") return PinRequest::kAuto;
  if (pin == "cuda") return PinRequest::kCuda;
  if (pin == "mlock") return PinRequest::kMlock;
  if (pin == "off") return PinRequest::kOff;
  throw py::value_error("pin must be 'auto', 'cuda', 'mlock' or 'off', got '" + pin + "'");
}

struct PyPool {
  std::shared_ptr<BufferPool> pool;
};

struct Lease {
  BufferLease buffer;
};

py::dict pool_info(const BufferPool& pool) {
  const PoolInfo i = pool.info();
  py::dict d;
  d["buffers"] = i.buffers;
  d["leased"] = i.leased;
  d["bytes"] = i.bytes;
  d["peak_bytes"] = i.peak_bytes;
  d["max_bytes"] = i.max_bytes;
  d["pinned_bytes"] = i.pinned_bytes;
  d["pin_failures"] = i.pin_failures;
  d["allocations"] = i.allocations;
  d["pin_method"] = i.pin_method;
  d["pin_reason"] = i.pin_reason;
  d["pin_error"] = i.pin_error;
  return d;
}

[[noreturn]] void raise(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

// A batch as the worker process sees it: flattened once (GIL held), written into a buffer (GIL
// released), its layout sent as meta. The checks and messages are thread mode's (PyLoader).
class Packed {
 public:
  Packed(py::object value, std::int64_t index) : index_(index) { flatten_returned(value, layout_, index); }
  std::size_t nbytes() const { return layout_.bytes; }
  py::tuple meta() const { return layout_meta(layout_); }
  // Copies the arrays to address..address+capacity (the worker's mapping of a shared buffer).
  void write(std::uintptr_t address, std::size_t capacity) {
    if (written_) raise(PyExc_RuntimeError, "this batch was written already");
    if (capacity < layout_.bytes) {
      raise(PyExc_ValueError, "batch " + std::to_string(index_) + " needs " + std::to_string(layout_.bytes) +
                                  " bytes, the buffer holds " + std::to_string(capacity));
    }
    std::vector<py::object> trash;
    {
      py::gil_scoped_release release;
      // no Python below: copy_leaves moves the sources' references into trash
      copy_leaves(layout_, reinterpret_cast<std::byte*>(address), trash);
    }
    written_ = true;
  }
  py::bytes tobytes() {
    std::string out(layout_.bytes, '\0');
    write(reinterpret_cast<std::uintptr_t>(out.data()), out.size());
    return py::bytes(out);
  }

 private:
  Layout layout_;
  std::int64_t index_;
  bool written_ = false;
};

// Python objects a native callback holds: released with the GIL, wherever the last copy dies.
struct PyRefs {
  py::object replace, hook, errors;
  ~PyRefs() {
    if (interpreter_finalizing()) {  // leak rather than touch a dying interpreter
      replace.release();
      hook.release();
      errors.release();
      return;
    }
    if (PyGILState_Check()) return;
    py::gil_scoped_acquire gil;
    replace = py::object();
    hook = py::object();
    errors = py::object();
  }
};

// Process mode's loader, with the Python side's callbacks:
//   replace(slot) -> (fd, pid, death)   starts a new worker for a slot whose worker died
//   hook(epoch)                         the Sequence's on_epoch_end (None: no hook)
//   errors(kind, blob, index, epoch, position, worker, pid) -> exception   for failed batches
class PyProcLoader {
 public:
  PyProcLoader(std::vector<int> fds, std::vector<int> pids, const PyPool& pool, py::object replace,
               py::object hook, py::object errors, int max_retries, std::int64_t hooks_before) {
    Arena* arena = pool.pool->arena();
    if (!arena) throw py::value_error("process mode needs a BufferPool made with arena_bytes");
    if (fds.size() != pids.size() || fds.empty()) throw py::value_error("one fd and one pid per worker");
    refs_ = std::make_shared<PyRefs>();
    refs_->replace = std::move(replace);
    refs_->hook = std::move(hook);
    refs_->errors = std::move(errors);
    std::vector<ProcWorker> workers;
    for (std::size_t i = 0; i < fds.size(); ++i) workers.push_back({fds[i], pids[i]});
    std::shared_ptr<PyRefs> refs = refs_;
    ProcLoader::Replace on_death = [refs](int slot, std::string& death) -> ProcWorker {
      if (interpreter_finalizing()) {
        death = "the interpreter is shutting down";
        return {};
      }
      py::gil_scoped_acquire gil;
      try {
        auto t = refs->replace(slot).cast<py::tuple>();
        death = t[2].cast<std::string>();
        return {t[0].cast<int>(), t[1].cast<int>()};
      } catch (py::error_already_set& e) {
        death = std::string("starting a new worker failed: ") + e.what();
        return {};
      }
    };
    ProcLoader::Hook on_epoch;
    if (!refs_->hook.is_none()) {
      on_epoch = [refs](int, std::int64_t epoch) -> std::unique_ptr<Payload> {
        if (interpreter_finalizing()) return nullptr;
        py::gil_scoped_acquire gil;
        try {
          refs->hook(epoch);
        } catch (py::error_already_set& e) {
          return error_batch(e);
        }
        return nullptr;
      };
    }
    loader_ = std::make_shared<ProcLoader>(std::move(workers), arena->base(), arena->size(), std::move(on_death),
                                           std::move(on_epoch), max_retries, hooks_before);
  }

  std::shared_ptr<ProcLoader> loader() const { return loader_; }
  const PyRefs& refs() const { return *refs_; }

  py::list workers() const {
    py::list out;
    for (const ProcWorker& w : loader_->workers()) out.append(py::make_tuple(w.fd, w.pid));
    return out;
  }

 private:
  std::shared_ptr<PyRefs> refs_;
  std::shared_ptr<ProcLoader> loader_;
};

// The native source of a pyloader.ArraySequence: its columns for the core's GatherLoader, and
// how to rebuild a delivered batch (a single array, a tuple or a dict of arrays).
class PyArraySource {
 public:
  PyArraySource(py::list arrays, py::object keys, std::int64_t batch_size, int split_threads)
      : keys_(std::move(keys)) {
    std::vector<GatherColumn> columns;
    std::int64_t samples = -1;
    for (py::handle h : arrays) {
      auto arr = py::reinterpret_borrow<py::array>(h);
      if (arr.ndim() < 1) throw py::value_error("ArraySequence arrays need at least one dimension");
      GatherColumn col;
      col.base = static_cast<const std::byte*>(arr.data());
      col.row_stride = static_cast<std::int64_t>(arr.strides(0));
      col.row_bytes = static_cast<std::size_t>(arr.itemsize());
      std::vector<py::ssize_t> row_shape;
      for (py::ssize_t d = 1; d < arr.ndim(); ++d) {
        row_shape.push_back(arr.shape(d));
        col.row_bytes *= static_cast<std::size_t>(arr.shape(d));
      }
      if (samples >= 0 && arr.shape(0) != samples) throw py::value_error("ArraySequence arrays differ in length");
      samples = arr.shape(0);
      columns.push_back(col);
      dtypes_.push_back(arr.dtype());
      row_shapes_.push_back(std::move(row_shape));
      arrays_.push_back(std::move(arr));  // keeps the memory (and any mmap) alive
    }
    samples_ = samples;
    loader_ = std::make_shared<GatherLoader>(std::move(columns), samples, batch_size, split_threads);
  }

  // The order is checked here, once per epoch: the workers index memory with it unchecked.
  void set_order(std::int64_t epoch, py::object order) {
    std::shared_ptr<const std::vector<std::int64_t>> v;
    if (!order.is_none()) {
      auto a = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(order);
      if (!a) throw py::error_already_set();
      if (a.ndim() != 1 || a.size() != samples_) {
        throw py::value_error("the sample order of epoch " + std::to_string(epoch) + " must hold " +
                              std::to_string(samples_) + " indices, got " + std::to_string(a.size()));
      }
      const std::int64_t* data = a.data();
      for (py::ssize_t k = 0; k < a.size(); ++k) {
        if (data[k] < 0 || data[k] >= samples_) {
          throw py::index_error("the sample order of epoch " + std::to_string(epoch) + " has index " +
                                std::to_string(data[k]) + " at position " + std::to_string(k) +
                                ", outside [0, " + std::to_string(samples_) + ")");
        }
      }
      v = std::make_shared<const std::vector<std::int64_t>>(data, data + a.size());
    }
    loader_->set_order(epoch, std::move(v));
  }

  py::object build(const GatherBatch& batch, std::byte* base, py::handle lease) const {
    const std::vector<std::size_t> at = loader_->offsets(batch.rows, nullptr);
    py::list out;
    for (std::size_t c = 0; c < dtypes_.size(); ++c) {
      std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(batch.rows)};
      shape.insert(shape.end(), row_shapes_[c].begin(), row_shapes_[c].end());
      out.append(view_array(dtypes_[c], std::move(shape), base == nullptr ? nullptr : base + at[c], lease));
    }
    if (keys_.is_none()) return out.size() == 1 ? py::object(out[0]) : py::object(py::tuple(out));
    py::dict d;
    auto keys = py::reinterpret_borrow<py::tuple>(keys_);
    for (std::size_t c = 0; c < dtypes_.size(); ++c) d[keys[c]] = out[c];
    return d;
  }

  std::shared_ptr<GatherLoader> loader() const { return loader_; }

 private:
  py::object keys_;  // None: a single array or a tuple; else a tuple of dict keys
  std::int64_t samples_ = 0;
  std::vector<py::array> arrays_;
  std::vector<py::dtype> dtypes_;
  std::vector<std::vector<py::ssize_t>> row_shapes_;
  std::shared_ptr<GatherLoader> loader_;
};

class PyEngine {
 public:
  PyEngine(py::object sequence, py::object epoch_end, const PyPool& pool, int workers,
           std::size_t depth, double run_budget_us, py::object error_factory,
           py::object warning_category)
      : pool_(pool.pool),
        error_factory_(std::move(error_factory)),
        warning_category_(std::move(warning_category)) {
    EngineOptions options;
    options.workers = workers;
    options.depth = depth;
    options.run_budget = std::chrono::nanoseconds(static_cast<std::int64_t>(run_budget_us * 1000));
    std::shared_ptr<Loader> loader;
    if (py::isinstance<PyArraySource>(sequence)) {  // native gather: no Python per batch
      native_ = &sequence.cast<PyArraySource&>();
      native_ref_ = sequence;
      loader = native_->loader();
    } else if (py::isinstance<PyProcLoader>(sequence)) {  // process mode
      proc_ = &sequence.cast<PyProcLoader&>();
      native_ref_ = sequence;
      loader = proc_->loader();
      static py::handle loads = py::object(py::module_::import("pickle").attr("loads")).release();
      loads_ = py::reinterpret_borrow<py::object>(loads);
    } else {
      loader = std::make_shared<PyLoader>(std::move(sequence), std::move(epoch_end), workers);
    }
    engine_ = Engine::create(options, pool_, std::move(loader));
  }
  ~PyEngine() { close(); }

  void start() { live().start(); }

  void append(std::int64_t epoch, py::array_t<std::int64_t, py::array::c_style | py::array::forcecast> indices,
              bool gated) {
    std::vector<std::int64_t> v(indices.data(), indices.data() + indices.size());
    live().append(epoch, std::move(v), gated);
  }

  std::int64_t next_position() { return live().next_position(); }

  py::object next_batch(std::optional<double> timeout) {
    Engine& e = live();
    if (!e.ready()) wait(e, timeout);
    const auto taking = std::chrono::steady_clock::now();
    py::object batch = deliver(e.take());
    // The hand-off (taking the batch, building its arrays) is stall too: the consumer waits for
    // it. It is counted with the next batch, as take() has already closed this one's figures.
    e.add_wait(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - taking).count());
    return batch;
  }

  // Skips every position below `position`: they are not loaded (those already loaded are dropped).
  void drain_to(std::int64_t position) {
    Engine& e = live();
    e.skip_to(position);
    while (e.next_position() < position) {
      if (!e.ready()) wait(e, std::nullopt);
      Delivery d = e.take();  // dropped here, with the GIL held
    }
  }

  py::object epoch_error(std::int64_t epoch) {
    std::unique_ptr<Payload> p = live().take_epoch_error(epoch);
    if (!p) return py::none();
    return static_cast<PyBatch*>(p.get())->error;
  }

  py::list stats() {
    py::list out;
    for (const EpochStats& s : live().stats()) {
      py::dict d;
      d["epoch"] = s.epoch;
      d["batches"] = s.batches;
      d["load_us"] = py::array_t<std::uint32_t>(static_cast<py::ssize_t>(s.load_us.size()), s.load_us.data());
      d["wait_ns"] = s.wait_ns;
      d["wall_ns"] = s.last_ns - s.first_ns;
      d["busy_ns"] = s.busy_last_ns - s.busy_first_ns;
      d["peak_in_flight"] = s.peak_in_flight;
      d["pool_buffers"] = s.pool_buffers;
      d["pool_bytes"] = s.pool_bytes;
      out.append(std::move(d));
    }
    return out;
  }

  void close() {
    if (!engine_) return;
    engine_->stop();
    if (engine_->on_worker_thread()) {
      engine_->join();  // detaches: the threads hold the engine and end on their own
    } else {
      py::gil_scoped_release release;
      // no Python below
      engine_->join();
    }
    engine_.reset();  // with the GIL held: undelivered batches drop their Python objects
  }

 private:
  Engine& live() {
    if (!engine_) raise(PyExc_RuntimeError, "this pyloader engine is closed");
    return *engine_;
  }

  void wait(Engine& e, std::optional<double> timeout) {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
      bool ok;
      std::chrono::steady_clock::time_point woke;
      {
        py::gil_scoped_release release;
        // no Python below
        ok = e.wait_ready(kPollSlice);
        woke = std::chrono::steady_clock::now();
      }
      // Taking the GIL back is part of the stall (a worker may hold it).
      e.add_wait(std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - woke).count());
      if (ok) return;
      if (PyErr_CheckSignals() != 0) throw py::error_already_set();
      if (e.stopping()) raise(PyExc_RuntimeError, "this pyloader engine was closed while waiting for a batch");
      const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (timeout && waited >= *timeout) {
        const Task t = e.task_at(e.next_position());
        raise(PyExc_TimeoutError, "pyloader: batch " + std::to_string(t.index) + " (epoch " +
                                      std::to_string(t.epoch) + ") was not loaded within timeout=" +
                                      py::str(py::float_(*timeout)).cast<std::string>() + " s");
      }
      if (!warned_starved_) {
        const double starved = std::chrono::duration<double>(pool_->waiting_for()).count();
        if (starved >= kStarvedWarnSeconds) {
          warned_starved_ = true;
          const PoolInfo i = pool_->info();
          const std::string msg =
              "pyloader: workers have waited " + std::to_string(static_cast<int>(starved)) +
              " s for a free buffer: all " + std::to_string(i.buffers) + " buffers (" +
              std::to_string(i.bytes >> 20) + " MiB, max_pool_bytes=" + std::to_string(i.max_bytes) +
              ") hold batches that are still referenced. Drop references to old batches (or copy "
              "what you keep), or raise max_pool_bytes.";
          if (PyErr_WarnEx(warning_category_.ptr(), msg.c_str(), 1) != 0) throw py::error_already_set();
        }
      }
    }
  }

  py::object deliver(Delivery d) {
    if (!d.error.empty()) {
      raise(d.out_of_memory ? PyExc_MemoryError : PyExc_RuntimeError,
            "pyloader: batch " + std::to_string(d.task.index) + ": " + d.error);
    }
    if (native_) {
      const auto& gathered = static_cast<const GatherBatch&>(*d.payload);
      if (!d.buffer) return native_->build(gathered, nullptr, py::none());
      std::byte* base = d.buffer.data();
      py::object lease = py::cast(Lease{std::move(d.buffer)});
      return native_->build(gathered, base, lease);
    }
    if (proc_) return deliver_proc(std::move(d));
    auto* batch = static_cast<PyBatch*>(d.payload.get());
    if (d.failed) {
      py::object exc = error_factory_(batch->error, d.task.index, d.task.epoch, d.task.position, d.worker);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
      throw py::error_already_set();
    }
    if (!d.buffer) return build(batch->layout, nullptr, py::none());
    std::byte* base = d.buffer.data();
    py::object lease = py::cast(Lease{std::move(d.buffer)});
    return build(batch->layout, base, lease);
  }

  py::object deliver_proc(Delivery d) {
    auto* batch = static_cast<ProcBatch*>(d.payload.get());
    if (d.failed) {
      const char* kind = batch->kind == ProcBatch::kRaised ? "raised" : "died";
      py::object exc = proc_->refs().errors(kind, py::bytes(batch->message), d.task.index, d.task.epoch,
                                            d.task.position, d.worker, batch->pid);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
      throw py::error_already_set();
    }
    py::object meta = loads_(py::memoryview::from_memory(batch->meta.data(), static_cast<py::ssize_t>(batch->meta.size())));
    if (!d.buffer) return build_meta(meta, nullptr, 0, py::none());
    std::byte* base = d.buffer.data();
    const std::size_t capacity = d.buffer.capacity();
    py::object lease = py::cast(Lease{std::move(d.buffer)});
    return build_meta(meta, base, capacity, lease);
  }

  std::shared_ptr<BufferPool> pool_;
  std::shared_ptr<Engine> engine_;
  PyArraySource* native_ = nullptr;  // set for an ArraySequence's native source
  PyProcLoader* proc_ = nullptr;     // set in process mode
  py::object loads_;                 // pickle.loads, in process mode
  py::object native_ref_;            // keeps it (the source or the ProcLoader) alive
  py::object error_factory_;
  py::object warning_category_;
  bool warned_starved_ = false;
};

}  // namespace
}  // namespace pyloader::python

PYBIND11_MODULE(_C, m) {
  using namespace pyloader;
  using namespace pyloader::python;
  m.doc() = "pyloader's native core (private: use the pyloader package).";

  py::class_<PyPool>(m, "BufferPool")
      .def(py::init([](std::size_t max_bytes, const std::string& pin, std::size_t arena_bytes) {
             try {
               return PyPool{BufferPool::create(max_bytes, parse_pin(pin), arena_bytes)};
             } catch (const std::system_error& e) {
               raise(PyExc_OSError, std::string("pyloader: cannot make the shared-memory arena: ") + e.what());
             }
           }),
           py::arg("max_bytes"), py::arg("pin"), py::arg("arena_bytes") = 0)
      .def("info", [](const PyPool& p) { return pool_info(*p.pool); })
      .def_property_readonly("arena_fd", [](const PyPool& p) { return p.pool->arena() ? p.pool->arena()->fd() : -1; })
      .def_property_readonly("arena_size", [](const PyPool& p) { return p.pool->arena() ? p.pool->arena()->size() : 0; })
      .def("close_arena_fd", [](const PyPool& p) {
        if (p.pool->arena()) p.pool->arena()->close_fd();
      });

  py::class_<Lease>(m, "Lease")
      .def_property_readonly("nbytes", [](const Lease& l) { return l.buffer.capacity(); })
      .def_property_readonly("buffer_id", [](const Lease& l) { return l.buffer.id(); })
      .def("__repr__", [](const Lease& l) {
        return "<pyloader Lease of buffer " + std::to_string(l.buffer.id()) + ", " +
               std::to_string(l.buffer.capacity()) + " bytes>";
      });

  py::class_<PyArraySource>(m, "ArraySource")
      .def(py::init<py::list, py::object, std::int64_t, int>(), py::arg("arrays"), py::arg("keys"),
           py::arg("batch_size"), py::arg("split_threads"))
      .def("set_order", &PyArraySource::set_order, py::arg("epoch"), py::arg("order"));

  py::class_<Stack>(m, "Stack")
      .def(py::init([](py::iterable samples) { return Stack{py::list(samples)}; }), py::arg("samples"))
      .def_property_readonly("samples", [](const Stack& s) { return s.samples; })
      .def("__len__", [](const Stack& s) { return s.samples.size(); })
      .def("__repr__", [](const Stack& s) {
        return "pyloader.stack(<" + std::to_string(s.samples.size()) + " samples>)";
      });

  py::class_<Packed>(m, "Packed")
      .def(py::init<py::object, std::int64_t>(), py::arg("value"), py::arg("index"))
      .def_property_readonly("nbytes", &Packed::nbytes)
      .def("meta", &Packed::meta)
      .def("write", &Packed::write, py::arg("address"), py::arg("capacity"))
      .def("tobytes", &Packed::tobytes);

  py::class_<PyProcLoader>(m, "ProcLoader")
      .def(py::init<std::vector<int>, std::vector<int>, const PyPool&, py::object, py::object, py::object, int,
                    std::int64_t>(),
           py::arg("fds"), py::arg("pids"), py::arg("pool"), py::arg("replace"), py::arg("hook"),
           py::arg("errors"), py::arg("max_retries"), py::arg("hooks_before"))
      .def("workers", &PyProcLoader::workers)
      .def("dirty", [](const PyProcLoader& l) { return l.loader()->dirty(); })
      .def_property_readonly("hooks", [](const PyProcLoader& l) { return l.loader()->hooks(); })
      .def_property_readonly("deaths", [](const PyProcLoader& l) { return l.loader()->deaths(); });

  m.attr("WIRE_HEADER") = py::make_tuple("=IIqqqqQ", sizeof(WireHeader));
  m.attr("WIRE_KINDS") = py::dict(py::arg("load") = static_cast<int>(kLoad), py::arg("size") = static_cast<int>(kSize),
                                  py::arg("error") = static_cast<int>(kError), py::arg("write") = static_cast<int>(kWrite),
                                  py::arg("done") = static_cast<int>(kDone), py::arg("update") = static_cast<int>(kUpdate),
                                  py::arg("inline") = static_cast<int>(kInline));

  py::class_<PyEngine>(m, "Engine")
      .def(py::init<py::object, py::object, const PyPool&, int, std::size_t, double, py::object, py::object>(),
           py::arg("sequence"), py::arg("epoch_end"), py::arg("pool"), py::arg("workers"),
           py::arg("depth"), py::arg("run_budget_us"), py::arg("error_factory"),
           py::arg("warning_category"))
      .def("start", &PyEngine::start)
      .def("append", &PyEngine::append, py::arg("epoch"), py::arg("indices"), py::arg("gated"))
      .def_property_readonly("next_position", &PyEngine::next_position)
      .def("next_batch", &PyEngine::next_batch, py::arg("timeout") = py::none())
      .def("drain_to", &PyEngine::drain_to, py::arg("position"))
      .def("epoch_error", &PyEngine::epoch_error, py::arg("epoch"))
      .def("stats", &PyEngine::stats)
      .def("close", &PyEngine::close);
}
