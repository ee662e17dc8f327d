// In-place rank-K update of a row-major weight, CUDA kernel. Semantics: mend/kernels.h.
//
//   W[m, n] = round(float(W[m, n]) + scale * sum_k A[k, m] * B[k, n])
//
// One thread block per 64 x 64 tile of W (1-D grid, no 65535 limit on M), 256 threads, each owning a
// 4 x 4 register tile of float32 accumulators. K is walked in chunks of 16: the (16 x 64) slices of
// A (K, M) and B (K, N) are loaded with coalesced reads (consecutive threads -> consecutive m / n)
// into shared memory, double-buffered so that the global loads of chunk c + 1 (held in registers)
// overlap the FMAs of chunk c. Then every element of W is read once, scale * acc is added in float32
// and the sum rounded once (round to nearest even via cuda_bf16.h / cuda_fp16.h) and written back.
// All global accesses are bounds-checked; int64 index arithmetic throughout.
//
// One launch serves a batch of weights of any shapes and dtypes: the grid is flat over all their
// tiles and each block looks up its weight in the descriptors passed as kernel parameters (only the
// epilogue depends on the dtype). A single weight is a batch of one.
//
// This file also holds the small C-ABI helpers of the CUDA module (error strings, build facts).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "mend/kernels.h"

namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;   // 16 x 16 threads
constexpr int kPerThreadM = 4;  // kTileM / 16
constexpr int kPerThreadN = 4;  // kTileN / 16
constexpr int kLoadsPerThread = kTileK * kTileM / kThreads;  // 4 elements of A and of B per chunk

static_assert(kTileM == kTileN, "the shared loads below assume square tiles");
static_assert(kLoadsPerThread * kThreads == kTileK * kTileM, "tile / thread count mismatch");

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  __device__ __forceinline__ static float to_float(float x) { return x; }
  __device__ __forceinline__ static float from_float(float x) { return x; }
};
template <>
struct Convert<__nv_bfloat16> {
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Convert<__half> {
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
};

// Global -> registers: this thread's 4 elements of the A and B chunk starting at k0.
__device__ __forceinline__ void load_chunk(const float* __restrict__ a, const float* __restrict__ b,
                                           int64_t M, int64_t N, int64_t K, int64_t m0, int64_t n0,
                                           int64_t k0, float (&ra)[kLoadsPerThread],
                                           float (&rb)[kLoadsPerThread]) {
#pragma unroll
  for (int l = 0; l < kLoadsPerThread; ++l) {
    const int idx = static_cast<int>(threadIdx.x) + l * kThreads;
    const int kk = idx / kTileM;
    const int cc = idx % kTileM;
    const int64_t k = k0 + kk;
    const int64_t m = m0 + cc;
    const int64_t n = n0 + cc;
    ra[l] = (k < K && m < M) ? __ldg(a + k * M + m) : 0.0f;
    rb[l] = (k < K && n < N) ? __ldg(b + k * N + n) : 0.0f;
  }
}

__device__ __forceinline__ void store_chunk(float (*as)[kTileM], float (*bs)[kTileN],
                                            const float (&ra)[kLoadsPerThread],
                                            const float (&rb)[kLoadsPerThread]) {
#pragma unroll
  for (int l = 0; l < kLoadsPerThread; ++l) {
    const int idx = static_cast<int>(threadIdx.x) + l * kThreads;
    as[idx / kTileM][idx % kTileM] = ra[l];
    bs[idx / kTileN][idx % kTileN] = rb[l];
  }
}

// acc = A[:, m0 : m0 + 64]^T B[:, n0 : n0 + 64] for this thread's 4 x 4 outputs of the tile at (m0, n0).
__device__ __forceinline__ void accumulate_tile(const float* __restrict__ a, const float* __restrict__ b, int64_t M,
                                                int64_t N, int64_t K, int64_t m0, int64_t n0,
                                                float (&acc)[kPerThreadM][kPerThreadN]) {
  __shared__ __align__(16) float as[2][kTileK][kTileM];
  __shared__ __align__(16) float bs[2][kTileK][kTileN];
  const int tx = static_cast<int>(threadIdx.x) % 16;  // column group
  const int ty = static_cast<int>(threadIdx.x) / 16;  // row group

#pragma unroll
  for (int i = 0; i < kPerThreadM; ++i)
#pragma unroll
    for (int j = 0; j < kPerThreadN; ++j) acc[i][j] = 0.0f;

  float ra[kLoadsPerThread], rb[kLoadsPerThread];
  load_chunk(a, b, M, N, K, m0, n0, 0, ra, rb);
  store_chunk(as[0], bs[0], ra, rb);
  __syncthreads();

  int buf = 0;
  for (int64_t k0 = 0; k0 < K; k0 += kTileK) {
    const bool has_next = k0 + kTileK < K;
    if (has_next) load_chunk(a, b, M, N, K, m0, n0, k0 + kTileK, ra, rb);
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      const float4 av = *reinterpret_cast<const float4*>(&as[buf][kk][ty * kPerThreadM]);
      const float4 bv = *reinterpret_cast<const float4*>(&bs[buf][kk][tx * kPerThreadN]);
      const float ar[kPerThreadM] = {av.x, av.y, av.z, av.w};
      const float br[kPerThreadN] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
      for (int i = 0; i < kPerThreadM; ++i)
#pragma unroll
        for (int j = 0; j < kPerThreadN; ++j) acc[i][j] = fmaf(ar[i], br[j], acc[i][j]);
    }
    if (has_next) {
      // The other buffer was last read in the previous iteration, which ended with a barrier.
      store_chunk(as[buf ^ 1], bs[buf ^ 1], ra, rb);
      __syncthreads();
      buf ^= 1;
    }
  }
}

