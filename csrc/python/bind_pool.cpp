// bind_pool.cpp: pyloader._C.BufferPool and pyloader._C.Lease (pool.h).
#include <pybind11/stl.h>

#include <string>
#include <system_error>

#include "bindings.h"
#include "errors.h"
#include "pool.h"

namespace pyloader::python {

namespace {

PinRequest parse_pin(const std::string& pin) {
  if (pin == "auto") return PinRequest::kAuto;
  if (pin == "cuda") return PinRequest::kCuda;
  if (pin == "mlock") return PinRequest::kMlock;
  if (pin == "off") return PinRequest::kOff;
  throw py::value_error("pin must be 'auto', 'cuda', 'mlock' or 'off', got '" + pin + "'");
}

py::dict pool_info(const BufferPool& pool) {
  const PoolInfo i = pool.info();
  py::dict d;
  d["buffers"] = i.buffers;
  d["leased"] = i.leased;
  d["bytes"] = i.bytes;
  d["peak_bytes"] = i.peak_bytes;
  d["max_bytes"] = i.max_bytes;
  d["pinned_bytes"] = i.pinned_bytes;
  d["pin_failures"] = i.pin_failures;
  d["allocations"] = i.allocations;
  d["pin_method"] = i.pin_method;
  d["pin_reason"] = i.pin_reason;
  d["pin_error"] = i.pin_error;
  return d;
}

}  // namespace

BatchMemory hand_over(BufferLease buffer) {
  BatchMemory m;
  if (!buffer) return m;
  m.base = buffer.data();
  m.capacity = buffer.capacity();
  m.lease = py::cast(Lease{std::move(buffer)});
  return m;
}

void register_pool(py::module_& m) {
  py::class_<PyPool>(m, "BufferPool")
      .def(py::init([](std::size_t max_bytes, const std::string& pin, std::size_t arena_bytes) {
             try {
               return PyPool{BufferPool::create(max_bytes, parse_pin(pin), arena_bytes)};
             } catch (const std::system_error& e) {
               raise(PyExc_OSError,
                     std::string("pyloader: cannot make the shared-memory arena: ") + e.what());
             }
           }),
           py::arg("max_bytes"), py::arg("pin"), py::arg("arena_bytes") = 0)
      .def("info", [](const PyPool& p) { return pool_info(*p.pool); })
      .def(
          "reserve",
          [](const PyPool& p, std::size_t count, std::size_t bytes) {
            std::shared_ptr<BufferPool> pool = p.pool;
            py::gil_scoped_release release;
            // no Python below
            return pool->reserve(count, bytes);
          },
          py::arg("count"), py::arg("bytes"))
      .def("stop_reserving", [](const PyPool& p) { p.pool->stop_reserving(); })
      .def_property_readonly(
          "arena_fd", [](const PyPool& p) { return p.pool->arena() ? p.pool->arena()->fd() : -1; })
      .def_property_readonly(
          "arena_size",
          [](const PyPool& p) { return p.pool->arena() ? p.pool->arena()->size() : 0; })
      .def("close_arena_fd",
           [](const PyPool& p) {
             if (p.pool->arena()) p.pool->arena()->close_fd();
           })
      // With the GIL held: close() may run on an engine worker thread (a loader closed from its
      // own __getitem__), where taking the GIL back during interpreter exit would end the thread
      // inside a destructor (gil.h). Unmapping free buffers is quick.
      .def("close", [](const PyPool& p) { p.pool->close(); });

  py::class_<Lease>(m, "Lease")
      .def_property_readonly("nbytes", [](const Lease& l) { return l.buffer.capacity(); })
      .def_property_readonly("buffer_id", [](const Lease& l) { return l.buffer.id(); })
      .def("__repr__", [](const Lease& l) {
        return "<pyloader Lease of buffer " + std::to_string(l.buffer.id()) + ", " +
               std::to_string(l.buffer.capacity()) + " bytes>";
      });
}

}  // namespace pyloader::python
