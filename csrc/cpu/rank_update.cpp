// In-place rank-K update of a row-major weight, CPU kernel.
//
//   W[m, n] = round(float(W[m, n]) + scale * sum_k A[k, m] * B[k, n])      (see mend/kernels.h)
//
// Shape of the computation (GotoBLAS-like, but with the whole K in one pass so W is read and written
// exactly once and never copied):
//   1. B (K, N) is packed once into column slivers Bp[j][k][0..NR) (zero padded to NR columns).
//   2. Row blocks of MC rows are distributed over OpenMP threads. A thread packs A's columns of its
//      block into row slivers Ap[i][k][0..MR) (zero padded), then for each group of B slivers that
//      fits in L2 and each A sliver (L1) runs the register-blocked micro-kernel: an MR x NR float32
//      accumulator tile in registers, K loop innermost (one broadcast of A and NR/VL vector loads of
//      B per k), followed by the epilogue that loads the MR x NR tile of W, adds scale * acc in
//      float32 and rounds once to W's dtype.
//      A batch of weights (mend_cpu_rank_update_batched) numbers the B slivers and row blocks of all
//      its weights in one sequence, so one parallel region covers the batch; a single weight is a
//      batch of one.
//   3. The micro-kernel is written once with GCC/Clang vector extensions and compiled for three
//      instruction sets in this translation unit (function multiversioning by target attributes):
//      AVX-512 (8 x 48 tile), AVX2+FMA (6 x 16 tile) and the compiler's baseline (4 x 12 tile). The
//      path is picked at run time from the CPU's features (simd.h). No -march=native.
//
// The float -> bfloat16 / float16 conversions are written here with integer/float lane operations,
// bit-identical to c10's scalar conversions (round to nearest even, +-inf on overflow, subnormals
// kept, NaN -> 0x7FC0 for bfloat16 and sign | 0x7E00 for float16). They need IEEE default rounding;
// they do not depend on FTZ/DAZ except that subnormal *inputs* are then read as zero, as in torch.

#include "mend/kernels.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

// Vectors are only passed between always-inlined functions; their by-value ABI is irrelevant.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace mend_cpu {

// ------------------------------------------------------------------------------------------------
// Vector helpers (generic; compiled for whichever target the calling function has).
// ------------------------------------------------------------------------------------------------

template <int VL>
struct Vec {
  typedef float f __attribute__((vector_size(VL * 4)));
  typedef uint32_t u __attribute__((vector_size(VL * 4)));
  typedef int32_t i __attribute__((vector_size(VL * 4)));
  typedef uint16_t h __attribute__((vector_size(VL * 2)));
};

template <class T>
static MEND_INLINE T load_as(const void* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <class T>
static MEND_INLINE void store_as(void* p, const T& v) {
  std::memcpy(p, &v, sizeof(T));
}

template <class To, class From>
static MEND_INLINE To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From), "bit cast of different sizes");
  To r;
  std::memcpy(&r, &v, sizeof(To));
  return r;
}

// --- scalar conversions (the reference definitions; the vector ones below are lane-wise copies) ---

static MEND_INLINE float bf16_to_f32(uint16_t h) { return bits<float>(static_cast<uint32_t>(h) << 16); }

