// A small register-blocked GEMM: C[M x Nc] = A[M x K] @ B[K x Nc], Nc a multiple of the vector width. matmul
// reads B as a row-major matrix (the attention tiles); PackedB holds a weight matrix packed once per sequence
// for the recurrent matmuls. Each output element is summed in a fixed order - panels of products accumulated in
// registers, the panels added in turn - so results do not depend on how columns are split between threads, and
// the longest rounding chain is a panel plus K / panel additions rather than K. Panels are kPanel = 64 long for
// matmul (a panel's slice of B stays in L1 while every row block uses it) and kPackedPanel = 128 for PackedB:
// each panel reloads and stores the C tile, which at 64 cost 15% of the recurrent matmul at hidden size 512,
// while at 256 a column block's panel of B (48 KiB with 3 AVX-512 vectors) filled an Intel core's whole L1
// (128 took 1-3% off the LSTM forward at batch 32, sizes 256, in A/B runs alternating in one process). The
// float32 error of a 256-step LSTM against float64 stays at torch's.
//
// Vectors are GCC/Clang vector extensions sized to the widest registers the build targets. Register tiles:
// AVX-512, 8 rows x 3 vectors (24 accumulators of 32 registers; measured 150-165 GFLOP/s per core here, against
// 110-135 for 8 x 2); otherwise 6 rows x 2 vectors, which fit AVX2's 16 registers.
#pragma once

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <new>
#include <utility>
#include <vector>

#include "vec_math.h"

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
constexpr int64_t kPackedPanel = 128;  // see the top of the file

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

// Allocator of cache-line aligned (64-byte) storage. std::vector's default allocation is only 16-byte aligned,
// so a 64-byte vector load from it straddles two cache lines: on the packed weights that cost the recurrent
// matmul 5% of its rate at hidden size 256 and 12% at 512 (measured in isolation).
template <typename T>
struct CacheAligned {
  using value_type = T;
  static constexpr std::align_val_t kAlign{64};
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), kAlign)); }
  void deallocate(T* p, size_t) { ::operator delete(p, kAlign); }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};

// A buffer that the kernels read and write as vectors.
template <typename T>
using Buffer = std::vector<T, CacheAligned<T>>;

// CacheAligned whose resize leaves new elements uninitialized (default-initialized), for buffers the kernels
// write in full before reading: zero-filling the packed weights and the input projection's buffer took a third of
// a forward's setup at batch 32, hidden size 256 (about 50 of 175 us a thread).
template <typename T>
struct CacheAlignedUninit : CacheAligned<T> {
  template <typename U>
  struct rebind {
    using other = CacheAlignedUninit<U>;
  };
  CacheAlignedUninit() = default;
  template <typename U>
  CacheAlignedUninit(const CacheAlignedUninit<U>&) {}
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};

template <typename T>
using UninitBuffer = std::vector<T, CacheAlignedUninit<T>>;

// A's element (m, k): A is row-major (m, k), or with TA stored transposed, as (k, m) with row stride lda.
template <bool TA, typename T>
inline const T* a_at(const T* A, int64_t lda, int64_t m, int64_t k) {
  return TA ? A + k * lda + m : A + m * lda + k;
}

// C[MR x NR vectors] (+)= A[MR x K] @ B[K x NR vectors]; adds to C when `accumulate` (K panels after the first).
// With PF > 0, the B row PF rows ahead is prefetched into L1 (prefetches never fault, so running past B's end is
// harmless): a GEMV streams B from L2 once per call, and waiting on demand misses cost a sixth of its time.
template <typename T, int MR, int NR, bool TA = false, int PF = 0, bool NEXT = false>
inline void micro_kernel(const T* __restrict__ A, int64_t lda, const T* __restrict__ B, int64_t ldb,
                         T* __restrict__ C, int64_t ldc, int64_t K, bool accumulate, const T* next = nullptr) {
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
    if constexpr (NEXT) {
      constexpr int kLines = (NR * L * sizeof(T) + 63) / 64;
#pragma GCC unroll 8
      for (int q = 0; q < kLines; ++q) __builtin_prefetch(next + k * ldb + q * (64 / sizeof(T)));
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
    case 3: micro_kernel<T, 3, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 4: micro_kernel<T, 4, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 5: micro_kernel<T, 5, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 6: micro_kernel<T, 6, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    case 7: micro_kernel<T, 7, NR, TA, PF>(A, lda, B, ldb, C, ldc, K, acc); break;
    default: break;
  }
}

