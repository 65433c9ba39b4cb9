// bind_array_source.cpp: pyloader._C.ArraySource, the native source of a pyloader.ArraySequence:
// its columns for the core's GatherLoader (gather.h), and how to rebuild a delivered batch (a
// single array, a tuple or a dict of arrays) over the batch's buffer.
#include <pybind11/numpy.h>

#include <memory>
#include <string>
#include <vector>

#include "../core/gather.h"
#include "bindings.h"
#include "layout.h"
#include "pool.h"
#include "source.h"

namespace pyloader::python {

namespace {

class PyArraySource final : public PySource {
 public:
  PyArraySource(py::list arrays, py::object keys, std::int64_t batch_size, int split_threads)
      : keys_(std::move(keys)) {
    std::vector<GatherColumn> columns;
    std::int64_t samples = -1;
    for (py::handle h : arrays) {
      auto arr = py::reinterpret_borrow<py::array>(h);
      if (arr.ndim() < 1) throw py::value_error("ArraySequence arrays need at least one dimension");
      GatherColumn col;
      col.base = static_cast<const std::byte*>(arr.data());
      col.row_stride = static_cast<std::int64_t>(arr.strides(0));
      col.row_bytes = static_cast<std::size_t>(arr.itemsize());
      std::vector<py::ssize_t> row_shape;
      for (py::ssize_t d = 1; d < arr.ndim(); ++d) {
        row_shape.push_back(arr.shape(d));
        col.row_bytes *= static_cast<std::size_t>(arr.shape(d));
      }
      if (samples >= 0 && arr.shape(0) != samples) {
        throw py::value_error("ArraySequence arrays differ in length");
      }
      samples = arr.shape(0);
      columns.push_back(col);
      dtypes_.push_back(arr.dtype());
      row_shapes_.push_back(std::move(row_shape));
      arrays_.push_back(std::move(arr));  // keeps the memory (and any mmap) alive
    }
    samples_ = samples;
    loader_ =
        std::make_shared<GatherLoader>(std::move(columns), samples, batch_size, split_threads);
  }

  // The order is checked here, once per epoch: the workers index memory with it unchecked.
  void set_order(std::int64_t epoch, py::object order) {
    std::shared_ptr<const std::vector<std::int64_t>> v;
    if (!order.is_none()) {
      auto a = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>::ensure(order);
      if (!a) throw py::error_already_set();
      if (a.ndim() != 1 || a.size() != samples_) {
        throw py::value_error("the sample order of epoch " + std::to_string(epoch) + " must hold " +
                              std::to_string(samples_) + " indices, got " +
                              std::to_string(a.size()));
      }
      const std::int64_t* data = a.data();
      for (py::ssize_t k = 0; k < a.size(); ++k) {
        if (data[k] < 0 || data[k] >= samples_) {
          throw py::index_error("the sample order of epoch " + std::to_string(epoch) +
                                " has index " + std::to_string(data[k]) + " at position " +
                                std::to_string(k) + ", outside [0, " + std::to_string(samples_) +
                                ")");
        }
      }
      v = std::make_shared<const std::vector<std::int64_t>>(data, data + a.size());
    }
    loader_->set_order(epoch, std::move(v));
  }

  std::shared_ptr<Loader> loader() const override { return loader_; }

  py::object deliver(Delivery d) override {
    const auto& batch = static_cast<const GatherBatch&>(*d.payload);
    const BatchMemory memory = hand_over(std::move(d.buffer));
    const std::vector<std::size_t> at = loader_->offsets(batch.rows, nullptr);
    py::list out;
    for (std::size_t c = 0; c < dtypes_.size(); ++c) {
      std::vector<py::ssize_t> shape{static_cast<py::ssize_t>(batch.rows)};
      shape.insert(shape.end(), row_shapes_[c].begin(), row_shapes_[c].end());
      out.append(view_array(dtypes_[c], std::move(shape),
                            memory.base == nullptr ? nullptr : memory.base + at[c], memory.lease));
    }
    if (keys_.is_none()) return out.size() == 1 ? py::object(out[0]) : py::object(py::tuple(out));
    py::dict dict;
    auto keys = py::reinterpret_borrow<py::tuple>(keys_);
    for (std::size_t c = 0; c < dtypes_.size(); ++c) dict[keys[c]] = out[c];
    return dict;
  }

 private:
  py::object keys_;  // None: a single array or a tuple; else a tuple of dict keys
  std::int64_t samples_ = 0;
  std::vector<py::array> arrays_;
  std::vector<py::dtype> dtypes_;
  std::vector<std::vector<py::ssize_t>> row_shapes_;
  std::shared_ptr<GatherLoader> loader_;
};

}  // namespace

void register_array_source(py::module_& m) {
  py::class_<PyArraySource, PySource, std::shared_ptr<PyArraySource>>(m, "ArraySource")
      .def(py::init<py::list, py::object, std::int64_t, int>(), py::arg("arrays"), py::arg("keys"),
           py::arg("batch_size"), py::arg("split_threads"))
      .def("set_order", &PyArraySource::set_order, py::arg("epoch"), py::arg("order"));
}

}  // namespace pyloader::python
