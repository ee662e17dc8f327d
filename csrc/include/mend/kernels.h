/*
 * mend_kernels: the C ABI of every native kernel.
 *
 * Plain C types only (pointers, int64_t, float): no libtorch, no pybind11, no CUDA headers. The CPU
 * entry points live in csrc/cpu/, the CUDA entry points in csrc/cuda/ (built only where nvcc is
 * present). Pointers are raw addresses of caller-owned memory (host memory for mend_cpu_*, device
 * memory for mend_cuda_*). Every entry point validates its sizes again and returns a status code
 * instead of throwing; the binding layer turns a non-zero status into a Python exception.
 *
 * Shapes and layouts shared by all entry points:
 *   W  (M, N): row-major, row stride ldw elements (ldw >= N), unit column stride; dtype per `dtype`.
 *   A  (K, M): float32, contiguous (row stride M).
 *   B  (K, N): float32, contiguous (row stride N).
 *   x  (n, d): float32, row stride ldx elements (ldx >= d), unit column stride.
 * Outputs must not overlap inputs (W with A/B, mean/m2 with x).
 */
#ifndef MEND_KERNELS_H_
#define MEND_KERNELS_H_

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* dtype of W in the rank update. */
typedef enum mend_dtype {
  MEND_DTYPE_FLOAT32 = 0,
  MEND_DTYPE_BFLOAT16 = 1, /* bits of torch.bfloat16: 1 sign, 8 exponent, 7 mantissa bits */
  MEND_DTYPE_FLOAT16 = 2   /* IEEE binary16 (torch.float16) */
} mend_dtype;

/* Status codes of the CPU entry points (the CUDA entry points return cudaError_t values). */
enum {
  MEND_OK = 0,
  MEND_ERR_INVALID_ARGUMENT = 1, /* a size, stride, dtype or null pointer is out of contract */
  MEND_ERR_OUT_OF_MEMORY = 2     /* a packing buffer (size O((M + N) * K), never O(M * N)) failed */
};

/* ------------------------------------------------------------------------------------------------
 * CPU kernels (csrc/cpu). Parallel with OpenMP when the library was built with it (the number of
 * threads is OpenMP's: OMP_NUM_THREADS / omp_set_num_threads, shared with torch's libgomp).
 * ---------------------------------------------------------------------------------------------- */

/*
 * In-place rank-K update:
 *     W[m, n] = round_to_dtype( float(W[m, n]) + scale * sum_{k < K} A[k, m] * B[k, n] )
 * for 0 <= m < M, 0 <= n < N. The sum is accumulated in float32 (FMA where the CPU has it; blocks of
 * 128 k summed separately and then added, which bounds the error growth for large K), added to W
 * converted to float32, and rounded ONCE to W's dtype: round-to-nearest-even for bfloat16 and
 * float16, bit-identical to torch's scalar float->bfloat16 / float->float16 conversions (overflow
 * gives +-inf, subnormals are kept, NaN becomes the quiet NaN 0x7FC0 for bfloat16 and a sign-
 * preserving 0x7E00 for float16). Elements of a row beyond N (up to ldw) are not touched.
 * No temporary of size M x N: A and B are packed into buffers of O((M + N) * K) floats.
 * Requires M, N, K >= 1, ldw >= N, non-null pointers, dtype in mend_dtype.
 * Returns MEND_OK, MEND_ERR_INVALID_ARGUMENT or MEND_ERR_OUT_OF_MEMORY (W is untouched then).
 */
int mend_cpu_rank_update(void* w, int dtype, int64_t M, int64_t N, int64_t ldw, const float* a,
                         const float* b, int64_t K, float scale);

/* One weight of a batched rank update: the arguments of mend_cpu_rank_update / mend_cuda_rank_update. */
typedef struct mend_rank_update_desc {
  void* w;         /* W (M, N), row stride ldw, dtype per `dtype` (a mend_dtype) */
  int dtype;
  int64_t M, N, ldw;
  const float* a;  /* A (K, M) */
  const float* b;  /* B (K, N) */
  int64_t K;
  float scale;
} mend_rank_update_desc;

