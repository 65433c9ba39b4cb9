// layout.h: conversion between a batch as __getitem__ returned it and flat leaves in slot memory.
//
// flatten() walks the returned structure once (GIL held) and records it in preorder as Nodes:
// containers (tuple, list, dict, namedtuple) with their child count, numpy arrays as Leaves (where
// the array will live in the buffer: 64-byte aligned offsets, C order), everything else
// (scalars, strings, None, objects, object-dtype arrays, ndarray subclasses other than np.memmap,
// other mappings) as a passthrough object.
// copy_leaves() copies the arrays into the buffer with the GIL released. build() makes the batch
// the consumer sees (GIL held): the same structure, each array a view into the buffer whose base
// is the lease.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../core/loader.h"

namespace pyloader::python {

namespace py = pybind11;

// Where a leaf's bytes come from: one array (or, for a stacked batch, one per sample), kept
// alive from flatten() to copy_leaves().
struct Source {
  py::object array;
  const std::byte* data = nullptr;
  std::vector<std::int64_t> strides;
};

struct Leaf {
  py::object dtype;
  std::vector<std::int64_t> shape;         // of the delivered array
  std::vector<std::int64_t> source_shape;  // of each source (shape, or shape[1:] when stacked)
  std::size_t itemsize = 0;
  std::size_t offset = 0;  // in the buffer
  std::size_t nbytes = 0;
  std::vector<Source> sources;  // stacked one after the other, C order
};

struct Node {
  enum Kind : std::uint8_t { kArray, kTuple, kNamedTuple, kList, kDict, kObject };
  Kind kind = kObject;
  std::uint32_t count = 0;  // children (containers) or leaf number (kArray)
  py::object obj;           // kObject: the object; kDict: tuple of keys; kNamedTuple: its type
  bool container() const noexcept { return kind != kArray && kind != kObject; }
  bool carries_object() const noexcept {
    return kind == kObject || kind == kDict || kind == kNamedTuple;
  }
};

struct Layout {
  std::vector<Node> nodes;
  std::vector<Leaf> leaves;
  std::size_t bytes = 0;
};

// The payload a Python loader hands through the ring. Takes the GIL to die if it must.
class PyBatch final : public Payload {
 public:
  ~PyBatch() override;
  Layout layout;
  py::object error;  // the exception raised while loading (failed deliveries)
};

// Raises BatchLayoutError (a TypeError, errors.h; naming `index`) for structures too deep to be
// data (e.g. a list containing itself).
void flatten(py::handle value, Layout& out, std::int64_t index);
// Collates a list of samples of one structure into one batch, like torch's default_collate but in
// numpy: arrays of equal shape and dtype stack along a new first axis; Python bools, ints and
// floats become bool, int64 and float64 arrays, numpy scalars arrays of their dtype; containers
// recurse; any other leaf becomes the list of the samples' values. Raises StackError (a
// ValueError, errors.h) naming `index` and the sample when structures, shapes or dtypes differ.
void flatten_stacked(py::handle samples, Layout& out, std::int64_t index);

// A batch's samples, to be collated by the worker (pyloader.stack).
struct Stack {
  py::list samples;
};
// What __getitem__(index) returned, flattened: a Stack is collated (flatten_stacked), anything
// else flattened. Raises BatchLayoutError naming `index` for None, a generator or a coroutine
// (not a batch). Both loaders (threads, worker processes) go through here.
void flatten_returned(py::handle value, Layout& out, std::int64_t index);
// Copies every leaf into dst and moves the sources' references into `trash` (to be dropped later
// with the GIL held). GIL not required.
void copy_leaves(Layout& layout, std::byte* dst, std::vector<py::object>& trash) noexcept;
// GIL required.
py::object build(const Layout& layout, std::byte* base, py::handle lease);
// Process mode: the layout as plain picklable values, for a worker process to send (the sources
// stay behind), and the batch rebuilt from them on the consumer's side. The meta is
// (kinds: bytes, counts: tuple, objects: list, leaves: list of (dtype, shape, offset), bytes).
// GIL required.
py::tuple layout_meta(const Layout& layout);
// Raises ValueError when the meta is malformed or its arrays do not fit in `capacity` bytes.
py::object build_meta(py::handle meta, std::byte* base, std::size_t capacity, py::handle lease);
// A C-contiguous array of `shape` viewing `data`, whose base is `lease` (a new empty array when
// there is no data). GIL required.
py::object view_array(const py::dtype& dtype, std::vector<py::ssize_t> shape, std::byte* data,
                      py::handle lease);

}  // namespace pyloader::python