static MEND_INLINE uint16_t f32_to_bf16(float f) {
  const uint32_t u = bits<uint32_t>(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;  // NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static MEND_INLINE float f16_to_f32(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t r = two_w < (1u << 27) ? bits<uint32_t>(denormalized) : bits<uint32_t>(normalized);
  return bits<float>(sign | r);
}

static MEND_INLINE uint16_t f32_to_f16(float f) {
  const uint32_t w = bits<uint32_t>(f);
  const float absf = bits<float>(w & 0x7FFFFFFFu);
  float base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits<float>((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits<uint32_t>(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

// --- vector conversions ---

template <int VL>
static MEND_INLINE typename Vec<VL>::f vload_bf16(const uint16_t* p) {
  typedef Vec<VL> V;
  const typename V::h h = load_as<typename V::h>(p);
  return bits<typename V::f>(__builtin_convertvector(h, typename V::u) << 16);
}

template <int VL>
static MEND_INLINE void vstore_bf16(uint16_t* p, const typename Vec<VL>::f& x) {
  typedef Vec<VL> V;
  typedef typename V::u U;
  const U u = bits<U>(x);
  U r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const U nan = (U)((u & 0x7FFFFFFFu) > 0x7F800000u);  // all ones where NaN
  r = (r & ~nan) | (nan & 0x7FC0u);
  store_as(p, __builtin_convertvector(r, typename V::h));
}

template <int VL>
static MEND_INLINE typename Vec<VL>::f vload_f16(const uint16_t* p) {
  typedef Vec<VL> V;
  typedef typename V::u U;
  typedef typename V::f F;
  const U w = __builtin_convertvector(load_as<typename V::h>(p), U) << 16;
  const U sign = w & 0x80000000u;
  const U two_w = w + w;
  const F normalized = bits<F>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const F denormalized = bits<F>((two_w >> 17) | (126u << 23)) - 0.5f;
  const U is_den = (U)(two_w < (1u << 27));
  const U r = (bits<U>(denormalized) & is_den) | (bits<U>(normalized) & ~is_den);
  return bits<F>(sign | r);
}

template <int VL>
static MEND_INLINE void vstore_f16(uint16_t* p, const typename Vec<VL>::f& x) {
  typedef Vec<VL> V;
  typedef typename V::u U;
  typedef typename V::f F;
  const U w = bits<U>(x);
  const F absf = bits<F>(w & 0x7FFFFFFFu);
  F base = (absf * 0x1.0p+112f) * 0x1.0p-110f;
  const U shl1_w = w + w;
  const U sign = w & 0x80000000u;
  U bias = shl1_w & 0xFF000000u;
  const U small = (U)(bias < 0x71000000u);
  bias = (bias & ~small) | (small & 0x71000000u);
  base = bits<F>((bias >> 1) + 0x07800000u) + base;
  const U b = bits<U>(base);
  const U nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  const U nan = (U)(shl1_w > 0xFF000000u);
  const U r = (sign >> 16) | (nan & 0x7E00u) | (nonsign & ~nan);
  store_as(p, __builtin_convertvector(r, typename V::h));
}

// Element type of W and its float32 load/store, per dtype.
template <int DT>
struct Elem;
template <>
struct Elem<MEND_DTYPE_FLOAT32> {
  typedef float T;
  static MEND_INLINE float load(const T* p) { return *p; }
  static MEND_INLINE void store(T* p, float x) { *p = x; }
  template <int VL>
  static MEND_INLINE typename Vec<VL>::f vload(const T* p) { return load_as<typename Vec<VL>::f>(p); }
  template <int VL>
  static MEND_INLINE void vstore(T* p, const typename Vec<VL>::f& x) { store_as(p, x); }
};
// The two 16-bit formats differ only in their conversions (chosen at compile time).
template <int DT>
struct Elem16 {
  typedef uint16_t T;
  static constexpr bool kBf16 = DT == MEND_DTYPE_BFLOAT16;
  static MEND_INLINE float load(const T* p) { return kBf16 ? bf16_to_f32(*p) : f16_to_f32(*p); }
  static MEND_INLINE void store(T* p, float x) { *p = kBf16 ? f32_to_bf16(x) : f32_to_f16(x); }
  template <int VL>
  static MEND_INLINE typename Vec<VL>::f vload(const T* p) { return kBf16 ? vload_bf16<VL>(p) : vload_f16<VL>(p); }
  template <int VL>
  static MEND_INLINE void vstore(T* p, const typename Vec<VL>::f& x) {
    if (kBf16) vstore_bf16<VL>(p, x);
    else vstore_f16<VL>(p, x);
  }
};
template <>
struct Elem<MEND_DTYPE_BFLOAT16> : Elem16<MEND_DTYPE_BFLOAT16> {};
template <>
struct Elem<MEND_DTYPE_FLOAT16> : Elem16<MEND_DTYPE_FLOAT16> {};

// ------------------------------------------------------------------------------------------------
// Problem description shared by the driver and the per-block kernels.
// ------------------------------------------------------------------------------------------------

struct Problem {
  void* w;
  int dtype;
  int64_t M, N, ldw, K;
  const float* a;   // (K, M)
  float scale;
  const float* bp;  // packed B: [ceil(N / NR)][K][NR]
  int64_t n_slivers;      // ceil(N / NR)
  int64_t slivers_per_nc; // B slivers per L2-resident group
  int64_t mc;             // rows per block (multiple of MR)
};

constexpr int64_t kKBlock = 128;  // K block of the two-level summation in tile()

// Micro-kernel + epilogue for one MR x NR tile of W at (row0, col0); mr <= MR rows and nr <= NR
// columns of it are inside W. ap: packed A sliver [K][MR]; bp: packed B sliver [K][NR] (64-byte
// aligned).
template <int VL, int MR, int NV, int DT>
static MEND_INLINE void tile(const float* __restrict ap, const float* __restrict bp, int64_t K,
                             typename Elem<DT>::T* __restrict w, int64_t ldw, int mr, int nr,
                             float scale) {
  typedef typename Vec<VL>::f F;
  constexpr int NR = VL * NV;
  F acc[MR][NV];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[i][v] = F{};

  // K is summed in blocks of kKBlock in the register tile; for K > kKBlock the block sums are added
  // into `part` (two-level summation: error ~ (kKBlock + K / kKBlock) ulps instead of ~K).
  F part[MR][NV];
  bool has_part = false;
  for (int64_t k0 = 0; k0 < K; k0 += kKBlock) {
    const int64_t k1 = std::min(K, k0 + kKBlock);
#pragma GCC unroll 2
    for (int64_t k = k0; k < k1; ++k) {
      const float* ak = ap + k * MR;
      const F* bk = reinterpret_cast<const F*>(bp + k * NR);
      F bv[NV];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) bv[v] = bk[v];
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i) {
        const float s = ak[i];
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[i][v] += s * bv[v];
      }
    }
    if (k1 < K) {
#pragma GCC unroll 16
      for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) {
          part[i][v] = has_part ? part[i][v] + acc[i][v] : acc[i][v];
          acc[i][v] = F{};
        }
      has_part = true;
    }
  }
  if (has_part) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[i][v] += part[i][v];
  }

  typedef Elem<DT> E;
  if (mr == MR && nr == NR) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      typename E::T* row = w + i * ldw;
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        F x = E::template vload<VL>(row + v * VL);
        x += scale * acc[i][v];
        E::template vstore<VL>(row + v * VL, x);
      }
    }
    return;
  }
  // Edge tile: full vectors where they fit, scalars for the rest (same arithmetic).
  alignas(64) float t[MR][NR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) store_as(&t[i][v * VL], acc[i][v]);
  const int full = nr / VL;
  for (int i = 0; i < mr; ++i) {
    typename E::T* row = w + i * ldw;
    for (int v = 0; v < full; ++v) {
      F x = E::template vload<VL>(row + v * VL);
      x += scale * load_as<F>(&t[i][v * VL]);
      E::template vstore<VL>(row + v * VL, x);
    }
    for (int j = full * VL; j < nr; ++j) {
      float x = E::load(row + j);
      x += scale * t[i][j];
      E::store(row + j, x);
    }
  }
}