// One column block of one K panel, all row blocks. M rows take ceil(M / MR) blocks of as even sizes as possible
// (32 rows as 6, 6, 5, 5, 5, 5 with AVX2's 6-row tile) rather than whole blocks and a short remainder: a block of
// 2 rows x 2 vectors has four independent multiply-add chains, too few to cover the FMA latency on both ports.
// With `next` (the panel of the column block that comes next), the first row block prefetches it a row of B per
// k: on weights streamed from L3 the hardware prefetchers lose the stream at each block's jump. On a Zen 3 core
// (AVX2), with 1 MiB of packed weights, the two took 32 rows from 80 to 85 GFLOP/s and 16 rows (6, 5, 5 rather
// than 6, 6, 4) from 75 to 84, the prefetch 2-4% of that, in runs alternating within one process. The blocking
// does not change any sum. B and C point at the block's first column.
template <typename T, int NR, bool TA, int MR = kRowBlock, int PF = 0>
inline void column_block(int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
                         bool acc, const T* next = nullptr) {
  const int64_t blocks = (M + MR - 1) / MR, base = blocks > 0 ? M / blocks : 0, extra = blocks > 0 ? M % blocks : 0;
  int64_t m0 = 0;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t rows = base + (i < extra);  // the first `extra` blocks take one row more
    const T* a = a_at<TA>(A, lda, m0, 0);
    if (rows < MR)
      rows_remainder<T, NR, TA, PF>(rows, a, lda, B, ldb, C + m0 * ldc, ldc, K, acc);
    else if (i == 0 && next)
      micro_kernel<T, MR, NR, TA, PF, true>(a, lda, B, ldb, C, ldc, K, acc, next);
    else
      micro_kernel<T, MR, NR, TA, PF>(a, lda, B, ldb, C + m0 * ldc, ldc, K, acc);
    m0 += rows;
  }
}

template <typename T, bool TA, int PF>
inline void column_block_nr(int nr, int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                            int64_t ldc, bool acc, const T* next = nullptr) {
  switch (nr) {
    case 8: column_block<T, 8, TA, kRowBlock, PF>(M, K, A, lda, B, ldb, C, ldc, acc, next); break;
    case 4: column_block<T, 4, TA, 6, PF>(M, K, A, lda, B, ldb, C, ldc, acc, next); break;
    case 3: column_block<T, 3, TA, kRowBlock, PF>(M, K, A, lda, B, ldb, C, ldc, acc, next); break;
    case 2: column_block<T, 2, TA, kRowBlock, PF>(M, K, A, lda, B, ldb, C, ldc, acc, next); break;
    default: column_block<T, 1, TA, kRowBlock, PF>(M, K, A, lda, B, ldb, C, ldc, acc, next); break;
  }
}

// column_block for a block width `nr` (vectors) chosen at run time by for_each_column_block. With fewer rows than
// one row block, each column block's B is used by one micro-kernel call only, streamed from L2, and is prefetched
// 4 rows ahead: a GEMV (one or two rows), and the last steps of a packed batch, whose batch shrinks as sequences
// end (3 to 7 rows: 2-5% faster per step than without the prefetch, in alternating runs of the LSTM forward at
// hidden size 256).
template <typename T, bool TA>
inline void column_block_n(int nr, int64_t M, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                           int64_t ldc, bool acc, const T* next = nullptr) {
  if (M < kRowBlock)
    column_block_nr<T, TA, 4>(nr, M, K, A, lda, B, ldb, C, ldc, acc);
  else
    column_block_nr<T, TA, 0>(nr, M, K, A, lda, B, ldb, C, ldc, acc, next);
}

// The column blocks of a C row of Nc elements (a multiple of the vector width): f(n0, nr) for each, nr vectors
// wide from column n0. Blocks of `widest` vectors (8 for a GEMV, else kColBlock), then narrower ones at the right
// edge; but when exactly 4 vectors are left after blocks of 3 (a head dim of 64 floats with AVX-512), one block of
// 4 (taken with 6 rows: as many accumulators as 8 x 3, where 3 + 1 or 2 + 2 would be narrower).
template <typename T, typename F>
inline void for_each_column_block(int64_t Nc, int widest, F f) {
  constexpr int64_t L = lanes<T>();
  int64_t n0 = 0;
  for (; n0 + widest * L <= Nc && !(widest == 3 && Nc - n0 == 4 * L); n0 += widest * L) f(n0, widest);
  if (widest == 3 && Nc - n0 == 4 * L) {
    f(n0, 4);
    n0 += 4 * L;
  }
  for (; n0 + 2 * L <= Nc; n0 += 2 * L) f(n0, 2);
  for (; n0 < Nc; n0 += L) f(n0, 1);
}

