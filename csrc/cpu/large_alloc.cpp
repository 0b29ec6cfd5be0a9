#include "large_alloc.h"

#include <ATen/Context.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <cstdlib>
#include <limits>
#include <map>
#include <mutex>

// Under AddressSanitizer (`make sanitize`) an idle buffer is poisoned, and so is the
// rounding slack past a tensor's bytes, so that a read past an output or of a freed
// one is reported as for any heap buffer (without it the pool hides both).
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(addr, size) ((void)(addr), (void)(size))
#endif

namespace fastmeta {
namespace {

constexpr size_t kRound = size_t(2) << 20;
constexpr size_t kAlign = 64;

class BufferPool {
 public:
  BufferPool() {
    // FASTMETA_CPU_POOL_MB: a whole number of MiB; unset or unreadable: 1024.
    const char* env = std::getenv("FASTMETA_CPU_POOL_MB");
    char* end = nullptr;
    const long long mib = env != nullptr ? std::strtoll(env, &end, 10) : -1;
    const bool valid = env != nullptr && end != env && *end == '\0' && mib >= 0;
    limit_ = static_cast<size_t>(valid ? mib : 1024) << 20;
  }

  void* get(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = idle_.find(bytes);
      if (it != idle_.end()) {
        void* ptr = it->second;
        idle_.erase(it);
        idle_bytes_ -= bytes;
        ASAN_UNPOISON_MEMORY_REGION(ptr, bytes);
        return ptr;
      }
    }
    void* ptr = nullptr;
    return posix_memalign(&ptr, kAlign, bytes) == 0 ? ptr : nullptr;
  }

  void put(void* ptr, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (idle_bytes_ + bytes <= limit_) {
        idle_.emplace(bytes, ptr);
        idle_bytes_ += bytes;
        ASAN_POISON_MEMORY_REGION(ptr, bytes);
        return;
      }
    }
    ASAN_UNPOISON_MEMORY_REGION(ptr, bytes);
    std::free(ptr);
  }

  size_t clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& [bytes, ptr] : idle_) {
      ASAN_UNPOISON_MEMORY_REGION(ptr, bytes);
      std::free(ptr);
    }
    idle_.clear();
    const size_t freed = idle_bytes_;
    idle_bytes_ = 0;
    return freed;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> idle_;  // rounded size -> idle buffer
  size_t idle_bytes_ = 0;
  size_t limit_ = 0;
};

// Leaked on purpose: tensors may be freed during interpreter shutdown.
BufferPool& pool() {
  static auto* instance = new BufferPool();
  return *instance;
}

}  // namespace

at::Tensor empty_cpu_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const int64_t nbytes = numel * static_cast<int64_t>(options.dtype().itemsize());
  if (nbytes < kLargeBytes) return at::empty(sizes, options);
  const size_t rounded = (static_cast<size_t>(nbytes) + kRound - 1) / kRound * kRound;
  void* ptr = pool().get(rounded);
  if (ptr == nullptr) return at::empty(sizes, options);  // let ATen report the failure
  ASAN_POISON_MEMORY_REGION(static_cast<char*>(ptr) + nbytes, rounded - nbytes);
  at::Tensor out =
      at::from_blob(ptr, sizes, [rounded](void* p) { pool().put(p, rounded); }, options);
  const auto& ctx = at::globalContext();
  if (ctx.deterministicAlgorithms() && ctx.deterministicFillUninitializedMemory() &&
      out.is_floating_point()) {
    out.fill_(std::numeric_limits<double>::quiet_NaN());
  }
  return out;
}

int64_t empty_cpu_pool() { return static_cast<int64_t>(pool().clear()); }

}  // namespace fastmeta