// Processes rows [m0, m0 + mc) x all columns. ap_buf: scratch of mc * K floats (64-byte aligned).
#ifndef MEND_PREFETCH
#define MEND_PREFETCH 4
#endif
constexpr int kPrefetch = MEND_PREFETCH;

template <int VL, int MR, int NV, int DT>
static MEND_INLINE void row_block(const Problem& p, int64_t m0, float* __restrict ap_buf) {
  constexpr int NR = VL * NV;
  typedef typename Elem<DT>::T T;
  const int64_t M = p.M, N = p.N, K = p.K, ldw = p.ldw;
  const int64_t rows = std::min<int64_t>(p.mc, M - m0);
  const int64_t n_row_slivers = (rows + MR - 1) / MR;

  // Pack A[:, m0 : m0 + rows] into slivers [i][k][MR], zero padded.
  for (int64_t s = 0; s < n_row_slivers; ++s) {
    const int64_t r0 = m0 + s * MR;
    const int valid = static_cast<int>(std::min<int64_t>(MR, M - r0));
    float* dst = ap_buf + s * K * MR;
    if (valid == MR) {
      for (int64_t k = 0; k < K; ++k) {
        const float* src = p.a + k * M + r0;
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = src[i];
      }
    } else {
      for (int64_t k = 0; k < K; ++k) {
        const float* src = p.a + k * M + r0;
        for (int i = 0; i < MR; ++i) dst[k * MR + i] = i < valid ? src[i] : 0.0f;
      }
    }
  }

  T* w = static_cast<T*>(p.w);
  for (int64_t j0 = 0; j0 < p.n_slivers; j0 += p.slivers_per_nc) {
    const int64_t j1 = std::min(p.n_slivers, j0 + p.slivers_per_nc);
    for (int64_t s = 0; s < n_row_slivers; ++s) {
      const int64_t r0 = m0 + s * MR;
      const int mr = static_cast<int>(std::min<int64_t>(MR, M - r0));
      const float* ap = ap_buf + s * K * MR;
      T* wrow = w + r0 * ldw;
      for (int64_t j = j0; j < j1; ++j) {
        const int64_t c0 = j * NR;
        const int nr = static_cast<int>(std::min<int64_t>(NR, N - c0));
        if (kPrefetch > 0 && j + kPrefetch < j1) {
          // Software prefetch (for writing) of the W tile kPrefetch slivers ahead: hides the memory
          // latency of the read-modify-write behind the micro-kernel when K is small.
          const char* pf = reinterpret_cast<const char*>(wrow + c0 + kPrefetch * NR);
          for (int i = 0; i < mr; ++i)
            for (int off = 0; off < NR * static_cast<int>(sizeof(T)); off += 64)
              __builtin_prefetch(pf + i * ldw * static_cast<int64_t>(sizeof(T)) + off, 1, 3);
        }
        tile<VL, MR, NV, DT>(ap, p.bp + j * K * NR, K, wrow + c0, ldw, mr, nr, p.scale);
      }
    }
  }
}

