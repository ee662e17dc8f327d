// Running per-column mean / M2 merge (Chan et al.), CUDA kernel. Semantics: mend/kernels.h.
//
// One thread block per 32 columns, 32 x 16 threads: threadIdx.x picks the column (a warp reads 32
// consecutive floats of a row: coalesced), threadIdx.y strides over the rows. Pass 1 accumulates
// per-thread float32 sums, reduced over threadIdx.y in shared memory to the batch mean; pass 2 does
// the same for the squared deviations from that mean (two-pass, float32). Thread row 0 then merges
// with the running statistics in float64, reading the number of rows already merged from device
// memory (no host synchronisation). Bounds-checked, int64 indexing.

#include <cuda_runtime.h>

#include <cstdint>

#include "column_sum.cuh"
#include "mend/kernels.h"

namespace {

using mend_cuda::column_sum;
constexpr int kCols = mend_cuda::kColumnSumCols;
constexpr int kRows = mend_cuda::kColumnSumRows;

__global__ void __launch_bounds__(kCols* kRows)
    running_moments_kernel(float* __restrict__ mean, float* __restrict__ m2, const int64_t* __restrict__ count,
                           const float* __restrict__ x, int64_t n, int64_t d, int64_t ldx) {
  __shared__ mend_cuda::ColumnSumScratch red;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kCols + threadIdx.x;
  const bool valid = col < d;

  float s = 0.0f;
  if (valid)
    for (int64_t r = threadIdx.y; r < n; r += kRows) s += __ldg(x + r * ldx + col);
  const float batch_mean = column_sum(red, s) / static_cast<float>(n);

  float q = 0.0f;
  if (valid)
    for (int64_t r = threadIdx.y; r < n; r += kRows) {
      const float dev = __ldg(x + r * ldx + col) - batch_mean;
      q = fmaf(dev, dev, q);
    }
  const float batch_m2 = column_sum(red, q);

  if (threadIdx.y != 0 || !valid) return;
  const int64_t c = *count;
  if (c <= 0) {
    mean[col] = batch_mean;
    m2[col] = batch_m2;
    return;
  }
  const double dc = static_cast<double>(c);
  const double dn = static_cast<double>(n);
  const double total = dc + dn;
  const double old_mean = static_cast<double>(mean[col]);
  const double delta = static_cast<double>(batch_mean) - old_mean;
  mean[col] = static_cast<float>(old_mean + delta * (dn / total));
  m2[col] = static_cast<float>(static_cast<double>(m2[col]) + static_cast<double>(batch_m2) +
                               delta * delta * (dc * dn / total));
}

}  // namespace

extern "C" int mend_cuda_running_moments(float* mean, float* m2, const int64_t* count, const float* x, int64_t n,
                                         int64_t d, int64_t ldx, uintptr_t stream) {
  if (mean == nullptr || m2 == nullptr || count == nullptr || x == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  if (n < 1 || d < 1 || ldx < d) return static_cast<int>(cudaErrorInvalidValue);
  const int64_t blocks = (d + kCols - 1) / kCols;
  if (blocks > 0x7FFFFFFFLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  running_moments_kernel<<<static_cast<unsigned int>(blocks), dim3(kCols, kRows), 0,
                           reinterpret_cast<cudaStream_t>(stream)>>>(mean, m2, count, x, n, d, ldx);
  return static_cast<int>(cudaGetLastError());
}