// Blocks 8 vectors wide for one or two rows (a latency-bound GEMV: enough independent multiply-add chains in
// flight), kColBlock vectors otherwise.
inline int widest_block(int64_t M) {
  return M <= 2 ? 8 : kColBlock;
}

// One K panel over all of C.
template <typename T, bool TA>
inline void panel(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
                  int64_t ldc, bool acc) {
  for_each_column_block<T>(Nc, widest_block(M), [&](int64_t n0, int nr) {
    column_block_n<T, TA>(nr, M, K, A, lda, B + n0, ldb, C + n0, ldc, acc);
  });
}

// C[M x Nc] (+)= A[M x K] @ B[K x Nc] (adds to C when `accumulate`); Nc % lanes<T>() == 0; C rows must hold
// Nc elements. With TA, A is given transposed: a (K x M) matrix with row stride lda (C = A^T B, with no copy of
// A; the sums run in the same order). With one or two rows (a latency-bound GEMV) the column blocks are four
// times wider, so enough independent multiply-add chains are in flight; with fewer rows than a row block, B is
// prefetched 4 rows ahead (see column_block_n).
template <typename T, bool TA = false>
void matmul(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C,
            int64_t ldc, bool accumulate = false) {
  for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kPanel) {
    const int64_t kn = std::min(kPanel, K - k0);
    panel<T, TA>(M, Nc, kn, a_at<TA>(A, lda, 0, k0), lda, B + k0 * ldb, ldb, C, ldc, accumulate || k0 > 0);
  }
}

// Rows [k0, k1) of B (K x Nc, given by its rows: row(k) points at B[k][0, cols); columns cols <= n < Nc are
// zeros) in PackedB's layout at `data`: the column block at n0 (for_each_column_block's widths, up to `widest`)
// at data + K * n0, its rows w = nr * lanes apart. A block's whole rows move in copies of a constant size (of a
// variable size, std::memcpy is a library call per row: about 1 ms a thread on the backward's weight GEMM).
template <typename T, typename RowPtr>
void pack_row_range(T* data, int64_t K, int64_t Nc, int widest, int64_t cols, RowPtr row, int64_t k0, int64_t k1) {
  for_each_column_block<T>(Nc, widest, [&](int64_t n0, int nr) {
    const int64_t w = nr * lanes<T>(), n = std::clamp<int64_t>(cols - n0, 0, w);
    for (int64_t k = k0; k < k1; ++k) {
      T* dst = data + K * n0 + k * w;
      switch (n == w ? nr : 0) {
        case 1: std::memcpy(dst, row(k) + n0, 1 * lanes<T>() * sizeof(T)); break;
        case 2: std::memcpy(dst, row(k) + n0, 2 * lanes<T>() * sizeof(T)); break;
        case 3: std::memcpy(dst, row(k) + n0, 3 * lanes<T>() * sizeof(T)); break;
        case 4: std::memcpy(dst, row(k) + n0, 4 * lanes<T>() * sizeof(T)); break;
        case 8: std::memcpy(dst, row(k) + n0, 8 * lanes<T>() * sizeof(T)); break;
        default:
          for (int64_t q = 0; q < w; ++q) dst[q] = q < n ? row(k)[n0 + q] : T(0);
      }
    }
  });
}

// A weight matrix B (K x Nc, Nc a multiple of the vector width) packed once for many matmul calls: each
// column block (in for_each_column_block's widths) holds its K rows contiguously, so the panel a micro-kernel
// reads is one sequential stream rather than K rows ldb apart (which the hardware prefetchers follow poorly
// once B outgrows L2: 20-30% of the recurrent matmul's time at hidden size 512).
template <typename T>
class PackedB {
 public:
  // Packs B given by its rows: row(k) points at B[k][0, cols); columns cols <= n < Nc are zeros. `max_rows` is
  // the most rows (M) any call will have, which picks the block widths.
  template <typename RowPtr>
  void pack_rows(int64_t K, int64_t Nc, int64_t max_rows, int64_t cols, RowPtr row) {
    reset(K, Nc, max_rows);
    pack_row_range(data_.data(), K, Nc, widest_, cols, row, 0, K);
  }