/*
 * The rank update of mend_cpu_rank_update applied to `count` weights of any shapes and dtypes in one
 * call: the row blocks of ALL weights are scheduled in one OpenMP parallel region, so small weights
 * do not each pay a fork/join and every thread stays busy until the last tile. Each weight's result
 * is bit-identical to mend_cpu_rank_update on it alone. The weights must not overlap each other
 * (nor any A or B). mend_cpu_rank_update is this entry point with count = 1.
 * Requires count >= 1, a non-null `descs`, and every descriptor valid as for mend_cpu_rank_update.
 * Returns MEND_OK, MEND_ERR_INVALID_ARGUMENT or MEND_ERR_OUT_OF_MEMORY (no weight is touched then:
 * every descriptor is checked and every buffer allocated before the first write).
 */
int mend_cpu_rank_update_batched(const mend_rank_update_desc* descs, int64_t count);

/*
 * In-place merge of a batch into running per-column statistics (Chan et al.'s parallel formula):
 *     mean_b[j] = (1/n) sum_r x[r, j],  m2_b[j] = sum_r (x[r, j] - mean_b[j])^2   (two passes,
 *                                                     accumulated in float64)
 *     if count == 0:  mean[j] = mean_b[j];  m2[j] = m2_b[j]          (old values are ignored)
 *     else:           delta = mean_b[j] - mean[j];  total = count + n;
 *                     mean[j] += delta * n / total;
 *                     m2[j]   += m2_b[j] + delta^2 * count * n / total
 * computed in float64 and rounded once to float32 per output. `count` is the number of rows
 * already merged; the caller adds n to its counter afterwards.
 * Requires n, d >= 1, ldx >= d, count >= 0, non-null pointers.
 * Returns MEND_OK or MEND_ERR_INVALID_ARGUMENT (mean/m2 untouched then).
 */
int mend_cpu_running_moments(float* mean, float* m2, int64_t count, const float* x, int64_t n,
                             int64_t d, int64_t ldx);

/*
 * SIMD code path the CPU kernels take on this machine, chosen at run time from the CPU's features:
 * "avx512" (AVX-512F/BW/VL/DQ + FMA), "avx2" (AVX2 + FMA) or "baseline" (the compiler's default
 * target, e.g. SSE2 on x86-64; the only path on other architectures). The environment variable
 * MEND_KERNELS_CPU_ISA=avx512|avx2|baseline (read at every call) can lower it, never raise it.
 * Returns a static string.
 */
const char* mend_cpu_simd_path(void);

/* Build facts of the CPU library, all static strings / plain values. */
typedef struct mend_cpu_build_facts {
  const char* compiler;          /* e.g. "GNU 12.2.0" */
  const char* build_type;        /* CMake build type, e.g. "Release" */
  const char* cxx_flags;         /* flags the kernels were compiled with */
  const char* simd_variants;     /* comma-separated paths compiled in, e.g. "avx512,avx2,baseline" */
  int openmp;                    /* 1 if built with OpenMP */
  int openmp_version;            /* _OPENMP date, 0 without OpenMP */
  int max_threads;               /* omp_get_max_threads() now, 1 without OpenMP */
} mend_cpu_build_facts;

/* Fills *out with the facts above. */
void mend_cpu_get_build_facts(mend_cpu_build_facts* out);

/*
 * The element-wise passes of the editor network (mend_kernels.ops.editor_mlp), around the two
 * GEMMs per layer that the caller runs through a vendor BLAS. All float32; every (n, d) array
 * except `rows` is contiguous (row stride d); outputs must not overlap inputs.
 *
 * mend_cpu_editor_normalize:      z[r, j] = (rows[r, j] - mean[j]) / (std[j] + eps)   (rows: stride ldr >= d)
 * mend_cpu_editor_layer_forward:  out[r, j] = res[r, j] + max(pre[r, j] * scale[j] + shift[j], 0)
 *                                 (NaN propagates, as torch.clamp(min=0))
 * mend_cpu_editor_layer_backward: gh = g[r, j] if pre[r, j] * scale[j] + shift[j] >= 0 else 0
 *                                 (clamp's gradient: 1 at exactly 0, as the reference code's);
 *                                 ga[r, j] = gh * scale[j];  dshift[j] = sum_r gh;
 *                                 dscale[j] = sum_r gh * pre[r, j];  dbias[j] = sum_r ga[r, j]
 *                                 (float32 sums in row order: deterministic for any thread count)
 * `pre * scale + shift` is computed by the same code in the forward and the backward, so the
 * backward's mask is the forward's decision. Require n, d >= 1 and non-null pointers.
 * Return MEND_OK or MEND_ERR_INVALID_ARGUMENT (nothing written then).
 */
