// pool.h: the buffer pool and its leases as Python sees them (bound by register_pool).
//
//   BufferPool  the core pool (pyloader._C.BufferPool), shared by every engine a Prefetcher starts.
//   Lease       the base object of every array of one delivered batch: the buffer returns to the
//               pool when the last array (and so the lease) dies.
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <memory>

#include "../core/buffer_pool.h"

namespace pyloader::python {

namespace py = pybind11;

struct PyPool {
  std::shared_ptr<BufferPool> pool;
};

struct Lease {
  BufferLease buffer;
};

// A delivered batch's memory as the arrays built over it need it: its start, its size and the
// Lease object to be their base. No buffer (a batch of no bytes): null, 0 and None.
struct BatchMemory {
  std::byte* base = nullptr;
  std::size_t capacity = 0;
  py::object lease = py::none();
};
// Moves `buffer` into a new Lease (GIL required).
BatchMemory hand_over(BufferLease buffer);

}  // namespace pyloader::python
