// The element-wise parts of MEND's editor network, CPU kernels. Semantics: mend/kernels.h.
//
// The editor's matmuls are large dense GEMMs (D x r per layer) that the caller runs through a
// vendor BLAS; these kernels fuse everything around them into single passes over (n, D) rows:
//   normalize       z0 = (rows - mean) / (std + eps)                         (1 read, 1 write)
//   layer_forward   z' = res + clamp(pre * s + o, min=0)                     (2 reads, 1 write)
//   layer_backward  gh = g * [pre * s + o >= 0], ga = gh * s, and the column sums of gh, gh * pre
//                   and ga                                                    (2 reads, 1 write)
// where eager PyTorch makes 4-6 passes with as many temporaries for each.
//
// Work split: the element-wise kernels split rows across OpenMP threads; the backward splits
// columns (chunks of kChunk) so that every column sum is accumulated by one thread in row order,
// which keeps it deterministic whatever the number of threads. Each loop is written once
// (MEND_INLINE) and compiled for AVX-512, AVX2 and the baseline target (simd.h).

#include "mend/kernels.h"

#include <algorithm>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

namespace mend_cpu_editor {

constexpr int64_t kChunk = 256;               // columns per backward work item: 3 x 1 KiB of sums
constexpr double kParallelElements = 3.0e4;   // below this a fork/join costs more than it saves

// The clamp's input. Shared by the forward and the backward so the backward's mask is the
// forward's own decision, bit for bit.
static MEND_INLINE float activation_input(float pre, float s, float o) { return pre * s + o; }

struct Normalize {
  float* z;
  const float* rows;
  int64_t ldr;
  const float* mean;
  const float* std_;
  float eps;
  int64_t d;
};

static MEND_INLINE void normalize_row(const Normalize& p, int64_t r) {
  const float* __restrict x = p.rows + r * p.ldr;
  float* __restrict z = p.z + r * p.d;
  const float* __restrict mean = p.mean;
  const float* __restrict std_ = p.std_;
  const float eps = p.eps;
#pragma omp simd
  for (int64_t j = 0; j < p.d; ++j) z[j] = (x[j] - mean[j]) / (std_[j] + eps);  // the reference's rounding
}

struct LayerForward {
  float* out;
  const float* pre;
  const float* res;
  const float* scale;
  const float* shift;
  int64_t d;
};

static MEND_INLINE void layer_forward_row(const LayerForward& p, int64_t r) {
  const float* __restrict pre = p.pre + r * p.d;
  const float* __restrict res = p.res + r * p.d;
  float* __restrict out = p.out + r * p.d;
  const float* __restrict s = p.scale;
  const float* __restrict o = p.shift;
#pragma omp simd
  for (int64_t j = 0; j < p.d; ++j) {
    const float h = activation_input(pre[j], s[j], o[j]);
    out[j] = res[j] + (h < 0.0f ? 0.0f : h);  // NaN propagates, as torch.clamp
  }
}

struct LayerBackward {
  float* ga;
  const float* g;
  const float* pre;
  const float* scale;
  const float* shift;
  float* dbias;
  float* dscale;
  float* dshift;
  int64_t n, d;
};

// Columns [c0, c0 + cw) of every row, cw <= kChunk.
static MEND_INLINE void layer_backward_chunk(const LayerBackward& p, int64_t c0, int64_t cw) {
  alignas(64) float sum_gh[kChunk];
  alignas(64) float sum_gh_pre[kChunk];
  alignas(64) float sum_ga[kChunk];
  std::fill(sum_gh, sum_gh + cw, 0.0f);
  std::fill(sum_gh_pre, sum_gh_pre + cw, 0.0f);
  std::fill(sum_ga, sum_ga + cw, 0.0f);
  const float* __restrict s = p.scale + c0;
  const float* __restrict o = p.shift + c0;
  for (int64_t r = 0; r < p.n; ++r) {
    const float* __restrict g = p.g + r * p.d + c0;
    const float* __restrict pre = p.pre + r * p.d + c0;
    float* __restrict ga = p.ga + r * p.d + c0;
#pragma omp simd
    for (int64_t j = 0; j < cw; ++j) {
      const float gh = activation_input(pre[j], s[j], o[j]) >= 0.0f ? g[j] : 0.0f;  // clamp's gradient
      ga[j] = gh * s[j];
      sum_gh[j] += gh;
      sum_gh_pre[j] += gh * pre[j];
      sum_ga[j] += ga[j];
    }
  }
  std::copy(sum_gh, sum_gh + cw, p.dshift + c0);
  std::copy(sum_gh_pre, sum_gh_pre + cw, p.dscale + c0);
  std::copy(sum_ga, sum_ga + cw, p.dbias + c0);
}

// One instantiation of a loop body per SIMD path, chosen at run time.
#ifdef MEND_X86
#define MEND_SIMD_VARIANTS(name, Args, body)                                             \
  MEND_TARGET_AVX512 static void name##_avx512(const Args& p, int64_t i, int64_t w) { body; } \
  MEND_TARGET_AVX2 static void name##_avx2(const Args& p, int64_t i, int64_t w) { body; }     \
  static void name##_baseline(const Args& p, int64_t i, int64_t w) { body; }                  \
  static void (*name##_variant())(const Args&, int64_t, int64_t) {                            \
    switch (mend_cpu::selected_simd_path()) {                                                 \
      case mend_cpu::kAvx512: return name##_avx512;                                           \
      case mend_cpu::kAvx2: return name##_avx2;                                               \
      default: return name##_baseline;                                                        \
    }                                                                                         \
  }
#else
#define MEND_SIMD_VARIANTS(name, Args, body)                                           \
  static void name##_baseline(const Args& p, int64_t i, int64_t w) { body; }                \
  static void (*name##_variant())(const Args&, int64_t, int64_t) { return name##_baseline; }
#endif

// (i, w): first row and number of rows for the row kernels; first column and width for the backward.
MEND_SIMD_VARIANTS(normalize, Normalize, for (int64_t r = i; r < i + w; ++r) normalize_row(p, r))
MEND_SIMD_VARIANTS(layer_forward, LayerForward, for (int64_t r = i; r < i + w; ++r) layer_forward_row(p, r))
MEND_SIMD_VARIANTS(layer_backward, LayerBackward, layer_backward_chunk(p, i, w))

// Calls fn(args, first, width) over [0, total) in blocks of `block`, in parallel when worth it.
template <typename Args>
static void for_blocks(void (*fn)(const Args&, int64_t, int64_t), const Args& args, int64_t total, int64_t block,
                       double elements) {
  const int64_t n_blocks = (total + block - 1) / block;
  const bool parallel = mend_cpu::max_threads() > 1 && n_blocks > 1 && elements > kParallelElements;
  (void)parallel;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) if (parallel)
#endif
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t first = b * block;
    fn(args, first, std::min(block, total - first));
  }
}

