// Internal header of the CPU kernels (csrc/cpu): compiler checks, the target attributes of the SIMD
// variants, and the run-time choice between them. Not part of the C ABI (mend/kernels.h).
//
// Each kernel writes its hot loop once as an always-inlined function (MEND_INLINE) and instantiates
// it in small wrappers marked MEND_TARGET_AVX512 / MEND_TARGET_AVX2 (x86 only, MEND_X86) plus a
// baseline one, then calls the wrapper for selected_simd_path(). No -march=native is needed.
#ifndef MEND_CPU_SIMD_H_
#define MEND_CPU_SIMD_H_

#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__GNUC__) && !defined(__clang__)
#error "mend_kernels CPU kernels need GCC or Clang (vector extensions, target attributes)"
#endif

#define MEND_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define MEND_X86 1
#if defined(__clang__)
#define MEND_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2"), min_vector_width(512)))
#else
#define MEND_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512")))
#endif
#define MEND_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))
#endif

namespace mend_cpu {

enum SimdPath { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best path this CPU supports (detected once; inline, so one cached value for all kernels).
inline SimdPath hardware_simd_path() {
#ifdef MEND_X86
  static const SimdPath cached = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("fma"))
      return kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kAvx2;
    return kBaseline;
  }();
  return cached;
#else
  return kBaseline;
#endif
}

// The path the kernels take: the hardware's, lowered (never raised) by MEND_KERNELS_CPU_ISA, which
// is read at every call.
inline SimdPath selected_simd_path() {
  const SimdPath hw = hardware_simd_path();
  const char* env = std::getenv("MEND_KERNELS_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return hw;
  SimdPath want = hw;
  if (std::strcmp(env, "baseline") == 0) want = kBaseline;
  else if (std::strcmp(env, "avx2") == 0) want = kAvx2;
  else if (std::strcmp(env, "avx512") == 0) want = kAvx512;
  return want < hw ? want : hw;
}

// Threads a parallel region may use (OpenMP's, shared with torch's libgomp); 1 without OpenMP.
inline int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

inline const char* simd_path_name(SimdPath p) {
  switch (p) {
    case kAvx512: return "avx512";
    case kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace mend_cpu

#endif  // MEND_CPU_SIMD_H_
