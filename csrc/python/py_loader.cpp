#include "py_loader.h"

#include <string>

namespace pyloader::python {

std::unique_ptr<PyBatch> error_batch(py::error_already_set& e) {
  auto batch = std::make_unique<PyBatch>();
  batch->error = e.value();
  // Before 3.12 the traceback travels beside the exception: attach it, so the consumer sees the
  // worker's frames.
  if (e.trace() && !e.trace().is_none())
    PyException_SetTraceback(batch->error.ptr(), e.trace().ptr());
  return batch;
}

namespace {
std::unique_ptr<PyBatch> type_error_batch(const std::string& message) {
  auto batch = std::make_unique<PyBatch>();
  batch->error = py::reinterpret_borrow<py::object>(PyExc_TypeError)(message);
  return batch;
}
}  // namespace

PyLoader::PyLoader(py::object sequence, py::object epoch_end, int workers)
    : getitem_(sequence.attr("__getitem__")),
      epoch_end_(std::move(epoch_end)),
      has_epoch_end_(!epoch_end_.is_none()),
      stream_(py::bool_(py::getattr(sequence, "_pyloader_stream_source", py::bool_(false)))),
      states_(static_cast<std::size_t>(workers)) {}

PyLoader::~PyLoader() {
  // Destroyed by the owner (GIL held), or by the last worker of a detached engine (after its
  // thread_exit), possibly while the interpreter exits.
  drop_with_gil(states_, getitem_, epoch_end_);
}

void PyLoader::thread_start(int worker) {
  WorkerState& s = states_[static_cast<std::size_t>(worker)];
  s.gil_state = PyGILState_Ensure();  // creates this thread's Python thread state
  s.tstate = PyEval_SaveThread();     // and releases the GIL at once
}

void PyLoader::thread_exit(int worker) {
  WorkerState& s = states_[static_cast<std::size_t>(worker)];
  if (!s.tstate) return;
  // The interpreter is going away: taking the GIL would never return. drop_with_gil leaks the
  // references instead (gil.h).
  if (interpreter_finalizing()) {
    drop_with_gil(s.trash);
    return;
  }
  PyEval_RestoreThread(s.tstate);
  s.trash.clear();
  s.tstate = nullptr;
  PyGILState_Release(s.gil_state);
}

bool PyLoader::enter(int worker) {
  if (interpreter_finalizing()) return false;
  WorkerState& s = states_[static_cast<std::size_t>(worker)];
  PyEval_RestoreThread(s.tstate);
  s.trash.clear();
  return true;
}

void PyLoader::leave(int worker) {
  states_[static_cast<std::size_t>(worker)].tstate = PyEval_SaveThread();
}

void PyLoader::prepare(int /*worker*/, Prepared& item) {
  const std::int64_t index = item.task.index;
  try {
    py::object value = stream_ ? getitem_(py::make_tuple(item.task.epoch, index)) : getitem_(index);
    auto batch = std::make_unique<PyBatch>();
    flatten_returned(value, batch->layout, index);  // BatchLayoutError for a value that is no batch
    item.bytes = batch->layout.bytes;
    item.payload = std::move(batch);
  } catch (py::error_already_set& e) {  // raised by __getitem__, or by the checks of layout.h
    item.failed = true;
    item.payload = error_batch(e);
  } catch (const std::exception& e) {
    item.failed = true;
    item.payload =
        type_error_batch("__getitem__(" + std::to_string(index) + ") failed: " + e.what());
  }
}

void PyLoader::fill(int worker, Prepared& item, std::byte* dst, std::size_t /*capacity*/) noexcept {
  if (item.failed || !item.payload) return;
  auto* batch = static_cast<PyBatch*>(item.payload.get());
  copy_leaves(batch->layout, dst, states_[static_cast<std::size_t>(worker)].trash);
}

std::unique_ptr<Payload> PyLoader::epoch_end(int worker, std::int64_t epoch) {
  if (!enter(worker)) return nullptr;
  std::unique_ptr<Payload> error;
  try {
    epoch_end_(epoch);
  } catch (py::error_already_set& e) {
    error = error_batch(e);
  }
  leave(worker);
  return error;
}

}  // namespace pyloader::python