// Rows per block of the row kernels: a few blocks per thread, at least one row.
static int64_t row_block(int64_t n) { return std::max<int64_t>(1, n / (4 * mend_cpu::max_threads())); }

static bool valid_sizes(int64_t n, int64_t d) { return n >= 1 && d >= 1; }

}  // namespace mend_cpu_editor

using namespace mend_cpu_editor;

extern "C" int mend_cpu_editor_normalize(float* z, const float* rows, int64_t ldr, const float* mean,
                                         const float* std_, float eps, int64_t n, int64_t d) {
  if (z == nullptr || rows == nullptr || mean == nullptr || std_ == nullptr) return MEND_ERR_INVALID_ARGUMENT;
  if (!valid_sizes(n, d) || ldr < d) return MEND_ERR_INVALID_ARGUMENT;
  const Normalize args{z, rows, ldr, mean, std_, eps, d};
  for_blocks(normalize_variant(), args, n, row_block(n), static_cast<double>(n) * d);
  return MEND_OK;
}

extern "C" int mend_cpu_editor_layer_forward(float* out, const float* pre, const float* res, const float* scale,
                                             const float* shift, int64_t n, int64_t d) {
  if (out == nullptr || pre == nullptr || res == nullptr || scale == nullptr || shift == nullptr)
    return MEND_ERR_INVALID_ARGUMENT;
  if (!valid_sizes(n, d)) return MEND_ERR_INVALID_ARGUMENT;
  const LayerForward args{out, pre, res, scale, shift, d};
  for_blocks(layer_forward_variant(), args, n, row_block(n), static_cast<double>(n) * d);
  return MEND_OK;
}

extern "C" int mend_cpu_editor_layer_backward(float* ga, const float* g, const float* pre, const float* scale,
                                              const float* shift, float* dbias, float* dscale, float* dshift,
                                              int64_t n, int64_t d) {
  if (ga == nullptr || g == nullptr || pre == nullptr || scale == nullptr || shift == nullptr ||
      dbias == nullptr || dscale == nullptr || dshift == nullptr)
    return MEND_ERR_INVALID_ARGUMENT;
  if (!valid_sizes(n, d)) return MEND_ERR_INVALID_ARGUMENT;
  const LayerBackward args{ga, g, pre, scale, shift, dbias, dscale, dshift, n, d};
  for_blocks(layer_backward_variant(), args, d, kChunk, static_cast<double>(n) * d);
  return MEND_OK;
}
