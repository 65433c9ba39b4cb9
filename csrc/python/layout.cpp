#include "layout.h"

#include <string>

#include "../core/copy.h"
#include "errors.h"
#include "gil.h"

namespace pyloader::python {

namespace {

constexpr int kMaxNesting = 64;
constexpr std::size_t kAlign = 64;

// A numpy array whose data means what its bytes say: an exact ndarray or a np.memmap (a file's
// pages; a copy of them means the same). Other subclasses carry meaning beyond their bytes
// (np.ma.MaskedArray's mask, np.recarray's fields as attributes), which a copy into slot memory
// would drop: they pass through untouched, as objects.
bool is_copyable_array(py::handle h) {
  if (!py::isinstance<py::array>(h)) return false;
  static PyTypeObject* const ndarray = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("numpy").attr("ndarray")).release().ptr());
  static PyObject* const memmap =
      py::object(py::module_::import("numpy").attr("memmap")).release().ptr();
  if (Py_TYPE(h.ptr()) != ndarray && PyObject_IsInstance(h.ptr(), memmap) != 1) return false;
  auto arr = py::reinterpret_borrow<py::array>(h);
  const char kind = arr.dtype().kind();
  if (kind == 'O') return false;
  if (kind == 'V') return !arr.dtype().attr("hasobject").cast<bool>();
  return true;
}

// The one walker over the containers a batch may nest (tuple, list, dict, namedtuple; exact
// types, so that a subclass or another mapping passes through as an object): open_container()
// recognises one and lists its children in order; close_container() makes it again from them.
// flatten_into() walks a returned value with the first, build_from() a layout with the second;
// merge_samples() and build_meta() follow the same preorder through Node::container().
bool open_container(py::handle value, Node& node, std::vector<py::object>& children) {
  PyObject* p = value.ptr();
  if (PyTuple_CheckExact(p) || PyList_CheckExact(p) ||
      (PyTuple_Check(p) && py::hasattr(value, "_fields"))) {
    const bool is_list = PyList_CheckExact(p);
    const Py_ssize_t n = is_list ? PyList_GET_SIZE(p) : PyTuple_GET_SIZE(p);
    node.kind = is_list ? Node::kList : PyTuple_CheckExact(p) ? Node::kTuple : Node::kNamedTuple;
    if (node.kind == Node::kNamedTuple)
      node.obj = py::reinterpret_borrow<py::object>(reinterpret_cast<PyObject*>(Py_TYPE(p)));
    children.reserve(static_cast<std::size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      // A list's items are borrowed: hold each while the walk looks at it.
      children.push_back(py::reinterpret_borrow<py::object>(is_list ? PyList_GET_ITEM(p, i)
                                                                    : PyTuple_GET_ITEM(p, i)));
    }
  } else if (PyDict_CheckExact(p)) {
    auto d = py::reinterpret_borrow<py::dict>(value);
    py::tuple keys(static_cast<Py_ssize_t>(d.size()));
    Py_ssize_t i = 0;
    for (auto kv : d) {
      keys[static_cast<std::size_t>(i++)] = kv.first;
      children.push_back(py::reinterpret_borrow<py::object>(kv.second));
    }
    node.kind = Node::kDict;
    node.obj = std::move(keys);
  } else {
    return false;
  }
  node.count = static_cast<std::uint32_t>(children.size());
  return true;
}

py::object close_container(const Node& node, std::vector<py::object>& children) {
  const auto n = static_cast<Py_ssize_t>(children.size());
  if (node.kind == Node::kList) {
    py::list list(n);
    for (Py_ssize_t k = 0; k < n; ++k)
      PyList_SET_ITEM(list.ptr(), k, children[static_cast<std::size_t>(k)].release().ptr());
    return list;
  }
  if (node.kind == Node::kDict) {
    py::dict d;
    auto keys = py::reinterpret_borrow<py::tuple>(node.obj);
    for (Py_ssize_t k = 0; k < n; ++k)
      d[keys[static_cast<std::size_t>(k)]] = children[static_cast<std::size_t>(k)];
    return d;
  }
  py::tuple tuple(n);
  for (Py_ssize_t k = 0; k < n; ++k)
    PyTuple_SET_ITEM(tuple.ptr(), k, children[static_cast<std::size_t>(k)].release().ptr());
  return node.kind == Node::kNamedTuple ? node.obj(*tuple) : py::object(std::move(tuple));
}

