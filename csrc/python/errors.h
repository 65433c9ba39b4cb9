// errors.h: the exception types pyloader._C raises, registered on the module (register_errors),
// so that Python tells them apart by type, never by their message text.
//
//   BatchLayoutError(TypeError)             __getitem__(i) returned something that is no batch
//                                           (None, a generator, a structure nested too deep)
//   StackError(ValueError)                  pyloader.stack cannot collate a batch's samples
//   ConcurrentConsumerError(RuntimeError)   two threads iterate one loader at once (consumer.h's
//                                           C++ exception of that name, translated)
//   PoolExhaustedError(MemoryError)         the batch the consumer needs has waited too long for a
//                                           buffer: every buffer holds a batch the user still
//                                           references (re-exported as pyloader.PoolExhaustedError)
// Each keeps the base type pyloader raised before it had a type of its own, so `except TypeError`
// and the like still catch it. They pickle by reference (pyloader._C.<name>): process mode's
// workers send them to the consumer as they are.
#pragma once

#include <pybind11/pybind11.h>

#include <string>

namespace pyloader::python {

namespace py = pybind11;

// The registered types (valid after register_errors()).
PyObject* batch_layout_error() noexcept;
PyObject* stack_error() noexcept;
PyObject* pool_exhausted_error() noexcept;

// Sets a Python exception of `type` and throws it into pybind11 (the GIL is held).
[[noreturn]] void raise(PyObject* type, const std::string& message);
// Raises the exception object `exc` as it is.
[[noreturn]] void raise_object(const py::object& exc);

}  // namespace pyloader::python
