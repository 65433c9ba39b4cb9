// bindings.h: the register_* functions of pyloader._C, one per bound concept (module.cpp calls
// them in this order: a base class before the classes that derive from it).
#pragma once

#include <pybind11/pybind11.h>

namespace pyloader::python {

namespace py = pybind11;

void register_errors(py::module_& m);        // errors.cpp: BatchLayoutError, StackError, ...
void register_pool(py::module_& m);          // bind_pool.cpp: BufferPool, Lease
void register_stack(py::module_& m);         // bind_stack.cpp: Stack (pyloader.stack's marker)
void register_engine(py::module_& m);        // bind_engine.cpp: Source, Engine
void register_array_source(py::module_& m);  // bind_array_source.cpp: ArraySource
void register_process(py::module_& m);       // bind_process.cpp: ProcLoader, Packed, WIRE_*

}  // namespace pyloader::python
