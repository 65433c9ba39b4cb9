#include "layout.h"

#include <string>

#include "../core/copy.h"

namespace pyloader::python {

namespace {

constexpr int kMaxNesting = 64;
constexpr std::size_t kAlign = 64;

bool is_copyable_array(py::handle h) {
  if (!py::isinstance<py::array>(h)) return false;
  auto arr = py::reinterpret_borrow<py::array>(h);
  const char kind = arr.dtype().kind();
  if (kind == 'O') return false;
  if (kind == 'V') return !arr.dtype().attr("hasobject").cast<bool>();
  return true;
}

void flatten_into(py::handle value, Layout& out, std::int64_t index, int depth) {
  if (depth > kMaxNesting) {
    throw py::type_error("__getitem__(" + std::to_string(index) + ") returned a structure nested more than " +
                         std::to_string(kMaxNesting) +
                         " levels deep (does a list or dict contain itself?)");
  }
  PyObject* p = value.ptr();
  Node node;
  if (PyTuple_CheckExact(p) || PyList_CheckExact(p)) {
    const bool is_tuple = PyTuple_CheckExact(p);
    const Py_ssize_t n = is_tuple ? PyTuple_GET_SIZE(p) : PyList_GET_SIZE(p);
    node.kind = is_tuple ? Node::kTuple : Node::kList;
    node.count = static_cast<std::uint32_t>(n);
    out.nodes.push_back(std::move(node));
    for (Py_ssize_t i = 0; i < n; ++i) {
      // A list's items are borrowed: keep this one alive while we look at it.
      py::object item = py::reinterpret_borrow<py::object>(is_tuple ? PyTuple_GET_ITEM(p, i)
                                                                     : PyList_GET_ITEM(p, i));
      flatten_into(item, out, index, depth + 1);
    }
    return;
  }
  if (PyDict_CheckExact(p)) {
    py::dict d = py::reinterpret_borrow<py::dict>(value);
    py::tuple keys(static_cast<Py_ssize_t>(d.size()));
    std::vector<py::object> values;
    values.reserve(d.size());
    Py_ssize_t i = 0;
    for (auto kv : d) {
      keys[static_cast<std::size_t>(i++)] = kv.first;
      values.push_back(py::reinterpret_borrow<py::object>(kv.second));
    }
    node.kind = Node::kDict;
    node.count = static_cast<std::uint32_t>(values.size());
    node.obj = std::move(keys);
    out.nodes.push_back(std::move(node));
    for (auto& v : values) flatten_into(v, out, index, depth + 1);
    return;
  }
  if (PyTuple_Check(p) && py::hasattr(value, "_fields")) {  // a namedtuple
    const Py_ssize_t n = PyTuple_GET_SIZE(p);
    node.kind = Node::kNamedTuple;
    node.count = static_cast<std::uint32_t>(n);
    node.obj = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(Py_TYPE(p)));
    out.nodes.push_back(std::move(node));
    for (Py_ssize_t i = 0; i < n; ++i) {
      flatten_into(py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(p, i)), out, index, depth + 1);
    }
    return;
  }
  if (is_copyable_array(value)) {
    auto arr = py::reinterpret_borrow<py::array>(value);
    Leaf leaf;
    leaf.dtype = arr.dtype();
    leaf.itemsize = static_cast<std::size_t>(arr.itemsize());
    const auto ndim = static_cast<std::size_t>(arr.ndim());
    leaf.shape.resize(ndim);
    leaf.strides.resize(ndim);
    std::size_t nbytes = leaf.itemsize;
    for (std::size_t d = 0; d < ndim; ++d) {
      leaf.shape[d] = static_cast<std::int64_t>(arr.shape(static_cast<py::ssize_t>(d)));
      leaf.strides[d] = static_cast<std::int64_t>(arr.strides(static_cast<py::ssize_t>(d)));
      nbytes *= static_cast<std::size_t>(leaf.shape[d]);
    }
    leaf.nbytes = nbytes;
    leaf.data = static_cast<const std::byte*>(arr.data());
    leaf.offset = (out.bytes + kAlign - 1) / kAlign * kAlign;
    out.bytes = leaf.offset + nbytes;
    leaf.source = std::move(arr);
    node.kind = Node::kArray;
    node.count = static_cast<std::uint32_t>(out.leaves.size());
    out.leaves.push_back(std::move(leaf));
    out.nodes.push_back(std::move(node));
    return;
  }
  node.kind = Node::kObject;
  node.obj = py::reinterpret_borrow<py::object>(value);
  out.nodes.push_back(std::move(node));
}

