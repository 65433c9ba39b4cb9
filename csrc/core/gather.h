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
// Splitting: a batch of at least kSplitBytes is cut into chunks of rows. The worker filling it
// posts the chunks to a queue served by `helpers` threads of the loader's own, takes chunks
// itself until the queue has none of its batch left, then waits only for the chunks that helpers
// took. The poster never waits for a helper to become free, so splitting cannot deadlock, and
// with no helper it degrades to the worker doing every chunk. Helpers stop in the destructor.
//
// Thread safety: set_order() may run concurrently with workers (one mutex guards the order map;
// a worker takes a shared_ptr to its epoch's order, so pruning old epochs is safe).
//
// Which orders are kept: see NOTE [ Gather prunes sample orders two epochs behind the plan ].
#pragma once

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "engine.h"
#include "thread_pool.h"

namespace pyloader {

struct GatherColumn {
  const std::byte* base = nullptr;  // row 0
  std::int64_t row_stride = 0;      // bytes from one row to the next (may differ from row_bytes)
  std::size_t row_bytes = 0;        // contiguous bytes of one row
};

class GatherBatch final : public Payload {
 public:
  std::int64_t rows = 0;
  std::int64_t start = 0;                                  // first entry of the epoch's order
  std::shared_ptr<const std::vector<std::int64_t>> order;  // null: identity
};

class GatherLoader final : public Loader {
 public:
  static constexpr std::size_t kAlign = 64;

  static constexpr std::size_t kSplitBytes = std::size_t{1} << 20;
  static constexpr std::int64_t kMinChunkRows = 16;

  GatherLoader(std::vector<GatherColumn> columns, std::int64_t samples, std::int64_t batch_size,
               int helpers = 0)
      : columns_(std::move(columns)),
        samples_(samples),
        batch_size_(batch_size),
        helpers_(helpers) {
    if (helpers_ > 0) crew_.start(helpers_, [this](int) { helper_main(); });
  }
  ~GatherLoader() override {
    {
      std::lock_guard lock(queue_mu_);
      stopping_ = true;
    }
    queue_cv_.notify_all();
    crew_.join();
  }
  GatherLoader(const GatherLoader&) = delete;
  GatherLoader& operator=(const GatherLoader&) = delete;

  // NOTE [ Gather prunes sample orders two epochs behind the plan ]
  //
  // set_order(N) drops the orders of the epochs before N - kKeepEpochs (N - 2), so that a long
  // run keeps three orders, not one per epoch; and prepare() fails a position whose epoch's order
  // is missing ("no sample order was registered for epoch e"). That is safe because of how the
  // owner plans (src/pyloader/prefetcher.py, which cites this note), engine by engine:
  //   1. it registers an epoch's order before it appends the epoch to the engine;
  //   2. it registers epoch N only when every position of the engine still to be prepared
  //      belongs to epoch N - 1 or later. The plan runs at most one epoch ahead of the consumer:
  //      it appends epoch N while the consumer is in epoch N - 1 (having first drained an
  //      unfinished pass) or once the consumer has taken every position planned so far; a
  //      position below the consumer's has been taken, hence published, hence prepared (the
  //      order is looked up in prepare(), and kept by the batch from then on). A new engine
  //      starts only after the owner's previous one was stopped and joined.
  // So only the orders of N - 1 and N can still be needed; N - 2 is kept as a margin.
  // The argument is per owner: the orders live in this loader, so one loader must never have two
  // owners (two would each prune the other's orders). Each Prefetcher makes its own
  // (ArraySequence.native_source() returns a new one) and keeps it across its engines; tested by
  // tests/test_arrays.py::test_two_prefetchers_over_one_array_sequence_keep_each_others_sample_orders.

