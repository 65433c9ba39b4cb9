// histogram.h: LoadHistogram, a fixed log-scale histogram of per-batch load times (microseconds),
// so that an epoch of any number of batches keeps its load-time percentiles in constant memory.
//
// Buckets (HdrHistogram's layout, with kSubBits = 4): values below kExact (16 µs) each have a
// bucket of their own (exact); above, every power of two [2^k, 2^(k+1)) is cut into kSub (16)
// equal buckets, so a bucket's width is at most 1/16 of its lower bound. A value reported as its
// bucket's midpoint is within 1/32 (3.1%) of the recorded value. kBuckets covers every uint32.
// bucket_low(b) is the smallest value of bucket b; bucket_low(kBuckets) is 2^32 (the end).
//
// Roles and ordering: a plain value type. The Engine's consumer records into it under the
// Engine's stats mutex; copies are what stats() hands out. No atomics, no shutdown.
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>

namespace pyloader {

class LoadHistogram {
 public:
  static constexpr int kSubBits = 4;
  static constexpr std::uint32_t kSub = 1u << kSubBits;  // buckets per power of two
  static constexpr std::uint32_t kExact = kSub;          // values below have a bucket each
  static constexpr std::size_t kBuckets = kExact + (32 - kSubBits) * kSub;

  static constexpr std::size_t bucket_of(std::uint32_t us) noexcept {
    if (us < kExact) return us;
    const int top = std::bit_width(us) - 1;  // 2^top <= us < 2^(top+1), top >= kSubBits
    const std::uint32_t sub = (us >> (top - kSubBits)) - kSub;
    return kExact + static_cast<std::size_t>(top - kSubBits) * kSub + sub;
  }
  static constexpr std::uint64_t bucket_low(std::size_t b) noexcept {
    if (b < kExact) return b;
    const std::size_t k = (b - kExact) / kSub;  // power: 2^(k + kSubBits)
    const std::uint64_t sub = (b - kExact) % kSub;
    return (std::uint64_t{kSub} + sub) << k;
  }

  void record(std::uint32_t us) noexcept {
    ++counts_[bucket_of(us)];
    ++total_;
  }
  void merge(const LoadHistogram& other) noexcept {
    for (std::size_t b = 0; b < kBuckets; ++b) counts_[b] += other.counts_[b];
    total_ += other.total_;
  }
  std::uint64_t total() const noexcept { return total_; }
  const std::array<std::uint64_t, kBuckets>& counts() const noexcept { return counts_; }

 private:
  std::array<std::uint64_t, kBuckets> counts_{};
  std::uint64_t total_ = 0;
};

static_assert(LoadHistogram::bucket_of(15) == 15 && LoadHistogram::bucket_of(16) == 16,
              "Values below kExact have a bucket each, and 16 opens the first log-scale bucket.");
static_assert(LoadHistogram::bucket_of(0xFFFFFFFFu) == LoadHistogram::kBuckets - 1,
              "The largest uint32 falls in the last bucket.");
static_assert(LoadHistogram::bucket_low(LoadHistogram::kBuckets) == (std::uint64_t{1} << 32),
              "The end of the last bucket is 2^32.");
static_assert(LoadHistogram::bucket_low(LoadHistogram::bucket_of(1000)) <= 1000 &&
                  LoadHistogram::bucket_low(LoadHistogram::bucket_of(1000) + 1) > 1000,
              "A value lies in [bucket_low(b), bucket_low(b + 1)) of its bucket b.");

}  // namespace pyloader
