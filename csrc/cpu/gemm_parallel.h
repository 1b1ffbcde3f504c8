// A threaded GEMM for the backward's large products (the weight gradients over all time steps, and the RNN's
// input gradient):
// C_s[M x n_s] = op(A)[M x K] @ B_s[K x n_s] for one or more B operands s that share A, op(A) = A or A^T.
//
// Goto's blocking around gemm_kernel.h's micro-kernels. Every B is packed once, in full, by the whole team (each
// column block's K rows contiguous, as PackedB does); then each thread takes a contiguous range of C's rows and
// walks it in blocks of rows (block_rows: as many as keep the block of C in 3/4 of a core's L2), packing each
// block's A panel by panel (kRowBlock rows, k-major: the micro-kernel's broadcasts read one sequential stream) for
// each K panel of kGradPanel, and multiplying it into every column block of every B. A thread's block of C stays
// in its L2 for all K panels, a column block's K panel of B (kGradPanel x 3 vectors: 24 KiB for float with
// AVX-512) in L1 while every row panel of the block uses it, and B is read from L3 once per block of C. On an
// Intel AVX-512 core (48 KiB of L1, 2 MiB of L2) panels of 256 (48 KiB of B, the whole L1) and blocks of 128 rows
// made an LSTM's weight gradients at batch 32, sizes 256, about 2 ms slower (the backward 40.7-41.3 ms against
// 38.8-38.9, alternating in one process; 256-row blocks 38.9-39.7); MKL took 15.7-16.6 ms for the product.
// With AVX2 (a Zen 3 core pair, 512 KiB of L2 each) panels of 256 and blocks in 3/4 of L2 rather than half (192
// rows rather than 96 at 512 columns, so each thread reads B from L3 half as often) made the LSTM's weight
// gradient product at batch 32, sizes 256, 3-11% faster than panels of 128 and 96-row blocks (A/B alternating in one
// process, three runs: 95-110 GFLOP/s against 95-101), where MKL ran at 115-123.
// Sharing A between several B saves packing it twice: grad_w_ih and grad_w_hh are one product of dG^T with
// [x | h_prev]. At batch 32, 128 steps, sizes 256 (two Zen 4 cores, with panels of 256 and blocks of 128 rows):
// an LSTM's grad_input took 10.3 ms this way and its weight gradients 21.1 ms, 88-90% of the cores' FMA peak,
// where torch's BLAS (MKL) took 11.5 and 23.6 ms for the same products; the micro-kernel alone reaches the peak,
// and packing A and B takes most of the rest (their sources come from memory).
//
// Each C element is summed in kGradPanel-long multiply-add chains, the chains added in K order, whatever the
// thread count: the result is bitwise reproducible and does not depend on the team.
#pragma once

#include <omp.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "gemm_kernel.h"
#include "vec_math.h"

namespace seqkernels {
namespace gemm {

// One B operand and where its product goes: row k of B is rows[k][0, n); C is (M x round_up(n, lanes)) with row
// stride ldc (the columns past n receive zeros).
template <typename T>
struct Operand {
  const T* const* rows;
  int64_t n;
  T* C;
  int64_t ldc;
};

// The size of one core's L2 cache (2 MiB if the system does not say).
inline int64_t l2_cache_bytes() {
  static const int64_t bytes = [] {
    const long v = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return v > 0 ? static_cast<int64_t>(v) : int64_t{2} << 20;
  }();
  return bytes;
}

namespace detail {

// K panel (see the top of the file): a column block's panel of float B takes 24 KiB with AVX-512 (3 vectors), 16
// KiB with AVX2 (2 vectors, panels of 256).
constexpr int64_t kGradPanel = SEQKERNELS_VEC_BYTES == 64 ? 128 : 256;
constexpr int64_t kBlockRows = 16 * kRowBlock;  // the fewest rows of C per block: 128 with AVX-512

// Rows of C per block: a multiple of kBlockRows (at least one) whose C rows of `cols` elements fill at most 3/4 of
// a core's L2.
template <typename T>
int64_t block_rows(int64_t cols) {
  const int64_t fit = gemm::l2_cache_bytes() * 3 / 4 / std::max<int64_t>(1, cols * static_cast<int64_t>(sizeof(T)));
  return std::max<int64_t>(1, fit / kBlockRows) * kBlockRows;
}

// Where each operand starts in the packed buffer, and (last) the buffer's size: K rows of round_up(n, lanes) each.
template <typename T>
std::vector<int64_t> operand_starts(const std::vector<Operand<T>>& ops, int64_t K) {
  std::vector<int64_t> starts{0};
  for (const auto& op : ops) starts.push_back(starts.back() + round_up(op.n, lanes<T>()) * K);
  return starts;
}

// B operands packed for parallel_matmul into `data` (packed_size elements), each in PackedB's layout: operand s's
// column block at n0 (nr vectors wide, w = nr * lanes) holds its K rows contiguously at block(s, n0), each w
// elements.
template <typename T>
class PackedOperands {
 public:
  PackedOperands(const std::vector<Operand<T>>& ops, int64_t K, T* data)
      : K_(K), data_(data), start_(operand_starts(ops, K)) {}

