// source.h: PySource, what an Engine (bind_engine.cpp) loads from, one implementation per kind:
//
//   SequenceSource  a Python Sequence: PyLoader calls __getitem__ on the engine's threads
//                   (bind_engine.cpp; made by the Engine itself for any object that is no Source)
//   PyArraySource   a pyloader.ArraySequence: GatherLoader copies rows natively, no Python per
//                   batch (bind_array_source.cpp; pyloader._C.ArraySource)
//   PyProcLoader    process mode: ProcLoader drives worker processes that write into shared
//                   memory (bind_process.cpp; pyloader._C.ProcLoader)
//
// Each gives the core Loader the engine runs and turns a Delivery of its loader back into the
// Python batch the consumer sees, or raises the batch's error. The Engine holds one and never
// asks which kind it is. Python sees the native kinds as subclasses of pyloader._C.Source, which
// it cannot make itself.
#pragma once

#include <pybind11/pybind11.h>

#include <memory>

#include "../core/loader.h"

namespace pyloader::python {

namespace py = pybind11;

class PySource {
 public:
  virtual ~PySource() = default;
  // The loader an Engine over this source runs.
  virtual std::shared_ptr<Loader> loader() const = 0;
  // The batch a delivery carries, as the consumer sees it; raises the error of a failed one
  // (a payload-less error in plain words is the Engine's to raise). GIL held.
  virtual py::object deliver(Delivery d) = 0;
};

}  // namespace pyloader::python