  // The sample order of `epoch` (a permutation of [0, samples)), or null for the identity.
  // Orders of epochs older than epoch - kKeepEpochs are dropped (see the note above).
  void set_order(std::int64_t epoch, std::shared_ptr<const std::vector<std::int64_t>> order) {
    std::lock_guard lock(mu_);
    orders_[epoch] = std::move(order);
    while (!orders_.empty() && orders_.begin()->first < epoch - kKeepEpochs)
      orders_.erase(orders_.begin());
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
      // Present: see NOTE [ Gather prunes sample orders two epochs behind the plan ].
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
    if (helpers_ == 0 || item.bytes < kSplitBytes || batch.rows < 2 * kMinChunkRows) {
      gather(batch, dst, 0, batch.rows);
      return;
    }
    // Split: post chunks, work on them too, then wait for the ones helpers took.
    const std::int64_t chunks = std::min<std::int64_t>(helpers_ + 1, batch.rows / kMinChunkRows);
    const std::int64_t per = (batch.rows + chunks - 1) / chunks;
    Split split;
    {
      std::lock_guard lock(queue_mu_);
      for (std::int64_t r = 0; r < batch.rows; r += per) {
        queue_.push_back(Chunk{&split, &batch, dst, r, std::min(r + per, batch.rows)});
        ++split.pending;
      }
    }
    queue_cv_.notify_all();
    for (;;) {  // help with our own chunks (others' too would be fine, ours first is simpler)
      Chunk c;
      {
        std::lock_guard lock(queue_mu_);
        auto it = std::find_if(queue_.begin(), queue_.end(),
                               [&](const Chunk& x) { return x.split == &split; });
        if (it == queue_.end()) break;
        c = *it;
        queue_.erase(it);
      }
      run(c);
    }
    std::unique_lock lock(queue_mu_);
    split.done.wait(lock, [&] { return split.pending == 0; });
  }

  // Copies rows [begin, end) of the batch to their places in dst.
  void gather(const GatherBatch& batch, std::byte* dst, std::int64_t begin,
              std::int64_t end) const noexcept {
    const std::vector<std::size_t> at = offsets(batch.rows, nullptr);
    for (std::size_t c = 0; c < columns_.size(); ++c) {
      const GatherColumn& col = columns_[c];
      if (col.row_bytes == 0) continue;
      std::byte* out = dst + at[c] + static_cast<std::size_t>(begin) * col.row_bytes;
      if (!batch.order && col.row_stride == static_cast<std::int64_t>(col.row_bytes)) {
        std::memcpy(out, col.base + (batch.start + begin) * col.row_stride,
                    col.row_bytes * static_cast<std::size_t>(end - begin));
        continue;
      }
      for (std::int64_t r = begin; r < end; ++r) {
        const std::int64_t sample = batch.order
                                        ? (*batch.order)[static_cast<std::size_t>(batch.start + r)]
                                        : batch.start + r;
        std::memcpy(out, col.base + sample * col.row_stride, col.row_bytes);
        out += col.row_bytes;
      }
    }
  }

  bool has_epoch_end() const noexcept override { return false; }
  std::unique_ptr<Payload> epoch_end(int, std::int64_t) noexcept override { return nullptr; }

 private:
  // NOTE [ Gather prunes sample orders two epochs behind the plan ]: the plan needs one.
  static constexpr std::int64_t kKeepEpochs = 2;
  const std::vector<GatherColumn> columns_;
  const std::int64_t samples_;
  const std::int64_t batch_size_;
  struct Split {
    std::int64_t pending = 0;  // under queue_mu_
    std::condition_variable done;
  };
  struct Chunk {
    Split* split = nullptr;
    const GatherBatch* batch = nullptr;
    std::byte* dst = nullptr;
    std::int64_t begin = 0, end = 0;
  };

  void run(const Chunk& c) {
    gather(*c.batch, c.dst, c.begin, c.end);
    std::lock_guard lock(queue_mu_);
    if (--c.split->pending == 0) c.split->done.notify_all();
  }

  void helper_main() {
    for (;;) {
      Chunk c;
      {
        std::unique_lock lock(queue_mu_);
        queue_cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (queue_.empty()) return;  // stopping, and nothing left to do
        c = queue_.front();
        queue_.pop_front();
      }
      run(c);
    }
  }

  std::mutex mu_;
  std::map<std::int64_t, std::shared_ptr<const std::vector<std::int64_t>>> orders_;
  const int helpers_;
  std::mutex queue_mu_;
  std::condition_variable queue_cv_;
  std::deque<Chunk> queue_;  // under queue_mu_
  bool stopping_ = false;    // under queue_mu_
  ThreadPool crew_;          // last: joined before the members above are destroyed
};

}  // namespace pyloader
