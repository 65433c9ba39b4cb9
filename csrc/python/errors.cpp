#include "errors.h"

#include "../core/consumer.h"
#include "bindings.h"

namespace pyloader::python {

namespace {

PyObject* g_batch_layout_error = nullptr;
PyObject* g_stack_error = nullptr;
PyObject* g_concurrent_consumer_error = nullptr;
PyObject* g_pool_exhausted_error = nullptr;

// A new exception type pyloader._C.<name> deriving from `base`, added to the module. The module
// keeps it alive for the life of the process (the pointer above borrows that reference).
PyObject* add_type(py::module_& m, const char* name, PyObject* base, const char* doc) {
  const std::string qualified = "pyloader._C." + std::string(name);
  PyObject* type = PyErr_NewExceptionWithDoc(qualified.c_str(), doc, base, nullptr);
  if (!type) throw py::error_already_set();
  m.add_object(name, py::reinterpret_steal<py::object>(type));
  return type;
}

}  // namespace

void register_errors(py::module_& m) {
  g_batch_layout_error = add_type(
      m, "BatchLayoutError", PyExc_TypeError,
      "__getitem__(i) returned a value that is not a batch (None, a generator, a structure nested "
      "too deep). The message names the index.");
  g_stack_error =
      add_type(m, "StackError", PyExc_ValueError,
               "pyloader.stack cannot collate a batch's samples (structures, shapes or "
               "dtypes differ, or there are none). The message names the batch and sample.");
  g_concurrent_consumer_error =
      add_type(m, "ConcurrentConsumerError", PyExc_RuntimeError,
               "Two threads iterate one pyloader loader at once: iterate it from one thread.");
  // A MemoryError: Python's word for "out of memory, but deleting some objects may rescue it",
  // which is exactly the remedy (drop references to old batches), and what `except MemoryError`
  // already expects from a data pipeline. Not an allocation failure of the OS (that one is a
  // plain MemoryError naming the bytes it could not get).
  g_pool_exhausted_error = add_type(
      m, "PoolExhaustedError", PyExc_MemoryError,
      "The batch the consumer needs next waited too long for a buffer: every buffer of the pool "
      "holds a batch you still reference, and the pool is at max_pool_bytes. The message says "
      "how many, the bound, and how to raise it. Drop references to old batches and call next() "
      "again (the loader goes on with the same batch), or raise max_pool_bytes.");
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const ConcurrentConsumerError& e) {
      PyErr_SetString(g_concurrent_consumer_error, e.what());
    }
  });
}

PyObject* batch_layout_error() noexcept { return g_batch_layout_error; }
PyObject* stack_error() noexcept { return g_stack_error; }
PyObject* pool_exhausted_error() noexcept { return g_pool_exhausted_error; }

void raise(PyObject* type, const std::string& message) {
  PyErr_SetString(type, message.c_str());
  throw py::error_already_set();
}

void raise_object(const py::object& exc) {
  PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc.ptr())), exc.ptr());
  throw py::error_already_set();
}

}  // namespace pyloader::python
