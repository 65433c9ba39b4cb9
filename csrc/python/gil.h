// gil.h: dropping Python references from threads that may not hold the GIL.
//
// A holder of Python objects whose destructor can run on a native thread (a payload dropped by an
// engine worker after a stop, a loader destroyed by the last worker of a detached engine, a
// callback's captures) releases them through drop_with_gil(), which decides once for all of them:
//   1. this thread holds the GIL: they are released here and now.
//   2. the interpreter is finalizing: they are leaked (the process is exiting anyway, and the
//      objects may already be gone).
//   3. otherwise they are handed to the graveyard: a list that the main thread empties, with the
//      GIL, at its next chance to run Python (Py_AddPendingCall).
// Rule 2 is checked first: once finalization has deleted the GIL state's thread-local key,
// PyGILState_Check() answers "yes" on every thread, so a native thread that ends late (the last
// worker of a detached or abandoned engine) would free objects without the GIL, after the
// interpreter is gone: a crash at exit. (So objects that the finalizing thread itself drops are
// leaked too; the process is exiting.)
// Rule 3 never waits for the GIL, on purpose: a thread that waits for it when finalization begins
// is ended by CPython (pthread_exit, a forced unwind), and in a destructor (noexcept) that unwind
// ends the process with std::terminate. Functions that do wait for the GIL on engine threads
// (PyLoader's enter, prepare, epoch_end, thread_exit; ProcLoader's prepare, fill, epoch_end,
// whose callbacks take it) are kept out of noexcept for the same reason: see loader.h, "Thread
// exit".
#pragma once

#include <pybind11/pybind11.h>

#include <memory>
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

// Python references waiting in the graveyard (rule 3).
class Grave {
 public:
  virtual ~Grave() = default;
};
// Hands `grave` to the main thread, which destroys it with the GIL. Never waits for the GIL.
void bury(std::unique_ptr<Grave> grave) noexcept;

// Moves `values` out (leaving them empty) and destroys them as the rules above say.
template <class... T>
void drop_with_gil(T&... values) noexcept {
  struct Held final : Grave {
    explicit Held(T&... v) : values(std::move(v)...) {}
    std::tuple<T...> values;
  };
  if (interpreter_finalizing() || !Py_IsInitialized()) {
    new Held(values...);  // leaked on purpose (rule 2)
    return;
  }
  if (PyGILState_Check()) {
    Held dropped(values...);
    return;
  }
  bury(std::make_unique<Held>(values...));
}

}  // namespace pyloader::python
