// A small register-blocked GEMM for the recurrent matmuls: C[M x Nc] = A[M x K] @ Bp[K x Nc], where Bp is a
// thread's slice of a weight matrix packed once per sequence (row stride ldb, Nc a multiple of the vector
// width). Each output element is summed in a fixed order - panels of kPanel products accumulated in registers,
// the panels added in turn - so results do not depend on how columns are split between threads, and the longest
// rounding chain is kPanel + K / kPanel additions rather than K (a plain k-loop was measurably less accurate
// than the BLAS on long recurrences). A panel's slice of B also stays in L1 while every row block uses it.
//
// Vectors are GCC/Clang vector extensions sized to the widest registers the build targets. Register tiles:
// AVX-512, 8 rows x 3 vectors (24 accumulators of 32 registers; measured 150-165 GFLOP/s per core here, against
// 110-135 for 8 x 2); otherwise 6 rows x 2 vectors, which fit AVX2's 16 registers.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>

namespace seqkernels {
namespace gemm {

#if defined(__AVX512F__)
#define SEQKERNELS_VEC_BYTES 64
constexpr int kRowBlock = 8;
constexpr int kColBlock = 3;
#else
#define SEQKERNELS_VEC_BYTES 32
constexpr int kRowBlock = 6;
constexpr int kColBlock = 2;
#endif
constexpr int64_t kPanel = 64;

typedef float vfloat __attribute__((vector_size(SEQKERNELS_VEC_BYTES), aligned(4)));
typedef double vdouble __attribute__((vector_size(SEQKERNELS_VEC_BYTES), aligned(8)));

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = vfloat;
};
template <>
struct Vec<double> {
  using type = vdouble;
};

template <typename T>
constexpr int64_t lanes() {
  return SEQKERNELS_VEC_BYTES / sizeof(T);
}

inline int64_t round_up(int64_t x, int64_t m) {
  return (x + m - 1) / m * m;
}

// A's element (m, k): A is row-major (m, k), or with TA stored transposed, as (k, m) with row stride lda.
template <bool TA, typename T>
inline const T* a_at(const T* A, int64_t lda, int64_t m, int64_t k) {
  return TA ? A + k * lda + m : A + m * lda + k;
}

// C[MR x NR vectors] (+)= A[MR x K] @ B[K x NR vectors]; adds to C when `accumulate` (K panels after the first).
// With PF > 0, the B row PF rows ahead is prefetched into L1 (prefetches never fault, so running past B's end is
// harmless): a GEMV streams B from L2 once per call, and waiting on demand misses cost a sixth of its time.
template <typename T, int MR, int NR, bool TA = false, int PF = 0>
inline void micro_kernel(const T* __restrict__ A, int64_t lda, const T* __restrict__ B, int64_t ldb,
                         T* __restrict__ C, int64_t ldc, int64_t K, bool accumulate) {
  using V = typename Vec<T>::type;
  constexpr int64_t L = lanes<T>();
  // (The loops over the tile are unrolled explicitly: left to GCC, the epilogue's were not, which kept the
  // accumulators in a stack array, zeroed and reloaded through memory around the k loop.)
  V acc[MR][NR];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) acc[m][n] = V{};
  for (int64_t k = 0; k < K; ++k) {
    if constexpr (PF > 0) {
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) __builtin_prefetch(B + (k + PF) * ldb + n * L);
    }
    V b[NR];
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) b[n] = *reinterpret_cast<const V*>(B + k * ldb + n * L);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const T a = *a_at<TA>(A, lda, m, k);
#pragma GCC unroll 8
      for (int n = 0; n < NR; ++n) acc[m][n] += a * b[n];
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int n = 0; n < NR; ++n) {
      V* c = reinterpret_cast<V*>(C + m * ldc + n * L);
      *c = accumulate ? *c + acc[m][n] : acc[m][n];
    }
}

template <typename T, int NR, bool TA, int PF = 0>
inline void rows_remainder(int64_t rows, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                           int64_t K, bool acc) {
  switch (rows) {
    case 1: micro_kernel<T, 1, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 2: micro_kernel<T, 2, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 3: micro_kernel<T, 3, NR, TA>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 4: micro_kernel<T, 4, NR, TA>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 5: micro_kernel<T, 5, NR, TA>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 6: micro_kernel<T, 6, NR, TA>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 7: micro_kernel<T, 7, NR, TA>(A, lda, B, ldb, C, ldc, K, acc); break;
    default: break;
  }
}

