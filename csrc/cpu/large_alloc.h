// Uninitialized large CPU tensors from a small pool of reusable buffers.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fastmeta {

// Like at::empty for a CPU tensor. A buffer of kLargeBytes or more comes from a
// pool of freed buffers of the same (2 MiB-rounded) size when one is there. glibc
// maps every allocation above 32 MiB afresh, so without the pool each [T, P]
// output of a training step pays a page fault per 4 KiB: measured 34 ms to
// allocate and fill 128 MiB against 8 ms to fill it again (2-core EPYC). Smaller
// buffers fault too once glibc trims its heap between steps: a ProtoNet step at
// 60-way 5-shot D=1600 (1.9 MB gradients) took 1.7-1.9 ms with fresh pages and
// 1.3 ms with glibc told to keep them (MALLOC_TRIM_THRESHOLD_), hence 1 MiB.
// The pool keeps at most FASTMETA_CPU_POOL_MB (default 1024) of idle buffers;
// 0 turns it off. Honors torch.utils.deterministic.fill_uninitialized_memory.
at::Tensor empty_cpu_large(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees the idle buffers of the pool; returns the bytes freed.
int64_t empty_cpu_pool();

constexpr int64_t kLargeBytes = int64_t(1) << 20;

}  // namespace fastmeta
