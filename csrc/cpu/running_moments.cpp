// Running per-column mean / M2 merge (Chan et al.), CPU kernel. Semantics: mend/kernels.h.
//
// Work split: the d columns are cut into chunks (a multiple of 16 columns, at most kMaxChunk) that
// OpenMP threads take dynamically. For its chunk a thread walks all n rows twice: pass 1 sums the
// rows (float64 accumulators, four rows per step, vectorised across columns, software prefetch a
// few rows ahead since consecutive rows of a chunk are ldx apart), pass 2 sums the squared
// deviations from the batch mean. The chunk width is chosen so that the n x chunk block of x
// (~4 MiB, L2/L3) is still cached for pass 2. The merge with the running statistics is done in float64
// and rounded once to float32.
//
// Like rank_update.cpp, the chunk kernel is compiled for AVX-512, AVX2 and the baseline target and
// picked at run time (simd.h).

#include "mend/kernels.h"

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace mend_cpu_moments {

#ifndef MEND_RM_PREFETCH
#define MEND_RM_PREFETCH 16
#endif
#ifndef MEND_RM_MAX_CHUNK
#define MEND_RM_MAX_CHUNK 1024
#endif
#ifndef MEND_RM_CACHE_BYTES
#define MEND_RM_CACHE_BYTES (4 * 1024 * 1024)
#endif
constexpr int64_t kMaxChunk = MEND_RM_MAX_CHUNK;  // columns per chunk: 2 x 8 * kMaxChunk bytes of float64 scratch

struct Args {
  float* mean;
  float* m2;
  int64_t count;
  const float* x;
  int64_t n, ldx;
};

// Columns [c0, c0 + cw) of the batch, cw <= kMaxChunk.
static MEND_INLINE void chunk_impl(const Args& p, int64_t c0, int64_t cw) {
  alignas(64) double sum[kMaxChunk];
  alignas(64) double mb[kMaxChunk];
  const int64_t n = p.n, ldx = p.ldx;
  const float* __restrict x = p.x + c0;

  // Pass 1: column sums.
  for (int64_t j = 0; j < cw; ++j) sum[j] = 0.0;
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const float* __restrict r0 = x + r * ldx;
    const float* __restrict r1 = r0 + ldx;
    const float* __restrict r2 = r1 + ldx;
    const float* __restrict r3 = r2 + ldx;
    if (MEND_RM_PREFETCH > 0 && r + MEND_RM_PREFETCH + 4 <= n) {
      // The rows of a chunk are far apart in memory (stride ldx): fetch a few rows ahead.
      const float* pf = r0 + MEND_RM_PREFETCH * ldx;
      for (int q = 0; q < 4; ++q, pf += ldx)
        for (int64_t j = 0; j < cw; j += 16) __builtin_prefetch(pf + j, 0, 3);
    }
#pragma omp simd
    for (int64_t j = 0; j < cw; ++j)
      sum[j] += (static_cast<double>(r0[j]) + static_cast<double>(r1[j])) +
                (static_cast<double>(r2[j]) + static_cast<double>(r3[j]));
  }
  for (; r < n; ++r) {
    const float* __restrict r0 = x + r * ldx;
#pragma omp simd
    for (int64_t j = 0; j < cw; ++j) sum[j] += static_cast<double>(r0[j]);
  }
  const double dn = static_cast<double>(n);
#pragma omp simd
  for (int64_t j = 0; j < cw; ++j) {
    mb[j] = sum[j] / dn;
    sum[j] = 0.0;
  }

  // Pass 2: sums of squared deviations from the batch mean.
  r = 0;
  for (; r + 4 <= n; r += 4) {
    const float* __restrict r0 = x + r * ldx;
    const float* __restrict r1 = r0 + ldx;
    const float* __restrict r2 = r1 + ldx;
    const float* __restrict r3 = r2 + ldx;
#pragma omp simd
    for (int64_t j = 0; j < cw; ++j) {
      const double d0 = static_cast<double>(r0[j]) - mb[j];
      const double d1 = static_cast<double>(r1[j]) - mb[j];
      const double d2 = static_cast<double>(r2[j]) - mb[j];
      const double d3 = static_cast<double>(r3[j]) - mb[j];
      sum[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < n; ++r) {
    const float* __restrict r0 = x + r * ldx;
#pragma omp simd
    for (int64_t j = 0; j < cw; ++j) {
      const double d0 = static_cast<double>(r0[j]) - mb[j];
      sum[j] += d0 * d0;
    }
  }

  // Merge.
  float* __restrict mean = p.mean + c0;
  float* __restrict m2 = p.m2 + c0;
  if (p.count == 0) {
#pragma omp simd
    for (int64_t j = 0; j < cw; ++j) {
      mean[j] = static_cast<float>(mb[j]);
      m2[j] = static_cast<float>(sum[j]);
    }
    return;
  }
  const double dc = static_cast<double>(p.count);
  const double total = dc + dn;
  const double w_batch = dn / total;       // n / (count + n)
  const double w_cross = dc * dn / total;  // count * n / (count + n)
#pragma omp simd
  for (int64_t j = 0; j < cw; ++j) {
    const double old_mean = static_cast<double>(mean[j]);
    const double delta = mb[j] - old_mean;
    mean[j] = static_cast<float>(old_mean + delta * w_batch);
    m2[j] = static_cast<float>(static_cast<double>(m2[j]) + sum[j] + delta * delta * w_cross);
  }
}

typedef void (*ChunkFn)(const Args&, int64_t, int64_t);

#ifdef MEND_X86
MEND_TARGET_AVX512 static void chunk_avx512(const Args& p, int64_t c0, int64_t cw) { chunk_impl(p, c0, cw); }
MEND_TARGET_AVX2 static void chunk_avx2(const Args& p, int64_t c0, int64_t cw) { chunk_impl(p, c0, cw); }
#endif
static void chunk_baseline(const Args& p, int64_t c0, int64_t cw) { chunk_impl(p, c0, cw); }

static ChunkFn chunk_fn() {
  switch (mend_cpu::selected_simd_path()) {
#ifdef MEND_X86
    case mend_cpu::kAvx512: return chunk_avx512;
    case mend_cpu::kAvx2: return chunk_avx2;
#endif
    default: return chunk_baseline;
  }
}

static int running_moments(float* mean, float* m2, int64_t count, const float* x, int64_t n, int64_t d,
                           int64_t ldx) {
  if (mean == nullptr || m2 == nullptr || x == nullptr) return MEND_ERR_INVALID_ARGUMENT;
  if (n < 1 || d < 1 || ldx < d || count < 0) return MEND_ERR_INVALID_ARGUMENT;

  const int threads = mend_cpu::max_threads();
  // Chunk width: the n x cw block of x should stay in cache (~2 MiB) between the two passes, and
  // there should be a few chunks per thread.
  int64_t cw = (MEND_RM_CACHE_BYTES) / (n * static_cast<int64_t>(sizeof(float)));
  cw = std::min<int64_t>(cw, (d + 4 * threads - 1) / (4 * threads));
  cw = ((cw + 15) / 16) * 16;
  cw = std::max<int64_t>(16, std::min<int64_t>(cw, kMaxChunk));
  const int64_t n_chunks = (d + cw - 1) / cw;

  const Args args{mean, m2, count, x, n, ldx};
  const ChunkFn fn = chunk_fn();
  const bool parallel = threads > 1 && n_chunks > 1 && static_cast<double>(n) * static_cast<double>(d) > 3.0e4;
  (void)parallel;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
#endif
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t c0 = c * cw;
    fn(args, c0, std::min(cw, d - c0));
  }
  return MEND_OK;
}

}  // namespace mend_cpu_moments

extern "C" int mend_cpu_running_moments(float* mean, float* m2, int64_t count, const float* x, int64_t n,
                                        int64_t d, int64_t ldx) {
  return mend_cpu_moments::running_moments(mean, m2, count, x, n, d, ldx);
}
