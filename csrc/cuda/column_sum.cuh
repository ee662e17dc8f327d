// Internal header of the CUDA kernels (csrc/cuda): the per-column reduction over the rows of a
// (kColumnSumCols x kColumnSumRows) thread block, shared by the kernels that sum columns.
#ifndef MEND_CUDA_COLUMN_SUM_CUH_
#define MEND_CUDA_COLUMN_SUM_CUH_

namespace mend_cuda {

// threadIdx.x picks the column (a warp reads 32 consecutive floats of a row: coalesced),
// threadIdx.y strides over the rows.
constexpr int kColumnSumCols = 32;
constexpr int kColumnSumRows = 16;

using ColumnSumScratch = float[kColumnSumRows][kColumnSumCols + 1];  // +1: no bank conflicts

// Sum of v over threadIdx.y for each threadIdx.x, as a fixed tree (deterministic); the result is
// valid in every thread. Every thread of the block must call it.
__device__ __forceinline__ float column_sum(ColumnSumScratch& red, float v) {
  const int tx = static_cast<int>(threadIdx.x);
  const int ty = static_cast<int>(threadIdx.y);
  red[ty][tx] = v;
  __syncthreads();
#pragma unroll
  for (int offset = kColumnSumRows / 2; offset > 0; offset >>= 1) {
    if (ty < offset) red[ty][tx] += red[ty + offset][tx];
    __syncthreads();
  }
  const float total = red[0][tx];
  __syncthreads();  // red may be reused right after
  return total;
}

}  // namespace mend_cuda

#endif  // MEND_CUDA_COLUMN_SUM_CUH_
