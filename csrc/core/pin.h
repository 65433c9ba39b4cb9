// pin.h: page-locking ("pinning") of host buffers, so that a device copy can use DMA directly.
//
// Three methods, chosen once per pool:
//   kCuda:  cudaHostRegister on the buffer. The CUDA runtime is opened with dlopen at run time, so
//           the core never links against CUDA and runs where there is none.
//   kMlock: mlock(2). Bounded by RLIMIT_MEMLOCK (often 8 MiB in containers), so it often fails;
//           failures are counted and reported, never raised.
//   kOff:   nothing.
// PinRequest::kAuto picks kCuda when a CUDA device is visible, else kMlock.
// After an mlock of n bytes fails for lack of permission or memory, larger ones are not tried
// again (a futile mlock can still cost its page faults).
// pin()/unpin() may be called from several threads at once (the pool pins outside its lock).
#pragma once

#include <atomic>
#include <cstddef>
#include <mutex>
#include <string>

namespace pyloader {

enum class PinRequest { kOff, kAuto, kCuda, kMlock };
enum class PinMethod { kNone, kCuda, kMlock };

const char* pin_method_name(PinMethod m) noexcept;

class Pinner {
 public:
  // Throws std::runtime_error for kCuda when no CUDA runtime or device is found.
  explicit Pinner(PinRequest request);
  ~Pinner();
  Pinner(const Pinner&) = delete;
  Pinner& operator=(const Pinner&) = delete;

  PinMethod method() const noexcept { return method_; }
  // Pins [data, data + bytes). False (and last_error() says why) if it could not.
  bool pin(void* data, std::size_t bytes) noexcept;
  void unpin(void* data, std::size_t bytes) noexcept;
  std::string last_error() const {
    std::lock_guard lock(mu_);
    return last_error_;
  }
  // Why kAuto chose what it chose (for memory_info()).
  const std::string& reason() const noexcept { return reason_; }

 private:
  PinMethod method_ = PinMethod::kNone;
  void* cudart_ = nullptr;  // dlopen handle
  int (*host_register_)(void*, std::size_t, unsigned) = nullptr;
  int (*host_unregister_)(void*) = nullptr;
  const char* (*error_string_)(int) = nullptr;
  std::atomic<std::size_t> mlock_floor_{static_cast<std::size_t>(-1)};  // smallest failed size
  mutable std::mutex mu_;                                               // guards last_error_
  std::string last_error_;
  std::string reason_;
};

}  // namespace pyloader