// Epilogue: read-modify-write of this thread's 4 x 4 outputs (each element exactly once).
template <typename T>
__device__ __forceinline__ void update_tile(T* __restrict__ w, int64_t M, int64_t N, int64_t ldw, int64_t m0,
                                            int64_t n0, float scale,
                                            const float (&acc)[kPerThreadM][kPerThreadN]) {
  const int tx = static_cast<int>(threadIdx.x) % 16;
  const int ty = static_cast<int>(threadIdx.x) / 16;
#pragma unroll
  for (int i = 0; i < kPerThreadM; ++i) {
    const int64_t m = m0 + ty * kPerThreadM + i;
    if (m >= M) continue;
    T* row = w + m * ldw;
#pragma unroll
    for (int j = 0; j < kPerThreadN; ++j) {
      const int64_t n = n0 + tx * kPerThreadN + j;
      if (n < N) {
        const float x = Convert<T>::to_float(row[n]) + scale * acc[i][j];
        row[n] = Convert<T>::from_float(x);
      }
    }
  }
}

// The weights of one launch, passed by value in the kernel parameters (no device copy, no host
// sync). Weight i owns the blocks [tile_start[i], tile_start[i + 1]) of the flat grid. A single
// weight uses kCapacity = 1 so that its launch carries no unused descriptors.
template <int kCapacity>
struct Batch {
  mend_rank_update_desc weights[kCapacity];
  int64_t tile_start[kCapacity + 1];
  int64_t tiles_n[kCapacity];
  int count;
};
static_assert(sizeof(Batch<MEND_CUDA_RANK_UPDATE_MAX_BATCH>) <= 4096, "kernel parameters are limited to 4 KiB");

// The weight that flat block `tile` belongs to (a uniform scan of at most kCapacity entries).
template <int kCapacity>
__device__ __forceinline__ int owner(const Batch<kCapacity>& batch, int64_t tile) {
  int i = 0;
  while (i + 1 < batch.count && tile >= batch.tile_start[i + 1]) ++i;
  return i;
}

// One thread block per 64 x 64 tile of one of the batch's weights. The dtype switch is uniform per
// block: only the epilogue depends on it.
template <int kCapacity>
__global__ void __launch_bounds__(kThreads) rank_update_kernel(const __grid_constant__ Batch<kCapacity> batch) {
  const int64_t block = static_cast<int64_t>(blockIdx.x);
  const int i = owner(batch, block);
  const mend_rank_update_desc& d = batch.weights[i];
  const int64_t tile = block - batch.tile_start[i];
  const int64_t m0 = (tile / batch.tiles_n[i]) * kTileM;
  const int64_t n0 = (tile % batch.tiles_n[i]) * kTileN;

  float acc[kPerThreadM][kPerThreadN];
  accumulate_tile(d.a, d.b, d.M, d.N, d.K, m0, n0, acc);
  switch (d.dtype) {
    case MEND_DTYPE_FLOAT32: update_tile(static_cast<float*>(d.w), d.M, d.N, d.ldw, m0, n0, d.scale, acc); break;
    case MEND_DTYPE_BFLOAT16:
      update_tile(static_cast<__nv_bfloat16*>(d.w), d.M, d.N, d.ldw, m0, n0, d.scale, acc);
      break;
    default: update_tile(static_cast<__half*>(d.w), d.M, d.N, d.ldw, m0, n0, d.scale, acc); break;
  }
}