  // Packs rows [k0, k1) of every operand (threads pack disjoint row ranges).
  void pack(const std::vector<Operand<T>>& ops, int64_t k0, int64_t k1) {
    for (size_t s = 0; s < ops.size(); ++s) {
      const T* const* rows = ops[s].rows;
      pack_row_range(block(s, 0), K_, round_up(ops[s].n, lanes<T>()), kColBlock, ops[s].n,
                     [&](int64_t k) { return rows[k]; }, k0, k1);
    }
  }

  const T* block(size_t s, int64_t n0) const { return data_ + start_[s] + K_ * n0; }
  T* block(size_t s, int64_t n0) { return data_ + start_[s] + K_ * n0; }

 private:
  int64_t K_;
  T* data_;
  std::vector<int64_t> start_;
};

// Packs rows [m0, m0 + mn) x columns [k0, k0 + kn) of op(A) as panels of kRowBlock rows: panel p at
// dst + p * kRowBlock * kn, element (r, k) at [k * kRowBlock + r]; a last panel's missing rows are zeros.
template <typename T, bool TA>
void pack_a(const T* A, int64_t lda, int64_t m0, int64_t mn, int64_t k0, int64_t kn, T* dst) {
  constexpr int MR = kRowBlock;
  if constexpr (TA) {
    // Each k's mn elements are contiguous in the stored A (K x M). Blocks of 8 k: their rows' lines stay in L1
    // while every panel takes its part (8 rows far apart alias to the same L1 sets, and 8 fit its ways). Packing
    // a thread's 4096 x 512 share this way took 0.65 ms alone, against 1.05 panel by panel over all k.
    constexpr int64_t KB = 8;
    for (int64_t kb = 0; kb < kn; kb += KB) {
      const int64_t kend = std::min(kn, kb + KB);
      for (int64_t j = 0; j < mn; j += MR) {
        const int64_t rows = std::min<int64_t>(MR, mn - j);
        for (int64_t k = kb; k < kend; ++k) {
          T* p = dst + j * kn + k * MR;
          const T* src = A + (k0 + k) * lda + m0 + j;
          if (rows == MR) {
            std::memcpy(p, src, MR * sizeof(T));  // a constant size: one vector move, not a library call
          } else {
            for (int64_t r = 0; r < MR; ++r) p[r] = r < rows ? src[r] : T(0);
          }
        }
      }
    }
  } else {
    int64_t i = 0;
    if constexpr (std::is_same_v<T, float> && MR == 8) {
      // 16 rows at a time through 16 x 16 register transposes, each transposed row split between two panels
      for (; i + 16 <= mn; i += 16) {
        T* p0 = dst + i * kn;
        T* p1 = p0 + MR * kn;
        int64_t k = 0;
        for (; k + 16 <= kn; k += 16) {
          vec_math::vfloat16 x[16];
          for (int r = 0; r < 16; ++r) std::memcpy(&x[r], A + (m0 + i + r) * lda + k0 + k, sizeof x[r]);
          vec_math::transpose16(x);
          for (int q = 0; q < 16; ++q) {
            std::memcpy(p0 + (k + q) * MR, &x[q], MR * sizeof(T));
            std::memcpy(p1 + (k + q) * MR, reinterpret_cast<const T*>(&x[q]) + MR, MR * sizeof(T));
          }
        }
        for (; k < kn; ++k)
          for (int r = 0; r < 16; ++r) (r < MR ? p0 : p1)[k * MR + r % MR] = A[(m0 + i + r) * lda + k0 + k];
      }
    }
    for (; i < mn; i += MR) {
      T* p = dst + i * kn;
      const int64_t rows = std::min<int64_t>(MR, mn - i);
      for (int64_t k = 0; k < kn; ++k)
        for (int64_t r = 0; r < MR; ++r) p[k * MR + r] = r < rows ? A[(m0 + i + r) * lda + k0 + k] : T(0);
    }
  }
}

}  // namespace detail

// Elements of the buffer parallel_matmul packs the operands into.
template <typename T>
int64_t packed_size(const std::vector<Operand<T>>& ops, int64_t K) {
  return detail::operand_starts(ops, K).back();
}

// C_s = op(A) @ B_s for every operand s (see the top of the file). A is (M x K) with row stride lda, or with
// `a_transposed` stored as (K x M): C = A^T B without a copy of A. `pack` holds packed_size(ops, K) elements
// (cache-line aligned). Runs in an OpenMP team of up to `threads`.
template <typename T>
void parallel_matmul(int64_t M, int64_t K, const T* A, int64_t lda, bool a_transposed,
                     const std::vector<Operand<T>>& ops, T* pack, int threads) {
  constexpr int64_t L = lanes<T>(), MR = kRowBlock, KC = detail::kGradPanel;
  if (M == 0) return;
  if (K == 0) {
    for (const auto& op : ops)
      for (int64_t m = 0; m < M; ++m) std::fill(op.C + m * op.ldc, op.C + m * op.ldc + round_up(op.n, L), T(0));
    return;
  }
  detail::PackedOperands<T> packed(ops, K, pack);
  int64_t cols = 0;
  for (const auto& op : ops) cols += round_up(op.n, L);
  const int64_t MC = detail::block_rows<T>(cols);
  const int team = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, (M + MR - 1) / MR)));
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    packed.pack(ops, K * tid / nt, K * (tid + 1) / nt);
#pragma omp barrier
    const int64_t panels = (M + MR - 1) / MR;
    const int64_t m_begin = std::min(M, panels * tid / nt * MR), m_end = std::min(M, panels * (tid + 1) / nt * MR);
    UninitBuffer<T> ap(round_up(std::min(MC, m_end - m_begin), MR) * std::min(K, KC));  // whole panels of MR rows
    for (int64_t ic = m_begin; ic < m_end; ic += MC) {
      const int64_t mn = std::min(MC, m_end - ic);
      for (int64_t pc = 0; pc < K; pc += KC) {
        const int64_t kn = std::min(KC, K - pc);
        if (a_transposed)
          detail::pack_a<T, true>(A, lda, ic, mn, pc, kn, ap.data());
        else
          detail::pack_a<T, false>(A, lda, ic, mn, pc, kn, ap.data());
        for (size_t s = 0; s < ops.size(); ++s) {
          const Operand<T>& op = ops[s];
          for_each_column_block<T>(round_up(op.n, L), kColBlock, [&](int64_t n0, int nr) {
            const T* b = packed.block(s, n0) + pc * nr * L;
            for (int64_t i = 0; i < mn; i += MR)
              column_block_nr<T, true, 0>(nr, std::min(MR, mn - i), kn, ap.data() + i * kn, MR, b, nr * L,
                                          op.C + (ic + i) * op.ldc + n0, op.ldc, pc > 0);
          });
        }
      }
    }
  }
}

}  // namespace gemm
}  // namespace seqkernels
