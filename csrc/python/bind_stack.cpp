// bind_stack.cpp: pyloader._C.Stack, the marker pyloader.stack returns: a batch's samples, which
// the worker that loaded them collates (layout.h: flatten_stacked).
#include <string>

#include "bindings.h"
#include "layout.h"

namespace pyloader::python {

void register_stack(py::module_& m) {
  py::class_<Stack>(m, "Stack")
      .def(py::init([](py::iterable samples) { return Stack{py::list(samples)}; }),
           py::arg("samples"))
      .def_property_readonly("samples", [](const Stack& s) { return s.samples; })
      .def("__len__", [](const Stack& s) { return s.samples.size(); })
      .def("__repr__", [](const Stack& s) {
        return "pyloader.stack(<" + std::to_string(s.samples.size()) + " samples>)";
      });
}

}  // namespace pyloader::python
