#include "pin.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

namespace pyloader {

const char* pin_method_name(PinMethod m) noexcept {
  switch (m) {
    case PinMethod::kCuda: return "cuda";
    case PinMethod::kMlock: return "mlock";
    default: return "none";
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
      host_register_ =
          reinterpret_cast<int (*)(void*, std::size_t, unsigned)>(dlsym(cudart_, "cudaHostRegister"));
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
  switch (method_) {
    case PinMethod::kCuda: {
      const int rc = host_register_(data, bytes, kCudaHostRegisterPortable);
      if (rc == 0) return true;
      last_error_ = std::string("cudaHostRegister failed: ") +
                    (error_string_ ? error_string_(rc) : std::to_string(rc).c_str());
      return false;
    }
    case PinMethod::kMlock:
      if (mlock(data, bytes) == 0) return true;
      last_error_ = std::string("mlock failed: ") + std::strerror(errno) +
                    (errno == ENOMEM || errno == EPERM ? " (RLIMIT_MEMLOCK too small?)" : "");
      return false;
    default:
      return false;
  }
}

void Pinner::unpin(void* data, std::size_t bytes) noexcept {
  switch (method_) {
    case PinMethod::kCuda: host_unregister_(data); break;
    case PinMethod::kMlock: munlock(data, bytes); break;
    default: break;
  }
}

}  // namespace pyloader
