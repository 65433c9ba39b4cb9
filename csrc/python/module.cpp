// module.cpp: pyloader._C, the pybind11 face of the core. The bindings convert between Python
// objects and core types and decide where the GIL is released; the policy (waiting, timeouts,
// scheduling) lives in the core. One file per bound concept registers it (bindings.h).
#include "bindings.h"

PYBIND11_MODULE(_C, m) {
  using namespace pyloader::python;
  m.doc() = "pyloader's native core (private: use the pyloader package).";
  register_errors(m);
  register_pool(m);
  register_stack(m);
  register_engine(m);
  register_array_source(m);
  register_process(m);
}
