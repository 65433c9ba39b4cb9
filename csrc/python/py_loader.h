// py_loader.h: PyLoader, the core Loader that runs a Python Sequence's __getitem__.
//
// GIL rules (ARCHITECTURE.md): a worker holds the GIL only between enter() and leave(), to call
// user code and walk its result (prepare). The copy into the buffer (fill) runs with the GIL
// released, except for small batches (kEarlyPublishBytes) that the engine publishes inside a run.
// Each worker thread keeps one Python thread state for its whole life (thread_start/thread_exit),
// so entering is one PyEval_RestoreThread, not a thread-state allocation per batch. References to
// the arrays a worker copied are dropped at its next enter(), when it holds the GIL anyway.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <vector>

#include "../core/loader.h"
#include "gil.h"
#include "layout.h"

namespace pyloader::python {

// A failed batch's payload: the exception being handled, with its traceback attached.
std::unique_ptr<PyBatch> error_batch(py::error_already_set& e);

class PyLoader final : public Loader {
 public:
  // `sequence`: anything with __getitem__(int). `epoch_end`: a callable(epoch) run between epochs,
  // or None. A stream source (a true `_pyloader_stream_source` attribute, see pyloader/_stream.py)
  // is called as __getitem__((epoch, index)) and its positions go to the workers round-robin: a
  // worker reads whole shards, whose iterators it keeps.
  PyLoader(py::object sequence, py::object epoch_end, int workers);
  ~PyLoader() override;

  void thread_start(int worker) override;
  void thread_exit(int worker) override;
  bool enter(int worker) override;
  void leave(int worker) override;
  void prepare(int worker, Prepared& item) override;  // not noexcept: see loader.h, "Thread exit"
  void fill(int worker, Prepared& item, std::byte* dst, std::size_t capacity) noexcept override;
  bool has_epoch_end() const noexcept override { return has_epoch_end_; }
  bool round_robin() const noexcept override { return stream_; }
  std::unique_ptr<Payload> epoch_end(int worker, std::int64_t epoch) override;
  std::string call_name(std::int64_t index) const override {
    return "__getitem__(" + std::to_string(index) + ")";
  }

 private:
  struct WorkerState {
    PyGILState_STATE gil_state{};
    PyThreadState* tstate = nullptr;
    std::vector<py::object> trash;  // copied sources, dropped under the GIL
  };

  py::object getitem_;
  py::object epoch_end_;
  bool has_epoch_end_;
  bool stream_;
  std::vector<WorkerState> states_;
};

}  // namespace pyloader::python