void flatten_into(py::handle value, Layout& out, std::int64_t index, int depth) {
  if (depth > kMaxNesting) {
    raise(batch_layout_error(),
          "__getitem__(" + std::to_string(index) + ") returned a structure nested more than " +
              std::to_string(kMaxNesting) + " levels deep (does a list or dict contain itself?)");
  }
  Node node;
  std::vector<py::object> children;
  if (open_container(value, node, children)) {
    out.nodes.push_back(std::move(node));
    for (const py::object& child : children) flatten_into(child, out, index, depth + 1);
    return;
  }
  if (is_copyable_array(value)) {
    auto arr = py::reinterpret_borrow<py::array>(value);
    Leaf leaf;
    leaf.dtype = arr.dtype();
    leaf.itemsize = static_cast<std::size_t>(arr.itemsize());
    const auto ndim = static_cast<std::size_t>(arr.ndim());
    leaf.shape.resize(ndim);
    Source src;
    src.strides.resize(ndim);
    std::size_t nbytes = leaf.itemsize;
    for (std::size_t d = 0; d < ndim; ++d) {
      leaf.shape[d] = static_cast<std::int64_t>(arr.shape(static_cast<py::ssize_t>(d)));
      src.strides[d] = static_cast<std::int64_t>(arr.strides(static_cast<py::ssize_t>(d)));
      nbytes *= static_cast<std::size_t>(leaf.shape[d]);
    }
    leaf.source_shape = leaf.shape;
    leaf.nbytes = nbytes;
    src.data = static_cast<const std::byte*>(arr.data());
    src.array = std::move(arr);
    leaf.sources.push_back(std::move(src));
    leaf.offset = (out.bytes + kAlign - 1) / kAlign * kAlign;
    out.bytes = leaf.offset + nbytes;
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
  if (node.kind == Node::kArray) {
    const Leaf& leaf = layout.leaves[node.count];
    return view_array(py::reinterpret_borrow<py::dtype>(leaf.dtype),
                      std::vector<py::ssize_t>(leaf.shape.begin(), leaf.shape.end()),
                      leaf.nbytes == 0 || base == nullptr ? nullptr : base + leaf.offset, lease);
  }
  if (!node.container()) return node.obj;
  std::vector<py::object> children;
  children.reserve(node.count);
  for (std::uint32_t k = 0; k < node.count; ++k)
    children.push_back(build_from(layout, i, base, lease));
  return close_container(node, children);
}

[[noreturn]] void mismatch(std::int64_t index, std::size_t sample, const std::string& what) {
  raise(stack_error(), "pyloader.stack: batch " + std::to_string(index) + ": sample " +
                           std::to_string(sample) + " " + what);
}

std::string shape_str(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (std::size_t d = 0; d < shape.size(); ++d) {
    out += std::to_string(shape[d]);
    if (d + 1 < shape.size() || shape.size() == 1) out += ",";
    if (d + 1 < shape.size()) out += " ";
  }
  return out + ")";
}

// The dtype Python scalars collate to (like default_collate), or null for "keep a list".
py::object scalar_dtype(const std::vector<py::handle>& values) {
  auto all = [&](auto pred) {
    for (py::handle v : values) {
      if (!pred(v.ptr())) return false;
    }
    return true;
  };
  if (all([](PyObject* o) { return PyBool_Check(o); })) return py::dtype("bool");
  if (all([](PyObject* o) { return PyLong_CheckExact(o); })) return py::dtype("int64");
  if (all([](PyObject* o) { return PyFloat_CheckExact(o); })) return py::dtype("float64");
  static py::handle generic = py::object(py::module_::import("numpy").attr("generic")).release();
  py::object first_dtype;
  for (py::handle v : values) {
    if (!PyObject_IsInstance(v.ptr(), generic.ptr())) return py::object();
    py::object dt = v.attr("dtype");
    if (py::reinterpret_borrow<py::dtype>(dt).kind() == 'O') return py::object();
    if (!first_dtype) {
      first_dtype = dt;
    } else if (!first_dtype.equal(dt)) {
      return py::object();
    }
  }
  return first_dtype;
}

// Merges per-sample layouts (same structure) into `out`, node by node from `n` in preorder.
void merge_samples(const std::vector<Layout>& parts, std::size_t& n, Layout& out,
                   std::int64_t index) {
  const Node& ref = parts[0].nodes[n];
  const std::size_t batch = parts.size();
  for (std::size_t k = 1; k < batch; ++k) {
    const Node& other = parts[k].nodes[n];
    if (other.kind != ref.kind || (ref.container() && other.count != ref.count)) {
      mismatch(index, k, "has a different structure from sample 0");
    }
    if (ref.kind == Node::kDict && !ref.obj.equal(other.obj)) {
      mismatch(index, k,
               "has dict keys " + py::repr(other.obj).cast<std::string>() + ", sample 0 has " +
                   py::repr(ref.obj).cast<std::string>());
    }
    if (ref.kind == Node::kNamedTuple && !ref.obj.is(other.obj)) {
      mismatch(index, k, "is a different namedtuple type from sample 0");
    }
  }
  ++n;
  if (ref.container()) {
    out.nodes.push_back(Node{ref.kind, ref.count, ref.obj});
    for (std::uint32_t c = 0; c < ref.count; ++c) merge_samples(parts, n, out, index);
    return;
  }
  switch (ref.kind) {
    case Node::kArray: {
      const Leaf& first = parts[0].leaves[ref.count];
      Leaf leaf;
      leaf.dtype = first.dtype;
      leaf.itemsize = first.itemsize;
      leaf.source_shape = first.shape;
      leaf.shape.push_back(static_cast<std::int64_t>(batch));
      leaf.shape.insert(leaf.shape.end(), first.shape.begin(), first.shape.end());
      for (std::size_t k = 0; k < batch; ++k) {
        const Leaf& l = parts[k].leaves[parts[k].nodes[n - 1].count];
        if (l.shape != first.shape) {
          mismatch(index, k,
                   "has an array of shape " + shape_str(l.shape) + " where sample 0 has " +
                       shape_str(first.shape) + ": samples must have equal shapes to stack");
        }
        if (!l.dtype.equal(first.dtype)) {
          mismatch(index, k,
                   "has an array of dtype " + py::str(l.dtype).cast<std::string>() +
                       " where sample 0 has " + py::str(first.dtype).cast<std::string>());
        }
        leaf.sources.push_back(l.sources[0]);
      }
      leaf.nbytes = first.nbytes * batch;
      leaf.offset = (out.bytes + kAlign - 1) / kAlign * kAlign;
      out.bytes = leaf.offset + leaf.nbytes;
      out.nodes.push_back(
          Node{Node::kArray, static_cast<std::uint32_t>(out.leaves.size()), py::object()});
      out.leaves.push_back(std::move(leaf));
      return;
    }
    case Node::kObject:
    default: {
      std::vector<py::handle> values;
      values.reserve(batch);
      for (std::size_t k = 0; k < batch; ++k) values.push_back(parts[k].nodes[n - 1].obj);
      py::object dtype = scalar_dtype(values);
      if (!dtype) {  // strings and other objects: the list of the samples' values
        py::list list(batch);
        for (std::size_t k = 0; k < batch; ++k) list[k] = values[k];
        out.nodes.push_back(Node{Node::kObject, 0, std::move(list)});
        return;
      }
      static py::handle asarray =
          py::object(py::module_::import("numpy").attr("asarray")).release();
      py::list list(batch);
      for (std::size_t k = 0; k < batch; ++k) list[k] = values[k];
      flatten_into(asarray(list, dtype), out, index, 0);
      return;
    }
  }
}

}  // namespace