int mend_cpu_editor_normalize(float* z, const float* rows, int64_t ldr, const float* mean, const float* std_,
                              float eps, int64_t n, int64_t d);
int mend_cpu_editor_layer_forward(float* out, const float* pre, const float* res, const float* scale,
                                  const float* shift, int64_t n, int64_t d);
int mend_cpu_editor_layer_backward(float* ga, const float* g, const float* pre, const float* scale,
                                   const float* shift, float* dbias, float* dscale, float* dshift, int64_t n,
                                   int64_t d);

/* ------------------------------------------------------------------------------------------------
 * CUDA kernels (csrc/cuda). Asynchronous: enqueued on `stream` (a cudaStream_t passed as an
 * integer; 0 is the legacy default stream) on the current device, no host synchronisation. All
 * pointers are device pointers. Return a cudaError_t value: 0 (cudaSuccess) or the launch error
 * (cudaErrorInvalidValue for out-of-contract arguments). Errors raised by the kernel while it runs
 * surface at the caller's next synchronisation, as usual in CUDA.
 * ---------------------------------------------------------------------------------------------- */

/*
 * Same semantics as mend_cpu_rank_update (fp32 accumulation, one round-to-nearest-even to W's dtype
 * via cuda_bf16.h / cuda_fp16.h), computed by a tiled kernel: 64 x 64 output tile per block, A and B
 * tiles staged in shared memory over chunks of K, W read and written once.
 */
int mend_cuda_rank_update(void* w, int dtype, int64_t M, int64_t N, int64_t ldw, const float* a,
                          const float* b, int64_t K, float scale, uintptr_t stream);

/*
 * mend_cuda_rank_update on `count` weights of any shapes and dtypes in ONE kernel launch: a flat grid
 * over all weights' 64 x 64 tiles, each block looking up its weight. `descs` is a HOST array (its
 * pointers are device pointers); it is passed by value in the kernel parameters, so it may be freed
 * when this returns. Lists longer than MEND_CUDA_RANK_UPDATE_MAX_BATCH descriptors are split into
 * consecutive launches of that many. The weights must not overlap each other.
 * Requires count >= 1, a non-null `descs` and every descriptor valid as for mend_cuda_rank_update;
 * otherwise returns cudaErrorInvalidValue before any launch.
 */
#define MEND_CUDA_RANK_UPDATE_MAX_BATCH 32
int mend_cuda_rank_update_batched(const mend_rank_update_desc* descs, int64_t count, uintptr_t stream);

/*
 * Same semantics as mend_cpu_running_moments, except: `count` is a device pointer to the int64
 * number of rows already merged (read on the device, so no host sync; a value <= 0 counts as 0),
 * and the batch statistics are accumulated in float32 (two passes) while the merge is done in
 * float64. The kernel does not modify *count.
 */
int mend_cuda_running_moments(float* mean, float* m2, const int64_t* count, const float* x,
                              int64_t n, int64_t d, int64_t ldx, uintptr_t stream);

/*
 * Same semantics as the mend_cpu_editor_* kernels (including the deterministic column sums: one
 * thread block owns a strip of columns and reduces over rows in a fixed order).
 */
int mend_cuda_editor_normalize(float* z, const float* rows, int64_t ldr, const float* mean, const float* std_,
                               float eps, int64_t n, int64_t d, uintptr_t stream);
int mend_cuda_editor_layer_forward(float* out, const float* pre, const float* res, const float* scale,
                                   const float* shift, int64_t n, int64_t d, uintptr_t stream);
int mend_cuda_editor_layer_backward(float* ga, const float* g, const float* pre, const float* scale,
                                    const float* shift, float* dbias, float* dscale, float* dshift, int64_t n,
                                    int64_t d, uintptr_t stream);

/* cudaGetErrorString(status) for a status returned above. Returns a static string. */
const char* mend_cuda_error_string(int status);

/* nvcc version the CUDA library was compiled with, e.g. "13.0.88" (static string). */
const char* mend_cuda_nvcc_version(void);

/* Compute capabilities the CUDA library was compiled for (e.g. 80 and 90 for sm_80 / sm_90):
 * writes up to `capacity` of them to out[] and returns how many there are in total. */
int mend_cuda_architectures(int* out, int capacity);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* MEND_KERNELS_H_ */