py::object build_from(const Layout& layout, std::size_t& i, std::byte* base, py::handle lease) {
  const Node& node = layout.nodes[i++];
  switch (node.kind) {
    case Node::kArray: {
      const Leaf& leaf = layout.leaves[node.count];
      std::vector<py::ssize_t> shape(leaf.shape.begin(), leaf.shape.end());
      std::vector<py::ssize_t> strides(shape.size());
      py::ssize_t stride = static_cast<py::ssize_t>(leaf.itemsize);
      for (std::size_t d = shape.size(); d-- > 0;) {
        strides[d] = stride;
        stride *= shape[d];
      }
      if (leaf.nbytes == 0 || base == nullptr) {  // empty: nothing to view
        return py::array(py::reinterpret_borrow<py::dtype>(leaf.dtype), std::move(shape), std::move(strides));
      }
      return py::array(py::reinterpret_borrow<py::dtype>(leaf.dtype), std::move(shape),
                       std::move(strides), base + leaf.offset, lease);
    }
    case Node::kTuple:
    case Node::kNamedTuple: {
      PyObject* t = PyTuple_New(node.count);
      if (!t) throw py::error_already_set();
      py::object tuple = py::reinterpret_steal<py::object>(t);
      for (std::uint32_t k = 0; k < node.count; ++k) {
        PyTuple_SET_ITEM(t, k, build_from(layout, i, base, lease).release().ptr());
      }
      if (node.kind == Node::kNamedTuple) return node.obj(*tuple);
      return tuple;
    }
    case Node::kList: {
      PyObject* l = PyList_New(node.count);
      if (!l) throw py::error_already_set();
      py::object list = py::reinterpret_steal<py::object>(l);
      for (std::uint32_t k = 0; k < node.count; ++k) {
        PyList_SET_ITEM(l, k, build_from(layout, i, base, lease).release().ptr());
      }
      return list;
    }
    case Node::kDict: {
      py::dict d;
      auto keys = py::reinterpret_borrow<py::tuple>(node.obj);
      for (std::uint32_t k = 0; k < node.count; ++k) {
        d[keys[k]] = build_from(layout, i, base, lease);
      }
      return std::move(d);
    }
    case Node::kObject:
    default:
      return node.obj;
  }
}

}  // namespace

PyBatch::~PyBatch() {
  if (PyGILState_Check()) {
    layout = Layout{};
    error = py::object();
    return;
  }
  py::gil_scoped_acquire gil;
  layout = Layout{};
  error = py::object();
}

void flatten(py::handle value, Layout& out, std::int64_t index) { flatten_into(value, out, index, 0); }

void copy_leaves(Layout& layout, std::byte* dst, std::vector<py::object>& trash) noexcept {
  for (Leaf& leaf : layout.leaves) {
    if (leaf.nbytes > 0) {
      copy_strided(dst + leaf.offset, leaf.data, leaf.itemsize, static_cast<int>(leaf.shape.size()),
                   leaf.shape.data(), leaf.strides.data());
    }
    leaf.data = nullptr;
    trash.push_back(std::move(leaf.source));  // a move: no reference count is touched
  }
}

py::object build(const Layout& layout, std::byte* base, py::handle lease) {
  std::size_t i = 0;
  return build_from(layout, i, base, lease);
}

}  // namespace pyloader::python