// Columns [n0, n0 + NR vectors) of one K panel, all row blocks (of MR rows, then the remainder).
template <typename T, int NR, bool TA, int MR = kRowBlock, int PF = 0>
inline void column_block(int64_t M, int64_t n0, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                         int64_t ldc, bool acc) {
  int64_t m0 = 0;
  for (; m0 + MR <= M; m0 += MR)
    micro_kernel<T, MR, NR, TA, PF>(a_at<TA>(A, lda, m0, 0), lda, B + n0, ldb, C + m0 * ldc + n0, ldc, K, acc);
  rows_remainder<T, NR, TA, PF>(M - m0, a_at<TA>(A, lda, m0, 0), lda, B + n0, ldb, C + m0 * ldc + n0, ldc, K, acc);
}

// One K panel over all of C: column blocks of NR vectors, then narrower ones at the right edge.
template <typename T, int NR, bool TA, int PF = 0>
inline void panel(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                  int64_t ldc, bool acc) {
  constexpr int64_t L = lanes<T>();
  int64_t n0 = 0;
  // Full blocks, but not when exactly 4 vectors are left (a head dim of 64 floats with AVX-512): those take one
  // block of 6 rows x 4 vectors, as many accumulators as 8 x 3, where 3 + 1 or 2 + 2 would be narrower.
  for (; n0 + NR * L <= Nc && !(NR == 3 && Nc - n0 == 4 * L); n0 += NR * L)
    column_block<T, NR, TA, kRowBlock, PF>(M, n0, K, A, lda, B, ldb, C, ldc, acc);
  if (NR == 3 && Nc - n0 == 4 * L) {
    column_block<T, 4, TA, 6, PF>(M, n0, K, A, lda, B, ldb, C, ldc, acc);
    n0 += 4 * L;
  }
  for (; n0 + 2 * L <= Nc; n0 += 2 * L) column_block<T, 2, TA, kRowBlock, PF>(M, n0, K, A, lda, B, ldb, C, ldc, acc);
  for (; n0 < Nc; n0 += L) column_block<T, 1, TA, kRowBlock, PF>(M, n0, K, A, lda, B, ldb, C, ldc, acc);
}

// C[M x Nc] (+)= A[M x K] @ B[K x Nc] (adds to C when `accumulate`); Nc % lanes<T>() == 0; C rows must hold
// Nc elements. With TA, A is given transposed: a (K x M) matrix with row stride lda (C = A^T B, with no copy of
// A; the sums run in the same order). With one or two rows (a latency-bound GEMV) the column blocks are four
// times wider, so enough independent multiply-add chains are in flight, and B is prefetched 4 rows ahead.
template <typename T, bool TA = false>
void matmul(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
            int64_t ldc, bool accumulate = false) {
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kPanel) {
    const int64_t kn = std::min(kPanel, K - k0);
    const T* Ak = a_at<TA>(A, lda, 0, k0);
    if (M <= 2)
      panel<T, 8, TA, 4>(M, Nc, kn, Ak, lda, B + k0 * ldb, ldb, C, ldc, accumulate || k0 > 0);
    else
      panel<T, kColBlock, TA>(M, Nc, kn, Ak, lda, B + k0 * ldb, ldb, C, ldc, accumulate || k0 > 0);
  }
}

// sum(a[k] * b[k]) in exactly the order matmul sums one output element (multiply-add chains over panels of
// kPanel, panels added in turn), so a value computed both ways is bitwise equal: the attention backward relies
// on rowsum(dO * O) cancelling dO @ V^T exactly where softmax probabilities are exactly one.
template <typename T>
T dot_like_matmul(const T* a, const T* b, int64_t K) {
  T total = T(0);
  for (int64_t k0 = 0; k0 < K; k0 += kPanel) {
    const int64_t k1 = std::min(K, k0 + kPanel);
    T acc = T(0);
    for (int64_t k = k0; k < k1; ++k) acc += a[k] * b[k];
    total = k0 == 0 ? acc : total + acc;
  }
  return total;
}

}  // namespace gemm
}  // namespace seqkernels
