// Runtime choice of the vector ISA for hot CPU loops. The extension is built for the
// baseline x86-64 (SSE2), which leaves AVX2/FMA and AVX-512 unused; a function marked
// FASTMETA_SIMD_CLONES is compiled once per ISA level below and the loader picks the
// best the CPU has (GCC's target_clones, resolved once through an ifunc). Helpers it
// calls must be FASTMETA_INLINE so that they are compiled into each clone.
#pragma once

#include <cstdint>  // defines __GLIBC__ where the C library is glibc

// target_clones needs GCC >= 11 for the x86-64-vN names and the loader's ifunc (glibc).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    defined(__GLIBC__)
#define FASTMETA_SIMD_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMETA_SIMD_CLONES
#endif

#define FASTMETA_INLINE inline __attribute__((always_inline))