template <int VL, int MR, int NV>
static MEND_INLINE void row_block_any(const Problem& p, int64_t m0, float* ap_buf) {
  switch (p.dtype) {
    case MEND_DTYPE_FLOAT32: row_block<VL, MR, NV, MEND_DTYPE_FLOAT32>(p, m0, ap_buf); break;
    case MEND_DTYPE_BFLOAT16: row_block<VL, MR, NV, MEND_DTYPE_BFLOAT16>(p, m0, ap_buf); break;
    default: row_block<VL, MR, NV, MEND_DTYPE_FLOAT16>(p, m0, ap_buf); break;
  }
}

// One entry per SIMD path: its register tile (MR x NR) and the compiled row-block function.
typedef void (*RowBlockFn)(const Problem&, int64_t, float*);
struct Kernel {
  int mr, nr;
  RowBlockFn fn;
};

// Register tiles per path: MR x NV accumulators + NV B vectors + 1 broadcast fit the register file
// (32 zmm / 16 ymm / 16 xmm); VL = floats per vector.
template <int VL_, int MR_, int NV_>
struct TileShape {
  static constexpr int VL = VL_, MR = MR_, NV = NV_, NR = VL_ * NV_;
};
typedef TileShape<16, 8, 3> Avx512Tile;  // 8 x 48
typedef TileShape<8, 6, 2> Avx2Tile;     // 6 x 16
typedef TileShape<4, 4, 3> BaselineTile; // 4 x 12

#ifdef MEND_X86
MEND_TARGET_AVX512 static void row_block_avx512(const Problem& p, int64_t m0, float* ap) {
  row_block_any<Avx512Tile::VL, Avx512Tile::MR, Avx512Tile::NV>(p, m0, ap);
}
MEND_TARGET_AVX2 static void row_block_avx2(const Problem& p, int64_t m0, float* ap) {
  row_block_any<Avx2Tile::VL, Avx2Tile::MR, Avx2Tile::NV>(p, m0, ap);
}
#endif
static void row_block_baseline(const Problem& p, int64_t m0, float* ap) {
  row_block_any<BaselineTile::VL, BaselineTile::MR, BaselineTile::NV>(p, m0, ap);
}

static Kernel kernel_for(SimdPath path) {
  switch (path) {
#ifdef MEND_X86
    case kAvx512: return Kernel{Avx512Tile::MR, Avx512Tile::NR, row_block_avx512};
    case kAvx2: return Kernel{Avx2Tile::MR, Avx2Tile::NR, row_block_avx2};
#endif
    default: return Kernel{BaselineTile::MR, BaselineTile::NR, row_block_baseline};
  }
}