PyBatch::~PyBatch() { drop_with_gil(layout, error); }  // may die on an engine thread

void flatten(py::handle value, Layout& out, std::int64_t index) {
  flatten_into(value, out, index, 0);
}

void flatten_stacked(py::handle samples, Layout& out, std::int64_t index) {
  auto list = py::reinterpret_borrow<py::list>(samples);
  if (list.empty()) {
    raise(stack_error(), "pyloader.stack: batch " + std::to_string(index) + " has no samples");
  }
  std::vector<Layout> parts(list.size());
  for (std::size_t k = 0; k < list.size(); ++k) {
    flatten_into(list[k], parts[k], index, 0);
    if (parts[k].nodes.size() != parts[0].nodes.size()) {
      mismatch(index, k, "has a different structure from sample 0");
    }
  }
  std::size_t n = 0;
  merge_samples(parts, n, out, index);
}

void flatten_returned(py::handle value, Layout& out, std::int64_t index) {
  if (value.is_none() || PyGen_Check(value.ptr()) || PyCoro_CheckExact(value.ptr())) {
    const std::string what =
        value.is_none() ? "None"
                        : py::str(py::type::of(value).attr("__name__")).cast<std::string>();
    raise(batch_layout_error(),
          "__getitem__(" + std::to_string(index) + ") returned " + what +
              ": it must return the batch (a numpy array, a number, or a tuple/list/dict of them)");
  }
  if (py::isinstance<Stack>(value)) {
    flatten_stacked(py::reinterpret_borrow<py::object>(value).cast<Stack&>().samples, out, index);
  } else {
    flatten(value, out, index);
  }
}

void copy_leaves(Layout& layout, std::byte* dst, std::vector<py::object>& trash) noexcept {
  for (Leaf& leaf : layout.leaves) {
    const std::size_t each = leaf.sources.empty() ? 0 : leaf.nbytes / leaf.sources.size();
    std::byte* out = dst + leaf.offset;
    for (Source& src : leaf.sources) {
      if (each > 0) {
        copy_strided(out, src.data, leaf.itemsize, static_cast<int>(leaf.source_shape.size()),
                     leaf.source_shape.data(), src.strides.data());
      }
      out += each;
      src.data = nullptr;
      trash.push_back(std::move(src.array));  // a move: no reference count is touched
    }
    leaf.sources.clear();
  }
}

