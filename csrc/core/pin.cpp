#include "pin.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace pyloader {

const char* pin_method_name(PinMethod m) noexcept {
  switch (m) {
    case PinMethod::kCuda:
      return "cuda";
    case PinMethod::kMlock:
      return "mlock";
    default:
      return "none";
  }
}

namespace {
constexpr unsigned kCudaHostRegisterPortable = 1;
const char* const kCudartNames[] = {"libcudart.so", "libcudart.so.13", "libcudart.so.12",
                                    "libcudart.so.11.0"};
}  // namespace

Pinner::Pinner(PinRequest request) {
  if (request == PinRequest::kOff) {
    reason_ = "pinning disabled (pin=False)";
    return;
  }
  if (request == PinRequest::kAuto || request == PinRequest::kCuda) {
    for (const char* name : kCudartNames) {
      cudart_ = dlopen(name, RTLD_NOW | RTLD_LOCAL);
      if (cudart_) break;
    }
    if (cudart_) {
      auto count = reinterpret_cast<int (*)(int*)>(dlsym(cudart_, "cudaGetDeviceCount"));
      host_register_ = reinterpret_cast<int (*)(void*, std::size_t, unsigned)>(
          dlsym(cudart_, "cudaHostRegister"));
      host_unregister_ = reinterpret_cast<int (*)(void*)>(dlsym(cudart_, "cudaHostUnregister"));
      error_string_ = reinterpret_cast<const char* (*)(int)>(dlsym(cudart_, "cudaGetErrorString"));
      int devices = 0;
      if (count && host_register_ && host_unregister_ && count(&devices) == 0 && devices > 0) {
        method_ = PinMethod::kCuda;
        reason_ = "CUDA runtime found with " + std::to_string(devices) + " device(s)";
        return;
      }
      reason_ = "CUDA runtime found but no usable device";
      dlclose(cudart_);
      cudart_ = nullptr;
    } else {
      reason_ = "no CUDA runtime (libcudart) could be loaded";
    }
    if (request == PinRequest::kCuda) throw std::runtime_error("pin='cuda': " + reason_);
  }
  method_ = PinMethod::kMlock;
  reason_ += reason_.empty() ? "mlock requested" : "; using mlock";
}

Pinner::~Pinner() {
  if (cudart_) dlclose(cudart_);
}

bool Pinner::pin(void* data, std::size_t bytes) noexcept {
  if (bytes == 0) return false;
  std::string error;
  switch (method_) {
    case PinMethod::kCuda: {
      const int rc = host_register_(data, bytes, kCudaHostRegisterPortable);
      if (rc == 0) return true;
      error = std::string("cudaHostRegister failed: ") +
              (error_string_ ? error_string_(rc) : std::to_string(rc).c_str());
      break;
    }
    case PinMethod::kMlock: {
      if (bytes >= mlock_floor_.load(std::memory_order_relaxed))
        return false;  // error already said
      if (mlock(data, bytes) == 0) return true;
      const int err = errno;
      error = std::string("mlock failed: ") + std::strerror(err);
      if (err == ENOMEM || err == EPERM) {
        error += " (RLIMIT_MEMLOCK too small?); buffers of " + std::to_string(bytes) +
                 " bytes or more are no longer pinned";
        std::size_t floor = mlock_floor_.load(std::memory_order_relaxed);
        while (bytes < floor &&
               !mlock_floor_.compare_exchange_weak(floor, bytes, std::memory_order_relaxed)) {
        }
      }
      break;
    }
    default:
      return false;
  }
  std::lock_guard lock(mu_);
  last_error_ = std::move(error);
  return false;
}

void Pinner::unpin(void* data, std::size_t bytes) noexcept {
  switch (method_) {
    case PinMethod::kCuda:
      host_unregister_(data);
      break;
    case PinMethod::kMlock:
      munlock(data, bytes);
      break;
    default:
      break;
  }
}

}  // namespace pyloader