struct AlignedBuffer {
  float* ptr = nullptr;
  explicit AlignedBuffer(size_t n_floats) {
    void* p = nullptr;
    size_t bytes = ((n_floats * sizeof(float) + 63) / 64) * 64;
    if (bytes == 0) bytes = 64;
    if (posix_memalign(&p, 64, bytes) == 0) ptr = static_cast<float*>(p);
  }
  ~AlignedBuffer() { std::free(ptr); }
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;
};

static int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static bool valid(const mend_rank_update_desc& d) {
  if (d.w == nullptr || d.a == nullptr || d.b == nullptr) return false;
  if (d.M < 1 || d.N < 1 || d.K < 1 || d.ldw < d.N) return false;
  return d.dtype == MEND_DTYPE_FLOAT32 || d.dtype == MEND_DTYPE_BFLOAT16 || d.dtype == MEND_DTYPE_FLOAT16;
}

// Rows per row block of a weight: 12 slivers (96 rows for AVX-512), fewer when M is small so that
// every thread gets work even when this weight is alone.
static int64_t row_block_rows(int64_t M, int64_t MR, int threads) {
  int64_t mc_slivers = 12;
  const int64_t m_slivers = (M + MR - 1) / MR;
  while (mc_slivers > 1 && (m_slivers + mc_slivers - 1) / mc_slivers < 4 * threads) mc_slivers /= 2;
  return mc_slivers * MR;
}

// The work of one weight, without its packed-B pointer (set once the batch's buffer exists).
static Problem plan(const mend_rank_update_desc& d, const Kernel& kern, int threads) {
  const int64_t n_slivers = (d.N + kern.nr - 1) / kern.nr;
  // Group of B slivers reused across the row slivers of a block: ~256 KiB (half of a small L2).
  const int64_t sliver_bytes = d.K * kern.nr * static_cast<int64_t>(sizeof(float));
  const int64_t slivers_per_nc = std::max<int64_t>(1, (256 * 1024) / sliver_bytes);
  return Problem{d.w, d.dtype, d.M, d.N, d.ldw, d.K, d.a, d.scale, nullptr, n_slivers, slivers_per_nc,
                 row_block_rows(d.M, kern.mr, threads)};
}

// Copies B[:, j * NR : (j + 1) * NR] into dst[k][0..NR), zero padded beyond N.
static void pack_b_sliver(const float* b, int64_t N, int64_t K, int64_t NR, int64_t j, float* dst) {
  const int64_t c0 = j * NR;
  const int64_t valid_cols = std::min<int64_t>(NR, N - c0);
  for (int64_t k = 0; k < K; ++k) {
    const float* src = b + k * N + c0;
    float* d = dst + k * NR;
    for (int64_t c = 0; c < valid_cols; ++c) d[c] = src[c];
    for (int64_t c = valid_cols; c < NR; ++c) d[c] = 0.0f;
  }
}

// Which weight a batch-wide work index belongs to: starts[i] is the first index of weight i,
// starts[count] the total.
static size_t owner(const std::vector<int64_t>& starts, int64_t index) {
  return static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), index) - starts.begin()) - 1;
}