py::object view_array(const py::dtype& dtype, std::vector<py::ssize_t> shape, std::byte* data,
                      py::handle lease) {
  std::vector<py::ssize_t> strides(shape.size());
  py::ssize_t stride = dtype.itemsize();
  for (std::size_t d = shape.size(); d-- > 0;) {
    strides[d] = stride;
    stride *= shape[d];
  }
  if (data == nullptr || stride == 0) return py::array(dtype, std::move(shape), std::move(strides));
  return py::array(dtype, std::move(shape), std::move(strides), data, lease);
}

py::tuple layout_meta(const Layout& layout) {
  std::string kinds(layout.nodes.size(), '\0');
  py::tuple counts(layout.nodes.size());
  py::list objects;
  for (std::size_t i = 0; i < layout.nodes.size(); ++i) {
    const Node& n = layout.nodes[i];
    kinds[i] = static_cast<char>(n.kind);
    counts[i] = py::int_(n.count);
    if (n.carries_object()) objects.append(n.obj);
  }
  py::list leaves;
  for (const Leaf& leaf : layout.leaves) {
    py::tuple shape(leaf.shape.size());
    for (std::size_t d = 0; d < leaf.shape.size(); ++d) shape[d] = py::int_(leaf.shape[d]);
    leaves.append(py::make_tuple(leaf.dtype, shape, leaf.offset));
  }
  return py::make_tuple(py::bytes(kinds), counts, objects, leaves, layout.bytes);
}

py::object build_meta(py::handle meta, std::byte* base, std::size_t capacity, py::handle lease) {
  auto bad = [](const std::string& what) {
    throw py::value_error("malformed batch layout from a worker: " + what);
  };
  auto t = py::reinterpret_borrow<py::tuple>(meta);
  if (!py::isinstance<py::tuple>(meta) || t.size() != 5) bad("not a 5-tuple");
  const std::string kinds = t[0].cast<std::string>();
  auto counts = t[1].cast<py::tuple>();
  auto objects = t[2].cast<py::list>();
  auto leaves = t[3].cast<py::list>();
  if (counts.size() != kinds.size() || kinds.empty()) bad("node counts");
  Layout layout;
  layout.bytes = t[4].cast<std::size_t>();
  if (layout.bytes > capacity) bad("needs more bytes than its buffer holds");
  std::size_t next_object = 0;
  for (std::size_t i = 0; i < kinds.size(); ++i) {
    Node n;
    const auto kind = static_cast<std::uint8_t>(kinds[i]);
    if (kind > Node::kObject) bad("node kind");
    n.kind = static_cast<Node::Kind>(kind);
    n.count = counts[i].cast<std::uint32_t>();
    if (n.carries_object()) {
      if (next_object >= objects.size()) bad("objects");
      n.obj = objects[next_object++];
      if (n.kind == Node::kDict && (!py::isinstance<py::tuple>(n.obj) || py::len(n.obj) != n.count))
        bad("dict keys");
    }
    if (n.kind == Node::kArray && n.count >= leaves.size()) bad("leaf number");
    layout.nodes.push_back(std::move(n));
  }
  for (py::handle h : leaves) {
    auto lt = h.cast<py::tuple>();
    Leaf leaf;
    leaf.dtype = py::dtype::from_args(lt[0]);
    leaf.itemsize =
        static_cast<std::size_t>(py::reinterpret_borrow<py::dtype>(leaf.dtype).itemsize());
    leaf.nbytes = leaf.itemsize;
    for (py::handle d : lt[1].cast<py::tuple>()) {
      const auto extent = d.cast<std::int64_t>();
      if (extent < 0) bad("negative extent");
      leaf.shape.push_back(extent);
      leaf.nbytes *= static_cast<std::size_t>(extent);
    }
    leaf.offset = lt[2].cast<std::size_t>();
    if (leaf.offset > layout.bytes || leaf.nbytes > layout.bytes - leaf.offset)
      bad("an array outside the batch");
    layout.leaves.push_back(std::move(leaf));
  }
  // build() walks the nodes by their counts: check they form exactly one tree.
  std::size_t open = 1;
  for (const Node& n : layout.nodes) {
    if (open == 0) bad("extra nodes");
    --open;
    if (n.container()) open += n.count;
  }
  if (open != 0) bad("missing nodes");
  return build(layout, base, lease);
}

py::object build(const Layout& layout, std::byte* base, py::handle lease) {
  std::size_t i = 0;
  return build_from(layout, i, base, lease);
}

}  // namespace pyloader::python
