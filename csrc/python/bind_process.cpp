// bind_process.cpp: process mode's bindings.
//
//   ProcLoader   process mode's source: the core ProcLoader (proc_loader.h) with its Python
//                callbacks; an Engine made over one decodes each batch's layout (meta) into
//                views of the shared buffer.
//   Packed       the worker process's side: one batch flattened, to be written into a buffer.
//   WIRE_HEADER, WIRE_KINDS   the wire format's constants, read by process/_wire.py.
#include <pybind11/stl.h>

#include <memory>
#include <string>
#include <vector>

#include "../core/proc_loader.h"
#include "bindings.h"
#include "errors.h"
#include "gil.h"
#include "layout.h"
#include "pool.h"
#include "py_loader.h"
#include "source.h"

namespace pyloader::python {

namespace {

// A batch as the worker process sees it: flattened once (GIL held), written into a buffer (GIL
// released), its layout sent as meta. The checks and messages are thread mode's (PyLoader).
class Packed {
 public:
  Packed(py::object value, std::int64_t index) : index_(index) {
    flatten_returned(value, layout_, index);
  }
  std::size_t nbytes() const { return layout_.bytes; }
  py::tuple meta() const { return layout_meta(layout_); }
  // Copies the arrays to address..address+capacity (the worker's mapping of a shared buffer).
  void write(std::uintptr_t address, std::size_t capacity) {
    if (written_) raise(PyExc_RuntimeError, "this batch was written already");
    if (capacity < layout_.bytes) {
      raise(PyExc_ValueError, "batch " + std::to_string(index_) + " needs " +
                                  std::to_string(layout_.bytes) + " bytes, the buffer holds " +
                                  std::to_string(capacity));
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

// Python objects the native callbacks hold: the last copy may die on an engine thread.
struct PyRefs {
  py::object replace, hook, errors;
  ~PyRefs() { drop_with_gil(replace, hook, errors); }
};

// Process mode's source, with the Python side's callbacks:
//   replace(slot) -> (fd, pid, death)   starts a new worker for a slot whose worker died
//   hook(epoch)                         the Sequence's on_epoch_end (None: no hook)
//   errors(kind, blob, index, epoch, position, worker, pid) -> exception   for failed batches
class PyProcLoader final : public PySource {
 public:
  PyProcLoader(std::vector<int> fds, std::vector<int> pids, const PyPool& pool, py::object replace,
               py::object hook, py::object errors, int max_retries, std::int64_t hooks_before) {
    Arena* arena = pool.pool->arena();
    if (!arena) throw py::value_error("process mode needs a BufferPool made with arena_bytes");
    if (fds.size() != pids.size() || fds.empty()) {
      throw py::value_error("one fd and one pid per worker");
    }
    static py::handle loads = py::object(py::module_::import("pickle").attr("loads")).release();
    loads_ = py::reinterpret_borrow<py::object>(loads);
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
    loader_ = std::make_shared<ProcLoader>(std::move(workers), arena->base(), arena->size(),
                                           std::move(on_death), std::move(on_epoch), max_retries,
                                           hooks_before);
  }

  std::shared_ptr<Loader> loader() const override { return loader_; }
  const ProcLoader& core() const { return *loader_; }

  py::object deliver(Delivery d) override {
    auto* batch = static_cast<ProcBatch*>(d.payload.get());
    if (d.failed) {
      const char* kind = batch->kind == ProcBatch::kRaised ? "raised" : "died";
      raise_object(refs_->errors(kind, py::bytes(batch->message), d.task.index, d.task.epoch,
                                 d.task.position, d.worker, batch->pid));
    }
    py::object meta = loads_(py::memoryview::from_memory(
        batch->meta.data(), static_cast<py::ssize_t>(batch->meta.size())));
    const BatchMemory memory = hand_over(std::move(d.buffer));
    return build_meta(meta, memory.base, memory.capacity, memory.lease);
  }

  py::list workers() const {
    py::list out;
    for (const ProcWorker& w : loader_->workers()) out.append(py::make_tuple(w.fd, w.pid));
    return out;
  }

 private:
  py::object loads_;  // pickle.loads
  std::shared_ptr<PyRefs> refs_;
  std::shared_ptr<ProcLoader> loader_;
};

}  // namespace

void register_process(py::module_& m) {
  py::class_<Packed>(m, "Packed")
      .def(py::init<py::object, std::int64_t>(), py::arg("value"), py::arg("index"))
      .def_property_readonly("nbytes", &Packed::nbytes)
      .def("meta", &Packed::meta)
      .def("write", &Packed::write, py::arg("address"), py::arg("capacity"))
      .def("tobytes", &Packed::tobytes);

  py::class_<PyProcLoader, PySource, std::shared_ptr<PyProcLoader>>(m, "ProcLoader")
      .def(py::init<std::vector<int>, std::vector<int>, const PyPool&, py::object, py::object,
                    py::object, int, std::int64_t>(),
           py::arg("fds"), py::arg("pids"), py::arg("pool"), py::arg("replace"), py::arg("hook"),
           py::arg("errors"), py::arg("max_retries"), py::arg("hooks_before"))
      .def("workers", &PyProcLoader::workers)
      .def("dirty", [](const PyProcLoader& l) { return l.core().dirty(); })
      .def_property_readonly("hooks", [](const PyProcLoader& l) { return l.core().hooks(); })
      .def_property_readonly("deaths", [](const PyProcLoader& l) { return l.core().deaths(); });

  m.attr("WIRE_HEADER") = py::make_tuple("=IIqqqqQ", sizeof(WireHeader));
  m.attr("WIRE_KINDS") = py::dict(
      py::arg("load") = static_cast<int>(kLoad), py::arg("size") = static_cast<int>(kSize),
      py::arg("error") = static_cast<int>(kError), py::arg("write") = static_cast<int>(kWrite),
      py::arg("done") = static_cast<int>(kDone), py::arg("update") = static_cast<int>(kUpdate),
      py::arg("inline") = static_cast<int>(kInline));
}

}  // namespace pyloader::python