// All weights' B slivers and row blocks are numbered batch-wide so that one parallel region with
// two work-shared loops (pack every B, barrier, then every row block) covers the whole batch.
static int rank_update_batched(const mend_rank_update_desc* descs, int64_t count) {
  if (descs == nullptr || count < 1) return MEND_ERR_INVALID_ARGUMENT;
  for (int64_t i = 0; i < count; ++i)
    if (!valid(descs[i])) return MEND_ERR_INVALID_ARGUMENT;

  const Kernel kern = kernel_for(selected_simd_path());
  const int threads = max_threads();
  std::vector<Problem> problems;
  std::vector<int64_t> sliver_starts(1, 0), block_starts(1, 0);
  int64_t max_ap_floats = 0;
  double work = 0;
  for (int64_t i = 0; i < count; ++i) {
    const mend_rank_update_desc& d = descs[i];
    problems.push_back(plan(d, kern, threads));
    const Problem& p = problems.back();
    sliver_starts.push_back(sliver_starts.back() + p.n_slivers);
    block_starts.push_back(block_starts.back() + (d.M + p.mc - 1) / p.mc);
    max_ap_floats = std::max(max_ap_floats, p.mc * d.K);
    work += static_cast<double>(d.M) * d.N * (d.K + 4);
  }

  // Every packed B in one buffer, all allocated before the first write to any weight.
  std::vector<int64_t> bp_offsets;
  int64_t bp_floats = 0;
  for (const Problem& p : problems) {
    bp_offsets.push_back(bp_floats);
    bp_floats += p.n_slivers * p.K * kern.nr;
  }
  const int64_t total_blocks = block_starts.back();
  AlignedBuffer bp(static_cast<size_t>(bp_floats));
  const int n_workers = static_cast<int>(std::min<int64_t>(threads, total_blocks));
  AlignedBuffer ap(static_cast<size_t>(std::max(n_workers, 1)) * static_cast<size_t>(max_ap_floats));
  if (bp.ptr == nullptr || ap.ptr == nullptr) return MEND_ERR_OUT_OF_MEMORY;
  for (size_t i = 0; i < problems.size(); ++i) problems[i].bp = bp.ptr + bp_offsets[i];

  float* const bpack = bp.ptr;
  float* const apack = ap.ptr;
  const int64_t total_slivers = sliver_starts.back();
  // Small batches are not worth waking the thread team.
  const bool parallel = n_workers > 1 && work > 2.0e5;
  (void)parallel;
#ifdef _OPENMP
#pragma omp parallel num_threads(n_workers) if (parallel)
#endif
  {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int64_t s = 0; s < total_slivers; ++s) {
      const size_t i = owner(sliver_starts, s);
      const int64_t j = s - sliver_starts[i];
      const Problem& p = problems[i];
      pack_b_sliver(descs[i].b, p.N, p.K, kern.nr, j, bpack + bp_offsets[i] + j * p.K * kern.nr);
    }
    // (implicit barrier: every B is packed before any tile runs)
    float* my_ap = apack + static_cast<size_t>(thread_id()) * static_cast<size_t>(max_ap_floats);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
    for (int64_t blk = 0; blk < total_blocks; ++blk) {
      const size_t i = owner(block_starts, blk);
      kern.fn(problems[i], (blk - block_starts[i]) * problems[i].mc, my_ap);
    }
  }
  return MEND_OK;
}

}  // namespace mend_cpu

// ------------------------------------------------------------------------------------------------
// C ABI
// ------------------------------------------------------------------------------------------------

extern "C" int mend_cpu_rank_update(void* w, int dtype, int64_t M, int64_t N, int64_t ldw,
                                    const float* a, const float* b, int64_t K, float scale) {
  const mend_rank_update_desc one{w, dtype, M, N, ldw, a, b, K, scale};
  return mend_cpu_rank_update_batched(&one, 1);
}

extern "C" int mend_cpu_rank_update_batched(const mend_rank_update_desc* descs, int64_t count) {
  try {
    return mend_cpu::rank_update_batched(descs, count);
  } catch (const std::bad_alloc&) {  // the per-weight plans; no exception may cross the C ABI
    return MEND_ERR_OUT_OF_MEMORY;
  }
}

extern "C" const char* mend_cpu_simd_path(void) {
  return mend_cpu::simd_path_name(mend_cpu::selected_simd_path());
}

#ifndef MEND_COMPILER_ID
#if defined(__clang__)
#define MEND_COMPILER_ID "Clang " __clang_version__
#elif defined(__GNUC__)
#define MEND_COMPILER_ID "GNU " __VERSION__
#else
#define MEND_COMPILER_ID "unknown"
#endif
#endif
#ifndef MEND_BUILD_TYPE
#define MEND_BUILD_TYPE "unknown"
#endif
#ifndef MEND_CXX_FLAGS
#define MEND_CXX_FLAGS "unknown"
#endif

extern "C" void mend_cpu_get_build_facts(mend_cpu_build_facts* out) {
  if (out == nullptr) return;
  out->compiler = MEND_COMPILER_ID;
  out->build_type = MEND_BUILD_TYPE;
  out->cxx_flags = MEND_CXX_FLAGS;
#ifdef MEND_X86
  out->simd_variants = "avx512,avx2,baseline";
#else
  out->simd_variants = "baseline";
#endif
#ifdef _OPENMP
  out->openmp = 1;
  out->openmp_version = _OPENMP;
#else
  out->openmp = 0;
  out->openmp_version = 0;
#endif
  out->max_threads = mend_cpu::max_threads();
}