bool valid(const mend_rank_update_desc& d) {
  if (d.w == nullptr || d.a == nullptr || d.b == nullptr) return false;
  if (d.M < 1 || d.N < 1 || d.K < 1 || d.ldw < d.N) return false;
  return d.dtype == MEND_DTYPE_FLOAT32 || d.dtype == MEND_DTYPE_BFLOAT16 || d.dtype == MEND_DTYPE_FLOAT16;
}

// One launch over the tiles of descs[0 .. count), count <= kCapacity.
template <int kCapacity>
cudaError_t launch(const mend_rank_update_desc* descs, int count, cudaStream_t stream) {
  Batch<kCapacity> batch{};
  batch.count = count;
  for (int i = 0; i < count; ++i) {
    const mend_rank_update_desc& d = descs[i];
    batch.weights[i] = d;
    batch.tiles_n[i] = (d.N + kTileN - 1) / kTileN;
    batch.tile_start[i + 1] = batch.tile_start[i] + ((d.M + kTileM - 1) / kTileM) * batch.tiles_n[i];
  }
  const int64_t tiles = batch.tile_start[count];
  if (tiles > 0x7FFFFFFFLL) return cudaErrorInvalidConfiguration;
  rank_update_kernel<kCapacity><<<static_cast<unsigned int>(tiles), kThreads, 0, stream>>>(batch);
  return cudaGetLastError();
}

}  // namespace

extern "C" int mend_cuda_rank_update(void* w, int dtype, int64_t M, int64_t N, int64_t ldw, const float* a,
                                     const float* b, int64_t K, float scale, uintptr_t stream) {
  const mend_rank_update_desc one{w, dtype, M, N, ldw, a, b, K, scale};
  if (!valid(one)) return static_cast<int>(cudaErrorInvalidValue);
  return static_cast<int>(launch<1>(&one, 1, reinterpret_cast<cudaStream_t>(stream)));
}

extern "C" int mend_cuda_rank_update_batched(const mend_rank_update_desc* descs, int64_t count, uintptr_t stream) {
  if (descs == nullptr || count < 1) return static_cast<int>(cudaErrorInvalidValue);
  for (int64_t i = 0; i < count; ++i)
    if (!valid(descs[i])) return static_cast<int>(cudaErrorInvalidValue);
  const cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  for (int64_t first = 0; first < count; first += MEND_CUDA_RANK_UPDATE_MAX_BATCH) {
    const int n = static_cast<int>(std::min<int64_t>(MEND_CUDA_RANK_UPDATE_MAX_BATCH, count - first));
    const cudaError_t err = launch<MEND_CUDA_RANK_UPDATE_MAX_BATCH>(descs + first, n, s);
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  return 0;
}

// ------------------------------------------------------------------------------------------------
// Helpers of the CUDA module.
// ------------------------------------------------------------------------------------------------

extern "C" const char* mend_cuda_error_string(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

#define MEND_STR_(x) #x
#define MEND_STR(x) MEND_STR_(x)

extern "C" const char* mend_cuda_nvcc_version(void) {
  return MEND_STR(__CUDACC_VER_MAJOR__) "." MEND_STR(__CUDACC_VER_MINOR__) "." MEND_STR(__CUDACC_VER_BUILD__);
}

extern "C" int mend_cuda_architectures(int* out, int capacity) {
#ifdef __CUDA_ARCH_LIST__
  // nvcc >= 11.5 defines __CUDA_ARCH_LIST__ (e.g. 800,900) in host code too.
  static const int archs[] = {__CUDA_ARCH_LIST__};
  const int count = static_cast<int>(sizeof(archs) / sizeof(archs[0]));
  for (int i = 0; i < count && i < capacity && out != nullptr; ++i) out[i] = archs[i] / 10;
  return count;
#else
  (void)out;
  (void)capacity;
  return 0;
#endif
}
