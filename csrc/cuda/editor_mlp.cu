// The element-wise parts of MEND's editor network, CUDA kernels. Semantics: mend/kernels.h
// (mend_cpu_editor_*). The caller runs the editor's GEMMs through cuBLAS; these kernels fuse the
// passes around them.
//
// normalize / layer_forward: element-wise, one thread per element in a grid-stride loop (int64
// indices; consecutive threads touch consecutive floats: coalesced). layer_backward: one thread
// block per 32 columns, 32 x 16 threads; each thread writes ga for its rows and keeps three partial
// column sums that column_sum() reduces over threadIdx.y in a fixed tree (deterministic).

#include <cuda_runtime.h>

#include <cstdint>

#include "column_sum.cuh"
#include "mend/kernels.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65535;  // grid-stride loops cover the rest
constexpr int kCols = mend_cuda::kColumnSumCols;
constexpr int kRows = mend_cuda::kColumnSumRows;

// The clamp's input, shared by forward and backward so that the backward's mask is the forward's.
__device__ __forceinline__ float activation_input(float pre, float s, float o) { return fmaf(pre, s, o); }

__device__ __forceinline__ int64_t grid_stride_start() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ int64_t grid_stride() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }

__global__ void __launch_bounds__(kThreads)
    normalize_kernel(float* __restrict__ z, const float* __restrict__ rows, int64_t ldr,
                     const float* __restrict__ mean, const float* __restrict__ std_, float eps, int64_t n, int64_t d) {
  for (int64_t i = grid_stride_start(); i < n * d; i += grid_stride()) {
    const int64_t r = i / d, j = i % d;
    z[i] = __fdiv_rn(__ldg(rows + r * ldr + j) - __ldg(mean + j), __ldg(std_ + j) + eps);
  }
}

__global__ void __launch_bounds__(kThreads)
    layer_forward_kernel(float* __restrict__ out, const float* __restrict__ pre, const float* __restrict__ res,
                         const float* __restrict__ scale, const float* __restrict__ shift, int64_t n, int64_t d) {
  for (int64_t i = grid_stride_start(); i < n * d; i += grid_stride()) {
    const int64_t j = i % d;
    const float h = activation_input(__ldg(pre + i), __ldg(scale + j), __ldg(shift + j));
    out[i] = __ldg(res + i) + (h < 0.0f ? 0.0f : h);  // NaN propagates, as torch.clamp
  }
}

__global__ void __launch_bounds__(kCols* kRows)
    layer_backward_kernel(float* __restrict__ ga, const float* __restrict__ g, const float* __restrict__ pre,
                          const float* __restrict__ scale, const float* __restrict__ shift, float* __restrict__ dbias,
                          float* __restrict__ dscale, float* __restrict__ dshift, int64_t n, int64_t d) {
  __shared__ mend_cuda::ColumnSumScratch red;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const bool valid = col < d;
  float sum_gh = 0.0f, sum_gh_pre = 0.0f, sum_ga = 0.0f;
  if (valid) {
    const float s = __ldg(scale + col), o = __ldg(shift + col);
    for (int64_t r = threadIdx.y; r < n; r += kRows) {
      const int64_t i = r * d + col;
      const float p = __ldg(pre + i);
      const float gh = activation_input(p, s, o) >= 0.0f ? __ldg(g + i) : 0.0f;  // clamp's gradient
      const float a = gh * s;
      ga[i] = a;
      sum_gh += gh;
      sum_gh_pre = fmaf(gh, p, sum_gh_pre);
      sum_ga += a;
    }
  }
  sum_gh = mend_cuda::column_sum(red, sum_gh);
  sum_gh_pre = mend_cuda::column_sum(red, sum_gh_pre);
  sum_ga = mend_cuda::column_sum(red, sum_ga);
  if (threadIdx.y != 0 || !valid) return;
  dshift[col] = sum_gh;
  dscale[col] = sum_gh_pre;
  dbias[col] = sum_ga;
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

unsigned int elementwise_blocks(int64_t n, int64_t d) {
  const int64_t blocks = (n * d + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

bool valid_sizes(int64_t n, int64_t d) { return n >= 1 && d >= 1 && n <= INT64_MAX / d; }

int launched() { return static_cast<int>(cudaGetLastError()); }

}  // namespace

extern "C" int mend_cuda_editor_normalize(float* z, const float* rows, int64_t ldr, const float* mean,
                                          const float* std_, float eps, int64_t n, int64_t d, uintptr_t stream) {
  if (z == nullptr || rows == nullptr || mean == nullptr || std_ == nullptr || !valid_sizes(n, d) || ldr < d)
    return static_cast<int>(cudaErrorInvalidValue);
  normalize_kernel<<<elementwise_blocks(n, d), kThreads, 0, as_stream(stream)>>>(z, rows, ldr, mean, std_, eps, n, d);
  return launched();
}

extern "C" int mend_cuda_editor_layer_forward(float* out, const float* pre, const float* res, const float* scale,
                                              const float* shift, int64_t n, int64_t d, uintptr_t stream) {
  if (out == nullptr || pre == nullptr || res == nullptr || scale == nullptr || shift == nullptr ||
      !valid_sizes(n, d))
    return static_cast<int>(cudaErrorInvalidValue);
  layer_forward_kernel<<<elementwise_blocks(n, d), kThreads, 0, as_stream(stream)>>>(out, pre, res, scale, shift, n,
                                                                                    d);
  return launched();
}

extern "C" int mend_cuda_editor_layer_backward(float* ga, const float* g, const float* pre, const float* scale,
                                               const float* shift, float* dbias, float* dscale, float* dshift,
                                               int64_t n, int64_t d, uintptr_t stream) {
  if (ga == nullptr || g == nullptr || pre == nullptr || scale == nullptr || shift == nullptr || dbias == nullptr ||
      dscale == nullptr || dshift == nullptr || !valid_sizes(n, d))
    return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (d + kCols - 1) / kCols;
  if (blocks > 0x7FFFFFFFLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  layer_backward_kernel<<<static_cast<unsigned int>(blocks), dim3(kCols, kRows), 0, as_stream(stream)>>>(
      ga, g, pre, scale, shift, dbias, dscale, dshift, n, d);
  return launched();
}