  // Packs B given transposed: row(n) points at B[0, K)[n] (column n of B, contiguous) for n < cols; columns
  // cols <= n < Nc are zeros. Each column block is transposed straight into place (16 x 16 register blocks for
  // float), which made packing a thread's weights several times faster than going through a transposed copy.
  template <typename RowPtr>
  void pack_transposed(int64_t K, int64_t Nc, int64_t max_rows, int64_t cols, RowPtr row) {
    reset(K, Nc, max_rows);
    for_each_column_block<T>(Nc, widest_, [&](int64_t n0, int nr) {
      const int64_t w = nr * lanes<T>(), n = std::clamp<int64_t>(cols - n0, 0, w);
      if (n > 0) vec_math::transpose(n, K, [&](int64_t r) { return row(n0 + r); }, data_.data() + K * n0, w);
      zero_padding(n0, w, n);
    });
  }

  // C[M x Nc] (+)= A[M x (k1 - k0)] @ B[k0:k1, :]: A points at the column holding k = k0. Panels of
  // kPackedPanel from k0 (so a product over one k-range does not depend on the others).
  void matmul(int64_t M, int64_t k0, int64_t k1, const T* A, int64_t lda, T* C, int64_t ldc,
              bool accumulate = false) const {
    matmul_sets(1, M, k0, k1, [&](int64_t) { return std::pair<const T*, T*>(A, C); }, lda, ldc, accumulate);
  }

  // matmul for `sets` sets of M rows each, set j's A and C given by set(j) (a pair of pointers): one GEMM over
  // rows that are not evenly spaced, each column block's panel of B serving every set while it is in L1. The
  // sums are matmul's, set by set. Only column blocks [b0, b1) (all by default) are computed: the sums of a
  // column do not depend on which blocks are computed with it.
  template <typename SetOf>
  void matmul_sets(int64_t sets, int64_t M, int64_t k0, int64_t k1, SetOf set, int64_t lda, int64_t ldc,
                   bool accumulate = false, int64_t b0 = 0, int64_t b1 = -1) const {
    const int64_t K = k1 - k0, nb = b1 < 0 ? blocks() : b1;
    auto panel_at = [&](int64_t i, int64_t k) {  // column block i's rows from k on
      return data_.data() + K_ * blocks_[i].first + k * blocks_[i].second * lanes<T>();
    };
    for (int64_t p0 = 0; p0 < K || p0 == 0; p0 += kPackedPanel) {
      const int64_t kn = std::min(kPackedPanel, K - p0);
      const bool acc = accumulate || p0 > 0;
      for (int64_t i = b0; i < nb; ++i) {
        const auto [n0, nr] = blocks_[i];
        const T* next = i + 1 < nb ? panel_at(i + 1, k0 + p0) : p0 + kn < K ? panel_at(b0, k0 + p0 + kn) : nullptr;
        for (int64_t j = 0; j < sets; ++j) {
          const auto [A, C] = set(j);
          column_block_n<T, false>(nr, M, kn, A + p0, lda, panel_at(i, k0 + p0), nr * lanes<T>(), C + n0, ldc, acc,
                                   j == 0 ? next : nullptr);
        }
      }
    }
  }

  int64_t blocks() const { return static_cast<int64_t>(blocks_.size()); }  // column blocks

 private:
  // Sizes the storage, left uninitialized: the pack functions write every element.
  void reset(int64_t K, int64_t Nc, int64_t max_rows) {
    K_ = K;
    Nc_ = Nc;
    widest_ = widest_block(max_rows);
    data_.resize(K * Nc);
    blocks_.clear();
    for_each_column_block<T>(Nc, widest_, [&](int64_t n0, int nr) { blocks_.emplace_back(n0, nr); });
  }

  // Zeros columns [n, w) of every row of the column block at n0 (w wide): the columns past `cols`.
  void zero_padding(int64_t n0, int64_t w, int64_t n) {
    if (n == w) return;
    for (int64_t k = 0; k < K_; ++k) std::fill(data_.data() + K_ * n0 + k * w + n, data_.data() + K_ * n0 + (k + 1) * w, T(0));
  }

  int64_t K_ = 0, Nc_ = 0;
  int widest_ = kColBlock;
  std::vector<std::pair<int64_t, int>> blocks_;  // (first column, width in vectors) of each column block
  UninitBuffer<T> data_;
};

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
