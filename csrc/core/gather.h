// gather.h: GatherLoader, a Loader that needs no Python: it gathers rows of in-memory (or
// memory-mapped) arrays straight into slot buffers.
//
// Roles: the owner describes the columns (base pointer, bytes between rows, bytes of one row:
// each row must be contiguous) and registers, before each epoch is appended to the engine, the
// epoch's sample order (set_order; null for the identity). Workers then call prepare() (sizes the
// batch) and fill() (one memcpy per row and column, or one per column when the batch's rows are
// consecutive and the column is contiguous) with no lock held and no GIL.
//
// Batch b of an epoch holds samples order[b * batch_size, min((b + 1) * batch_size, samples)).
// Columns are laid out one after the other in the buffer, each at a 64-byte aligned offset
// (offsets()). The arrays must stay alive and unchanged while the loader is used: the owner (the
// Python binding) keeps references to them.
//
// Thread safety: set_order() may run concurrently with workers (one mutex guards the order map;
// a worker takes a shared_ptr to its epoch's order, so pruning old epochs is safe).
#pragma once

#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine.h"

namespace pyloader {

struct GatherColumn {
  const std::byte* base = nullptr;  // row 0
  std::int64_t row_stride = 0;      // bytes from one row to the next (may differ from row_bytes)
  std::size_t row_bytes = 0;        // contiguous bytes of one row
};

class GatherBatch final : public Payload {
 public:
  std::int64_t rows = 0;
  std::int64_t start = 0;  // first entry of the epoch's order
  std::shared_ptr<const std::vector<std::int64_t>> order;  // null: identity
};

class GatherLoader final : public Loader {
 public:
  static constexpr std::size_t kAlign = 64;

  GatherLoader(std::vector<GatherColumn> columns, std::int64_t samples, std::int64_t batch_size)
      : columns_(std::move(columns)), samples_(samples), batch_size_(batch_size) {}

  // The sample order of `epoch` (a permutation of [0, samples)), or null for the identity.
  // Orders of epochs older than epoch - kKeepEpochs are dropped.
  void set_order(std::int64_t epoch, std::shared_ptr<const std::vector<std::int64_t>> order) {
    std::lock_guard lock(mu_);
    orders_[epoch] = std::move(order);
    while (!orders_.empty() && orders_.begin()->first < epoch - kKeepEpochs) orders_.erase(orders_.begin());
  }

  // Offsets of each column in a batch of `rows` rows; *total is the bytes the batch needs.
  std::vector<std::size_t> offsets(std::int64_t rows, std::size_t* total) const {
    std::vector<std::size_t> out;
    out.reserve(columns_.size());
    std::size_t end = 0;
    for (const GatherColumn& c : columns_) {
      const std::size_t at = (end + kAlign - 1) / kAlign * kAlign;
      out.push_back(at);
      end = at + c.row_bytes * static_cast<std::size_t>(rows);
    }
    if (total) *total = end;
    return out;
  }

  void thread_start(int) override {}
  void thread_exit(int) noexcept override {}
  bool enter(int) override { return true; }
  void leave(int) override {}
  // Preparing is cheap here: let every worker take its own batch and gather it in parallel.
  std::size_t max_run() const noexcept override { return 1; }

  void prepare(int, Prepared& item) noexcept override {
    const std::int64_t start = item.task.index * batch_size_;
    if (item.task.index < 0 || start >= samples_) {
      item.error = "batch index " + std::to_string(item.task.index) + " is out of range";
      return;
    }
    auto batch = std::make_unique<GatherBatch>();
    batch->start = start;
    batch->rows = std::min(batch_size_, samples_ - start);
    {
      std::lock_guard lock(mu_);
      auto it = orders_.find(item.task.epoch);
      if (it == orders_.end()) {
        item.error = "no sample order was registered for epoch " + std::to_string(item.task.epoch);
        return;
      }
      batch->order = it->second;
    }
    offsets(batch->rows, &item.bytes);
    item.payload = std::move(batch);
  }

  void fill(int, Prepared& item, std::byte* dst, std::size_t) noexcept override {
    const auto& batch = static_cast<const GatherBatch&>(*item.payload);
    const std::vector<std::size_t> at = offsets(batch.rows, nullptr);
    for (std::size_t c = 0; c < columns_.size(); ++c) {
      const GatherColumn& col = columns_[c];
      if (col.row_bytes == 0) continue;
      std::byte* out = dst + at[c];
      if (!batch.order && col.row_stride == static_cast<std::int64_t>(col.row_bytes)) {
        std::memcpy(out, col.base + batch.start * col.row_stride, col.row_bytes * static_cast<std::size_t>(batch.rows));
        continue;
      }
      for (std::int64_t r = 0; r < batch.rows; ++r) {
        const std::int64_t sample = batch.order ? (*batch.order)[static_cast<std::size_t>(batch.start + r)]
                                                : batch.start + r;
        std::memcpy(out, col.base + sample * col.row_stride, col.row_bytes);
        out += col.row_bytes;
      }
    }
  }

  bool has_epoch_end() const noexcept override { return false; }
  std::unique_ptr<Payload> epoch_end(int, std::int64_t) noexcept override { return nullptr; }

 private:
  static constexpr std::int64_t kKeepEpochs = 2;
  const std::vector<GatherColumn> columns_;
  const std::int64_t samples_;
  const std::int64_t batch_size_;
  std::mutex mu_;
  std::map<std::int64_t, std::shared_ptr<const std::vector<std::int64_t>>> orders_;
};

}  // namespace pyloader
