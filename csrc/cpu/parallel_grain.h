// Grain sizes for at::parallel_for.
#pragma once

#include <algorithm>
#include <cstdint>

namespace fastmeta {

// Each parallel task gets at least this many elements of work (ATen's own grain):
// an OpenMP region costs tens of microseconds on a busy 2-core machine, more than
// a small episode's whole epilogue, so small problems run inline.
constexpr int64_t kMinParallelElements = 32768;

// The grain for items of `work_per_item` elements each.
inline int64_t grain_for(int64_t work_per_item) {
  return std::max<int64_t>(1, kMinParallelElements / std::max<int64_t>(work_per_item, 1));
}

}  // namespace fastmeta
