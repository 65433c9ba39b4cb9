// gil.h: dropping Python references from threads that may not hold the GIL.
//
// A holder of Python objects whose destructor can run on a native thread (a payload dropped by an
// engine worker after a stop, a loader destroyed by the last worker of a detached engine, a
// callback's captures) releases them through drop_with_gil(), which decides once for all of them:
//   1. the interpreter is finalizing: the references are leaked. Taking the GIL then never
//      returns (CPython ends a thread that asks for it), and the objects may already be gone;
//      the process is exiting anyway.
//   2. this thread holds the GIL: they are released here.
//   3. otherwise the GIL is taken (pybind11 makes a thread state for a native thread) around the
//      release.
// The check in 1 cannot be atomic with 3: finalization that begins between them ends the thread
// inside the acquire. Shutdown therefore closes every live loader in an atexit hook (prefetcher.py),
// before finalization begins, so that no worker is left to get there.
#pragma once

#include <pybind11/pybind11.h>

#include <tuple>
#include <utility>

namespace pyloader::python {

namespace py = pybind11;

// Whether the interpreter is shutting down (then taking the GIL would never return).
inline bool interpreter_finalizing() noexcept {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Moves `values` out (leaving them empty) and destroys them as the rules above say.
template <class... T>
void drop_with_gil(T&... values) noexcept {
  using Dropped = std::tuple<T...>;
  if (interpreter_finalizing()) {
    new Dropped(std::move(values)...);  // leaked on purpose (rule 1)
    return;
  }
  if (PyGILState_Check()) {
    Dropped dropped(std::move(values)...);
    return;
  }
  py::gil_scoped_acquire gil;
  Dropped dropped(std::move(values)...);  // destroyed before the GIL is released
}

}  // namespace pyloader::python
