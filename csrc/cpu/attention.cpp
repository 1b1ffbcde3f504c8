// Flash-style scaled-dot-product attention on the CPU, forward and backward.
//
// Layout (prepared by seqkernels/ops/attention): q (Z, Hq, L, E), k (Z, Hkv, S, E), v (Z, Hkv, S, Ev), contiguous,
// in the compute type (float32 for float32/bfloat16, float64); query head h reads key/value head h / (Hq / Hkv)
// (grouped-query attention; Hkv = Hq is plain attention). The optional mask is a (Z, Hq, L, S) view of the
// user's mask through broadcast strides (stride 0 where it broadcasts): it is read tile by tile, never expanded.
// A bool mask keeps the entries that are true; a float mask is added to the scaled scores.
//
// Forward: each task takes one (z, h, tile of kQueryTile queries) and walks the key tiles with an online
// softmax, so the L x S score matrix never exists; with is_causal (top-left aligned, as torch) the keys past the
// tile's last query are not visited. Rows that see no key give 0. Scores are computed transposed (keys x
// queries), so K and V are read as stored and each query's softmax runs down a column in plain vector operations
// (see attention_forward). The softmax runs in base 2, as FlashAttention's: log2(e) is folded into the query's
// scale (and into a float mask as it is added), so each probability is one 2^x, cheaper than e^x. It saves each
// row's log-sum-exp in those units: lse = log2(sum 2^x).
// Backward (FlashAttention-2's, without atomics): D = rowsum(dO * O), probabilities recomputed from the
// log-sum-exp. With enough (batch, key/value head) pairs to keep every thread busy, one task owns a whole
// key/value head and its group of query heads and accumulates dQ, dK and dV together (five matmuls per pair of
// tiles). Otherwise two passes split the work finer: one over key tiles for dK and dV, one over query tiles for
// dQ (seven matmuls per pair: S and dP are recomputed). Either way the float mask's gradient is dS, each output
// element has one owner and a fixed summation order: deterministic.
// Dropout: probability (z, h, l, s) is kept when the counter-based hash of (seed, its flat index in (Z, Hq, L, S))
// gives u >= p (seqkernels.ops.attention.reference.dropout_keep computes the same), and kept ones are scaled by
// 1 / (1 - p). Nothing is stored: the backward regenerates the same decisions from the seed.
// Operands are read as stored where they can be: only query tiles are transposed, once per tile rather than per
// pair of tiles (the two-pass backward transposes Q and dO once per call), and rows are padded to whole vectors
// only where a head dim needs it.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "gemm_kernel.h"
#include "vec_math.h"

namespace seqkernels {
namespace {

using at::Tensor;
using gemm::round_up;

// Queries per tile: 3 vectors of float32, so the O += P V matmul's rows split evenly into 6-row register tiles
// (with 64, a 4-row remainder cost about 3%); 64 and 96 measured slower overall.
constexpr int64_t kQueryTile = 48;
constexpr double kLog2e = 1.4426950408889634;

// Keys per tile in the forward: 96 float32 with AVX-512 (the rows of the transposed score tile: 12 register
// tiles of 8 rows, and the depth of O += P V); 64 measured the same.
template <typename T>
constexpr int64_t key_tile() {
  return 2 * gemm::kColBlock * gemm::lanes<T>();
}

// Keys per tile in the backward: 1.5 forward tiles (144 float32). Fewer, longer key tiles per query tile measured
// 3-5% faster in training than 96 (and than 192).
template <typename T>
constexpr int64_t backward_key_tile() {
  return 3 * key_tile<T>() / 2;
}

struct Shape {
  int64_t Z, Hq, Hkv, L, S, E, Ev, group;
};

// Uniform in [0, 1) with 24 bits, from a SplitMix64 mix of seed and counter.
inline double dropout_uniform(uint64_t seed, uint64_t counter) {
  uint64_t z = counter + seed * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<double>(z >> 40) * (1.0 / 16777216.0);
}

struct Dropout {
  double p = 0.0;
  uint64_t seed = 0;
  double scale = 1.0;  // 1 / (1 - p), for the kept ones
  bool active() const { return p > 0.0; }
};

// The dropout factors of probabilities counter0 + i * stride, i < n (1 / (1 - p) when kept, else 0) into z:
// stride S walks down a key's column of queries. Forward and backward both draw them here. (Seed, p and scale are read into locals: read through `dr` inside
// the loop, they kept GCC from vectorizing the hash, which made dropout 1.7 times slower.)
template <typename T>
void dropout_factors(const Dropout& dr, uint64_t counter0, uint64_t stride, int64_t n, T* __restrict__ z) {
  const uint64_t seed = dr.seed;
  const double p = dr.p;
  const T scale = static_cast<T>(dr.scale);
  for (int64_t i = 0; i < n; ++i) z[i] = dropout_uniform(seed, counter0 + i * stride) >= p ? scale : T(0);
}

// The optional mask, read through its (Z, Hq, L, S) strides.
template <typename T>
struct Mask {
  const bool* b = nullptr;
  const T* f = nullptr;
  int64_t sz = 0, sh = 0, sl = 0, ss = 0;
  bool any() const { return b != nullptr || f != nullptr; }
};

// dst[c][r] = src[r][c] * alpha for r < rows, c < cols (dst row stride ldd); columns rows .. rows_pad zeroed.
template <typename T>
void transpose(const T* src, int64_t lds, int64_t rows, int64_t cols, T alpha, T* dst, int64_t ldd,
               int64_t rows_pad) {
  for (int64_t c = 0; c < cols; ++c) std::fill(dst + c * ldd + rows, dst + c * ldd + rows_pad, T(0));
  vec_math::transpose(rows, cols, [&](int64_t r) { return src + r * lds; }, dst, ldd, alpha);
}

// dst (rows x ldd) = src (rows x cols, row stride lds), columns past cols zeroed.
template <typename T>
void copy_rows(const T* src, int64_t lds, int64_t rows, int64_t cols, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < rows; ++r) {
    std::copy(src + r * lds, src + r * lds + cols, dst + r * ldd);
    for (int64_t c = cols; c < ldd; ++c) dst[r * ldd + c] = T(0);
  }
}

// Per-head packed copies of a (Z * heads, n, dim) tensor, in parallel over heads: transposed and scaled by alpha
// (heads, dim, n_pad), or padded rows (heads, n, dim_pad). Padding is zero.
template <typename T>
Tensor pack_heads_transposed(const T* src, int64_t heads, int64_t n, int64_t dim, int64_t n_pad, T alpha,
                             const Tensor& like) {
  Tensor out = at::empty({heads, dim, n_pad}, like.options());
  T* o = out.data_ptr<T>();
  at::parallel_for(0, heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) transpose(src + h * n * dim, dim, n, dim, alpha, o + h * dim * n_pad, n_pad, n_pad);
  });
  return out;
}

template <typename T>
Tensor pack_heads_rows(const T* src, int64_t heads, int64_t n, int64_t dim, int64_t dim_pad, const Tensor& like) {
  Tensor out = at::empty({heads, n, dim_pad}, like.options());
  T* o = out.data_ptr<T>();
  at::parallel_for(0, heads, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) copy_rows(src + h * n * dim, dim, n, dim, o + h * n * dim_pad, dim_pad);
  });
  return out;
}

// Scores (base 2) transposed, St[c][r] for keys [s0, s0 + cols) x query rows [l0, l0 + rows) of head (z, h):
// masks applied in place (a float mask times log2(e); a bool mask as -inf where false). Causal: key s0 + c is
// hidden from the queries before it, a prefix of each key's row. A mask stored along keys (the usual case) is
// read in square blocks of contiguous rows (16 or 8 wide: the registers' width), transposed in registers; one
// that broadcasts over queries (a key padding mask) is one value per key.
template <typename T>
void apply_masks_transposed(T* St, int64_t ld, int64_t rows, int64_t cols, int64_t z, int64_t h, int64_t l0,
                            int64_t s0, bool causal, const Mask<T>& m) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  if (causal)
    for (int64_t c = 0; c < cols; ++c) std::fill(St + c * ld, St + c * ld + std::clamp<int64_t>(s0 + c - l0, 0, rows), neg_inf);
  if (!m.any()) return;
  const int64_t base = z * m.sz + h * m.sh + l0 * m.sl + s0 * m.ss;  // element (r, c) at base + r * sl + c * ss
  auto scalar = [&](int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t c_end) {
    for (int64_t c = c_begin; c < c_end; ++c) {
      T* row = St + c * ld;
      const int64_t at = base + c * m.ss;
      if (m.sl == 0) {
        if (m.b) {
          if (!m.b[at]) std::fill(row + r_begin, row + r_end, neg_inf);
        } else {
          const T add = m.f[at] * T(kLog2e);
          for (int64_t r = r_begin; r < r_end; ++r) row[r] += add;
        }
      } else if (m.b) {
        for (int64_t r = r_begin; r < r_end; ++r)
          if (!m.b[at + r * m.sl]) row[r] = neg_inf;
      } else {
        for (int64_t r = r_begin; r < r_end; ++r) row[r] += m.f[at + r * m.sl] * T(kLog2e);
      }
    }
  };
  int64_t r16 = 0, c16 = 0;
  if constexpr (std::is_same_v<T, float>) {
    using V = vec_math::vnative;
    using VI = vec_math::vinative;
    constexpr int64_t W = vec_math::kNativeLanes;  // blocks of W x W: the registers' width
    if (m.ss == 1 && m.sl != 0) {
      r16 = rows / W * W;
      c16 = cols / W * W;
      typedef uint8_t vbytes __attribute__((vector_size(W)));
      const V minus_inf = V{} - __builtin_inff();
      for (int64_t r0 = 0; r0 < r16; r0 += W)
        for (int64_t c0 = 0; c0 < c16; c0 += W) {
          V x[W];  // x[i]: query r0 + i, keys c0 .. c0 + W - 1, as additive values
          for (int i = 0; i < W; ++i) {
            const int64_t at = base + (r0 + i) * m.sl + c0;
            if (m.b) {
              vbytes keep;
              std::memcpy(&keep, m.b + at, sizeof keep);
              const VI kept = __builtin_convertvector(keep != 0, VI);  // -1 or 0 per lane
              x[i] = (V)(~kept & (VI)minus_inf);                        // kept: 0; masked out: -inf
            } else {
              std::memcpy(&x[i], m.f + at, sizeof x[i]);
              x[i] *= float(kLog2e);
            }
          }
          vec_math::transpose_native(x);
          for (int i = 0; i < W; ++i) {
            float* dst = St + (c0 + i) * ld + r0;
            V sv;
            std::memcpy(&sv, dst, sizeof sv);
            sv += x[i];
            std::memcpy(dst, &sv, sizeof sv);
          }
        }
    }
  }
  scalar(0, r16, c16, cols);  // what the blocks left: the right edge, then the bottom rows
  scalar(r16, rows, 0, cols);
}

// One key tile of the online softmax, for n query columns (a multiple of 16) of St (cols x n, row stride ld):
// the running max m and sum l of each query are updated, St becomes 2^(St - m) (0 for queries that have seen no
// key yet), and alpha gets the factor by which each query's earlier output must be rescaled. The work runs down
// the columns, so a query's max and sum are plain vector operations: no horizontal reductions.
template <typename T>
void softmax_tile(T* St, int64_t ld, int64_t cols, int64_t n, T* m, T* l, T* alpha) {
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t r = 0; r < n; ++r) {
    T mx = m[r];
    for (int64_t c = 0; c < cols; ++c) mx = std::max(mx, St[c * ld + r]);
    const T shift = mx == neg_inf ? T(0) : mx;  // no key yet: 2^-inf = 0 everywhere
    alpha[r] = m[r] == mx ? T(1) : std::exp2(m[r] - shift);
    T sum = T(0);
    for (int64_t c = 0; c < cols; ++c) sum += (St[c * ld + r] = std::exp2(St[c * ld + r] - shift));
    l[r] = l[r] * alpha[r] + sum;
    m[r] = mx;
  }
}

// float: the NV vectors of query columns side by side (vectors of the registers' width: vec_math::vnative), one
// key row at a time, so the max and the sum run as NV (the max as 2 NV) independent chains rather than one chain
// per vector, which latency bound the max pass.
template <int NV>
void softmax_tile_float(float* St, int64_t ld, int64_t cols, float* m, float* l, float* alpha) {
  using V = vec_math::vnative;
  constexpr int64_t W = vec_math::kNativeLanes;
  const V neg_inf = V{} - __builtin_inff();
  V mo[NV], mx[NV], mx2[NV], shift[NV], acc[NV];
  for (int j = 0; j < NV; ++j) {
    std::memcpy(&mo[j], m + W * j, sizeof mo[j]);
    mx[j] = mo[j];
    mx2[j] = neg_inf;
    acc[j] = V{};
  }
  int64_t c = 0;
  for (; c + 2 <= cols; c += 2)
    for (int j = 0; j < NV; ++j) {
      V v, w;
      std::memcpy(&v, St + c * ld + W * j, sizeof v);
      std::memcpy(&w, St + (c + 1) * ld + W * j, sizeof w);
      mx[j] = v > mx[j] ? v : mx[j];
      mx2[j] = w > mx2[j] ? w : mx2[j];
    }
  for (int j = 0; j < NV; ++j) {
    if (c < cols) {
      V v;
      std::memcpy(&v, St + c * ld + W * j, sizeof v);
      mx[j] = v > mx[j] ? v : mx[j];
    }
    mx[j] = mx2[j] > mx[j] ? mx2[j] : mx[j];
    shift[j] = mx[j] == neg_inf ? V{} : mx[j];  // no key yet: 2^-inf = 0 everywhere
  }
  for (c = 0; c < cols; ++c)
    for (int j = 0; j < NV; ++j) {
      V v;
      std::memcpy(&v, St + c * ld + W * j, sizeof v);
      v = vec_math::exp2_nonpositive(v - shift[j]);
      std::memcpy(St + c * ld + W * j, &v, sizeof v);
      acc[j] += v;
    }
  for (int j = 0; j < NV; ++j) {
    const V a = mo[j] == mx[j] ? V{} + 1.0f : vec_math::exp2_nonpositive(mo[j] - shift[j]);
    V lo;
    std::memcpy(&lo, l + W * j, sizeof lo);
    lo = lo * a + acc[j];
    std::memcpy(l + W * j, &lo, sizeof lo);
    std::memcpy(m + W * j, &mx[j], sizeof mx[j]);
    std::memcpy(alpha + W * j, &a, sizeof a);
  }
}

template <>
void softmax_tile<float>(float* St, int64_t ld, int64_t cols, int64_t n, float* m, float* l, float* alpha) {
  static_assert(kQueryTile == 48, "softmax_tile<float> handles 1 to 3 vectors of 16 query columns");
  switch (n / 16) {
    case 1: softmax_tile_float<16 / vec_math::kNativeLanes>(St, ld, cols, m, l, alpha); break;
    case 2: softmax_tile_float<32 / vec_math::kNativeLanes>(St, ld, cols, m, l, alpha); break;
    default: softmax_tile_float<48 / vec_math::kNativeLanes>(St, ld, cols, m, l, alpha); break;
  }
}

// Forward. Each task takes one (z, h, tile of kQueryTile queries) and computes, per key tile, the scores
// transposed, St = K_tile (Q_tile * scale * log2 e)^T (keys x queries): K is read as it is stored, only the
// query tile is transposed (once per task); the softmax runs down St's columns; O += P V reads P = St^T through
// the transposed-A matmul. V is read as stored too, unless its rows need padding to whole vectors.
template <typename T>
void attention_forward(const Shape& d, const T* q, const T* k, const T* v, const Mask<T>& mask, bool causal, T scale,
                       const Dropout& dr, T* out, T* lse, const Tensor& like) {
  constexpr int64_t L_ = gemm::lanes<T>(), Bc = key_tile<T>(), Nq = kQueryTile;
  constexpr T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t q_tiles = (d.L + Nq - 1) / Nq;
  const int64_t Evp = round_up(d.Ev, L_);
  Tensor Vp_all;
  if (Evp != d.Ev) Vp_all = pack_heads_rows(v, d.Z * d.Hkv, d.S, d.Ev, Evp, like);  // (heads, S, Evp)
  const T* Vp_base = Evp != d.Ev ? Vp_all.data_ptr<T>() : v;
  at::parallel_for(0, d.Z * d.Hq * q_tiles, 1, [&](int64_t begin, int64_t end) {
    gemm::Buffer<T> Qt(d.E * Nq), St(Bc * Nq), O(Nq * Evp), m(Nq), l(Nq), alpha(Nq), Z(Nq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % q_tiles, zh = task / q_tiles, z = zh / d.Hq, h = zh % d.Hq;
      const int64_t zhk = z * d.Hkv + h / d.group, l0 = qt * Nq, rows = std::min(Nq, d.L - l0);
      const int64_t n = round_up(rows, 16);  // query columns computed: whole vectors
      const T* Kh = k + zhk * d.S * d.E;
      const T* Vh = Vp_base + zhk * d.S * Evp;
      const T* qh = q + ((z * d.Hq + h) * d.L + l0) * d.E;
      transpose(qh, d.E, rows, d.E, T(scale * kLog2e), Qt.data(), Nq, n);
      std::fill(m.begin(), m.end(), neg_inf);
      std::fill(l.begin(), l.end(), T(0));
      std::fill(O.begin(), O.end(), T(0));
      const int64_t s_end = causal ? std::min(d.S, l0 + rows) : d.S;  // causal: later keys are never seen
      for (int64_t s0 = 0; s0 < s_end; s0 += Bc) {
        const int64_t cols = std::min(Bc, s_end - s0);
        gemm::matmul<T>(cols, n, d.E, Kh + s0 * d.E, d.E, Qt.data(), Nq, St.data(), Nq);
        apply_masks_transposed(St.data(), Nq, rows, cols, z, h, l0, s0, causal, mask);
        softmax_tile(St.data(), Nq, cols, n, m.data(), l.data(), alpha.data());  // the sum counts dropped ones too
        if (dr.active())
          for (int64_t c = 0; c < cols; ++c) {
            dropout_factors(dr, static_cast<uint64_t>(((z * d.Hq + h) * d.L + l0) * d.S + s0 + c), d.S, rows, Z.data());
            for (int64_t r = 0; r < rows; ++r) St[c * Nq + r] *= Z[r];
          }
        for (int64_t r = 0; r < rows; ++r)
          if (alpha[r] != T(1))
            for (int64_t e = 0; e < Evp; ++e) O[r * Evp + e] *= alpha[r];
        gemm::matmul<T, true>(rows, Evp, cols, St.data(), Nq, Vh + s0 * Evp, Evp, O.data(), Evp, /*accumulate=*/true);
      }
      T* oh = out + ((z * d.Hq + h) * d.L + l0) * d.Ev;
      T* lh = lse + (z * d.Hq + h) * d.L + l0;
      for (int64_t r = 0; r < rows; ++r) {
        const T inv = l[r] > T(0) ? T(1) / l[r] : T(0);
        for (int64_t e = 0; e < d.Ev; ++e) oh[r * d.Ev + e] = O[r * Evp + e] * inv;
        lh[r] = l[r] > T(0) ? m[r] + std::log2(l[r]) : neg_inf;
      }
    }
  });
}

// Backward of one pair of tiles, transposed (cols keys x n query columns, row stride ld), from the base-2
// scores S^T and dP^T = V dO^T: P = 2^(S - shift) into St and, unless with_dS is false, dS = P * (dP - D) into
// dPt. shift is each query's lse, or +inf for a query that sees no key (and for padding columns): P = 0 there.
template <typename T>
void probabilities_and_dS(T* St, T* dPt, int64_t ld, int64_t cols, int64_t n, const T* shift, const T* D,
                          bool with_dS) {
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < n; ++r) {
      const T P = St[c * ld + r] = std::exp2(St[c * ld + r] - shift[r]);
      if (with_dS) dPt[c * ld + r] = P * (dPt[c * ld + r] - D[r]);
    }
}

template <>
void probabilities_and_dS<float>(float* St, float* dPt, int64_t ld, int64_t cols, int64_t n, const float* shift,
                                 const float* D, bool with_dS) {
  using V = vec_math::vnative;
  for (int64_t r = 0; r < n; r += vec_math::kNativeLanes) {
    V sh, dr;
    std::memcpy(&sh, shift + r, sizeof sh);
    std::memcpy(&dr, D + r, sizeof dr);
    for (int64_t c = 0; c < cols; ++c) {
      V x, dp;
      std::memcpy(&x, St + c * ld + r, sizeof x);
      x = vec_math::exp2_nonpositive(x - sh);  // S - lse: <= 0 up to rounding; -inf and NaN-free with shift +inf
      std::memcpy(St + c * ld + r, &x, sizeof x);
      if (!with_dS) continue;
      std::memcpy(&dp, dPt + c * ld + r, sizeof dp);
      dp = x * (dp - dr);
      std::memcpy(dPt + c * ld + r, &dp, sizeof dp);
    }
  }
}

// Backward (see the top of the file), in the forward's transposed form: per pair of tiles, S^T = K Qt and
// dP^T = V dOt, where Qt = (Q * scale * log2 e)^T and dOt = dO^T are the query tile's operands (kQueryTile
// columns); then dV += P^T dO and dK += dS^T Q read the (keys x queries) tiles as stored, and dQ += dS K reads
// dS^T through the transposed-A matmul. K, V, Q and dO are read as stored, unless a head dim needs padding to
// whole vectors. dK comes out of dS^T Q times scale, dQ out of dS K times scale.
template <typename T>
void attention_backward(const Shape& d, const T* q, const T* k, const T* v, const Mask<T>& mask, bool causal,
                        T scale, const Dropout& dr, const T* dout, const T* lse, const T* Drow, T* dq, T* dk, T* dv,
                        T* dmask, const Tensor& like) {
  constexpr int64_t L_ = gemm::lanes<T>(), Bc = backward_key_tile<T>(), Nq = kQueryTile;
  constexpr T inf = std::numeric_limits<T>::infinity();
  const int64_t q_tiles = (d.L + Nq - 1) / Nq, k_tiles = (d.S + Bc - 1) / Bc;
  const int64_t Ep = round_up(d.E, L_), Evp = round_up(d.Ev, L_);
  Tensor Kp_all, Qp_all, dOp_all;  // padded rows, only where a head dim is not whole vectors
  if (Ep != d.E) {
    Kp_all = pack_heads_rows(k, d.Z * d.Hkv, d.S, d.E, Ep, like);
    Qp_all = pack_heads_rows(q, d.Z * d.Hq, d.L, d.E, Ep, like);
  }
  if (Evp != d.Ev) dOp_all = pack_heads_rows(dout, d.Z * d.Hq, d.L, d.Ev, Evp, like);
  const T* Kr = Ep != d.E ? Kp_all.data_ptr<T>() : k;      // (Z * Hkv, S, Ep)
  const T* Qr = Ep != d.E ? Qp_all.data_ptr<T>() : q;      // (Z * Hq, L, Ep)
  const T* dOr = Evp != d.Ev ? dOp_all.data_ptr<T>() : dout;  // (Z * Hq, L, Evp)

  // A query tile's operands: Qt (E x ld) and dOt (Ev x ld), and per column the softmax shift and D.
  struct QueryTile {
    const T* Qt;
    const T* dOt;
    int64_t ld;
    T shift[Nq], D[Nq];
  };
  auto load_lse_and_D = [&](int64_t row0, int64_t rows, QueryTile& t) {
    for (int64_t r = 0; r < Nq; ++r) {
      const T l = r < rows ? lse[row0 + r] : -inf;
      t.shift[r] = l == -inf ? inf : l;
      t.D[r] = r < rows ? Drow[row0 + r] : T(0);
    }
  };
  // One pair of tiles (query rows [l0, l0 + rows) of head (z, h), keys [s0, s0 + cols)): P^T into St, dS^T into
  // dPt (and into the float mask's gradient when write_dmask). Returns the (dropped) probabilities for dV: St, or
  // with dropout Pdt. St, dPt, Pdt: Bc x Nq.
  auto tile_gradients = [&](const QueryTile& t, int64_t z, int64_t h, int64_t l0, int64_t rows, int64_t s0,
                            int64_t cols, T* St, T* dPt, T* Pdt, bool write_dmask) -> const T* {
    const int64_t zhk = z * d.Hkv + h / d.group, row0 = (z * d.Hq + h) * d.L + l0, n = round_up(rows, 16);
    gemm::matmul<T>(cols, n, d.E, k + (zhk * d.S + s0) * d.E, d.E, t.Qt, t.ld, St, Nq);
    apply_masks_transposed(St, Nq, rows, cols, z, h, l0, s0, causal, mask);
    gemm::matmul<T>(cols, n, d.Ev, v + (zhk * d.S + s0) * d.Ev, d.Ev, t.dOt, t.ld, dPt, Nq);
    probabilities_and_dS(St, dPt, Nq, cols, n, t.shift, t.D, !dr.active());
    if (dr.active()) {
      T Z[Nq];
      for (int64_t c = 0; c < cols; ++c) {
        dropout_factors(dr, static_cast<uint64_t>(row0 * d.S + s0 + c), d.S, rows, Z);
        T *P = St + c * Nq, *dS = dPt + c * Nq, *Pd = Pdt + c * Nq;
        for (int64_t r = 0; r < rows; ++r) {
          dS[r] = P[r] * (dS[r] * Z[r] - t.D[r]);
          Pd[r] = P[r] * Z[r];
        }
      }
    }
    if (dmask && write_dmask)
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < cols; ++c) dmask[(row0 + r) * d.S + s0 + c] = dPt[c * Nq + r];
    return dr.active() ? Pdt : St;
  };
  // dQ += dS K for keys [s0, s0 + cols) of key/value head zhk.
  auto query_gradient = [&](const T* dSt, int64_t rows, int64_t zhk, int64_t s0, int64_t cols, T* dQ) {
    gemm::matmul<T, true>(rows, Ep, cols, dSt, Nq, Kr + (zhk * d.S + s0) * Ep, Ep, dQ, Ep, true);
  };
  // dV += P^T dO and dK += dS^T Q for keys [s0, s0 + cols) (rows of dV and dK from their first row).
  auto key_gradients = [&](const T* P, const T* dSt, int64_t row0, int64_t rows, int64_t cols, T* dV, T* dK) {
    gemm::matmul<T>(cols, Evp, rows, P, Nq, dOr + row0 * Evp, Evp, dV, Evp, true);
    gemm::matmul<T>(cols, Ep, rows, dSt, Nq, Qr + row0 * Ep, Ep, dK, Ep, true);
  };
  auto store = [](const T* src, int64_t ld, int64_t rows, int64_t cols, T alpha, T* dst) {
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = src[r * ld + c] * alpha;
  };

  if (d.Z * d.Hkv >= 2 * at::get_num_threads()) {  // one task per key/value head: no recomputation
    at::parallel_for(0, d.Z * d.Hkv, 1, [&](int64_t begin, int64_t end) {
      gemm::Buffer<T> Qt(d.E * Nq), dOt(d.Ev * Nq), St(Bc * Nq), dPt(Bc * Nq), Pdt(Bc * Nq), dQ(Nq * Ep);
      gemm::Buffer<T> dK(d.S * Ep), dV(d.S * Evp);
      QueryTile t{Qt.data(), dOt.data(), Nq, {}, {}};
      for (int64_t zhk = begin; zhk < end; ++zhk) {
        const int64_t z = zhk / d.Hkv, hk = zhk % d.Hkv;
        std::fill(dK.begin(), dK.end(), T(0));
        std::fill(dV.begin(), dV.end(), T(0));
        for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
          for (int64_t qt = 0; qt < q_tiles; ++qt) {
            const int64_t l0 = qt * Nq, rows = std::min(Nq, d.L - l0), n = round_up(rows, 16);
            const int64_t row0 = (z * d.Hq + h) * d.L + l0;
            transpose(q + row0 * d.E, d.E, rows, d.E, T(scale * kLog2e), Qt.data(), Nq, n);
            transpose(dout + row0 * d.Ev, d.Ev, rows, d.Ev, T(1), dOt.data(), Nq, n);
            load_lse_and_D(row0, rows, t);
            std::fill(dQ.begin(), dQ.end(), T(0));
            const int64_t s_end = causal ? std::min(d.S, l0 + rows) : d.S;
            for (int64_t s0 = 0; s0 < s_end; s0 += Bc) {
              const int64_t cols = std::min(Bc, s_end - s0);
              const T* P = tile_gradients(t, z, h, l0, rows, s0, cols, St.data(), dPt.data(), Pdt.data(), true);
              key_gradients(P, dPt.data(), row0, rows, cols, dV.data() + s0 * Evp, dK.data() + s0 * Ep);
              query_gradient(dPt.data(), rows, zhk, s0, cols, dQ.data());
            }
            store(dQ.data(), Ep, rows, d.E, scale, dq + row0 * d.E);
          }
        }
        store(dK.data(), Ep, d.S, d.E, scale, dk + zhk * d.S * d.E);
        store(dV.data(), Evp, d.S, d.Ev, T(1), dv + zhk * d.S * d.Ev);
      }
    });
    return;
  }

  // Two passes, with the query operands packed once for both: (Z * Hq, E or Ev, Lp), transposed, zero-padded.
  const int64_t Lp = round_up(d.L, Nq);
  const Tensor Qt_all = pack_heads_transposed(q, d.Z * d.Hq, d.L, d.E, Lp, T(scale * kLog2e), like);
  const Tensor dOt_all = pack_heads_transposed(dout, d.Z * d.Hq, d.L, d.Ev, Lp, T(1), like);
  auto query_tile = [&](int64_t zh, int64_t l0, int64_t rows, QueryTile& t) {
    t.Qt = Qt_all.data_ptr<T>() + zh * d.E * Lp + l0;
    t.dOt = dOt_all.data_ptr<T>() + zh * d.Ev * Lp + l0;
    t.ld = Lp;
    load_lse_and_D(zh * d.L + l0, rows, t);
  };

  // Pass 1: dK, dV per (z, key/value head, key tile).
  at::parallel_for(0, d.Z * d.Hkv * k_tiles, 1, [&](int64_t begin, int64_t end) {
    gemm::Buffer<T> St(Bc * Nq), dPt(Bc * Nq), Pdt(Bc * Nq), dK(Bc * Ep), dV(Bc * Evp);
    QueryTile t{};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kt = task % k_tiles, zhk = task / k_tiles, z = zhk / d.Hkv, hk = zhk % d.Hkv;
      const int64_t s0 = kt * Bc, cols = std::min(Bc, d.S - s0);
      std::fill(dK.begin(), dK.end(), T(0));
      std::fill(dV.begin(), dV.end(), T(0));
      for (int64_t h = hk * d.group; h < (hk + 1) * d.group; ++h) {
        for (int64_t qt = 0; qt < q_tiles; ++qt) {
          const int64_t l0 = qt * Nq, rows = std::min(Nq, d.L - l0);
          if (causal && l0 + rows - 1 < s0) continue;  // every query of the tile precedes every key of ours
          query_tile(z * d.Hq + h, l0, rows, t);
          const T* P = tile_gradients(t, z, h, l0, rows, s0, cols, St.data(), dPt.data(), Pdt.data(), false);
          key_gradients(P, dPt.data(), (z * d.Hq + h) * d.L + l0, rows, cols, dV.data(), dK.data());
        }
      }
      store(dK.data(), Ep, cols, d.E, scale, dk + (zhk * d.S + s0) * d.E);
      store(dV.data(), Evp, cols, d.Ev, T(1), dv + (zhk * d.S + s0) * d.Ev);
    }
  });

  // Pass 2: dQ (and the float mask's gradient) per (z, query head, query tile).
  at::parallel_for(0, d.Z * d.Hq * q_tiles, 1, [&](int64_t begin, int64_t end) {
    gemm::Buffer<T> St(Bc * Nq), dPt(Bc * Nq), Pdt(Bc * Nq), dQ(Nq * Ep);
    QueryTile t{};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qt = task % q_tiles, zh = task / q_tiles, z = zh / d.Hq, h = zh % d.Hq;
      const int64_t zhk = z * d.Hkv + h / d.group, l0 = qt * Nq, rows = std::min(Nq, d.L - l0);
      query_tile(zh, l0, rows, t);
      std::fill(dQ.begin(), dQ.end(), T(0));
      const int64_t s_end = causal ? std::min(d.S, l0 + rows) : d.S;
      for (int64_t s0 = 0; s0 < s_end; s0 += Bc) {
        const int64_t cols = std::min(Bc, s_end - s0);
        tile_gradients(t, z, h, l0, rows, s0, cols, St.data(), dPt.data(), Pdt.data(), true);
        query_gradient(dPt.data(), rows, zhk, s0, cols, dQ.data());
      }
      store(dQ.data(), Ep, rows, d.E, scale, dq + (zh * d.L + l0) * d.E);
    }
  });
}

// D[r] = rowsum(dO * O) for rows [r0, r0 + n), n <= 16, in exactly gemm::dot_like_matmul's order (which is the
// order in which dP = dO V^T is summed, so D cancels dP exactly where a probability is exactly one). float, 16
// full rows: the rows side by side in the lanes of one vector, their columns brought together by in-register
// transposes (of the registers' width: 16 or 8 rows a pass), so each row's chain of multiply-adds runs as it does
// in the scalar loop.
template <typename T>
void row_dots(const T* g, const T* o, int64_t r0, int64_t n, int64_t Ev, T* D) {
  if constexpr (std::is_same_v<T, float>) {
    if (n == 16) {
      using V = vec_math::vnative;
      constexpr int W = vec_math::kNativeLanes;  // rows per pass: the registers' width
      for (int64_t q0 = r0; q0 < r0 + 16; q0 += W) {
        V total{}, acc{};
        for (int64_t e0 = 0; e0 < Ev; e0 += W) {
          const int64_t w = std::min<int64_t>(W, Ev - e0);
          V x[W], y[W];
          for (int i = 0; i < W; ++i) {
            x[i] = vec_math::load_native(g + (q0 + i) * Ev + e0, w);
            y[i] = vec_math::load_native(o + (q0 + i) * Ev + e0, w);
          }
          vec_math::transpose_native(x);
          vec_math::transpose_native(y);
          for (int64_t j = 0; j < w; ++j) {
            if ((e0 + j) % gemm::kPanel == 0 && e0 + j > 0) {  // a panel ends: add it to the total, as matmul does
              total = e0 + j == gemm::kPanel ? acc : total + acc;
              acc = V{};
            }
            acc += x[j] * y[j];
          }
        }
        total = Ev <= gemm::kPanel ? acc : total + acc;
        std::memcpy(D + q0, &total, sizeof total);
      }
      return;
    }
  }
  for (int64_t r = r0; r < r0 + n; ++r) D[r] = gemm::dot_like_matmul(g + r * Ev, o + r * Ev, Ev);
}

// ---------------------------------------------------------------------------------------------------------------
// Op entry points

Shape check_qkv(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_cpu_float(op, "query", q);
  check_dim(op, "query", q, 4, "(batch, heads, L, E)");
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"key", k}, {"value", v}}) {
    check_cpu_float(op, name, t);
    check_same_dtype(op, name, t, "query", q);
    check_dim(op, name, t, 4, "(batch, kv_heads, S, E or Ev)");
  }
  Shape d{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3), v.size(3), 1};
  TORCH_CHECK(d.Hkv > 0 && d.Hq % d.Hkv == 0, op, ": expected the query heads (", d.Hq,
              ") to be a multiple of the key/value heads (", d.Hkv, ")");
  d.group = d.Hq / d.Hkv;
  check_shape(op, "key", k, {d.Z, d.Hkv, d.S, d.E}, "(batch, kv_heads, S, E)");
  check_shape(op, "value", v, {d.Z, d.Hkv, d.S, d.Ev}, "(batch, kv_heads, S, Ev)");
  TORCH_CHECK(d.E > 0 && d.Ev > 0, op, ": expected head dims > 0, got E = ", d.E, ", Ev = ", d.Ev);
  return d;
}

template <typename T>
Mask<T> mask_view(const char* op, const std::optional<Tensor>& mask, const Shape& d, at::ScalarType ct) {
  Mask<T> m;
  if (!mask.has_value()) return m;
  const Tensor& t = *mask;
  TORCH_CHECK(t.device().is_cpu(), op, ": expected attn_mask on the CPU, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBool || t.scalar_type() == ct, op, ": expected attn_mask to be bool or ", ct,
              ", got ", t.scalar_type());
  check_shape(op, "attn_mask", t, {d.Z, d.Hq, d.L, d.S}, "(batch, heads, L, S), broadcast through strides");
  m.sz = t.stride(0);
  m.sh = t.stride(1);
  m.sl = t.stride(2);
  m.ss = t.stride(3);
  if (t.scalar_type() == at::kBool)
    m.b = t.data_ptr<bool>();
  else
    m.f = t.data_ptr<T>();
  return m;
}

Dropout make_dropout(const char* op, double p, int64_t seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": expected dropout_p in [0, 1), got ", p);
  return Dropout{p, static_cast<uint64_t>(seed), 1.0 / (1.0 - p)};
}

std::tuple<Tensor, Tensor> sdpa_fwd(const Tensor& query, const Tensor& key, const Tensor& value,
                                    const std::optional<Tensor>& attn_mask, bool is_causal, double scale,
                                    double dropout_p, int64_t seed) {
  constexpr const char* op = "seqkernels::sdpa_fwd";
  const Shape d = check_qkv(op, query, key, value);
  const Dropout dr = make_dropout(op, dropout_p, seed);
  const auto dt = query.scalar_type(), ct = compute_type(dt);
  const Tensor q = to_compute(query), k = to_compute(key), v = to_compute(value);
  Tensor out = at::empty({d.Z, d.Hq, d.L, d.Ev}, q.options()), lse = at::empty({d.Z, d.Hq, d.L}, q.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "sdpa_fwd", [&] {
    const Mask<scalar_t> m = mask_view<scalar_t>(op, attn_mask, d, ct);
    attention_forward<scalar_t>(d, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m,
                                is_causal, static_cast<scalar_t>(scale), dr, out.data_ptr<scalar_t>(),
                                lse.data_ptr<scalar_t>(), q);
  });
  return {out.to(dt), lse};
}

// grad_mask: dense (Z, Hq, L, S) in the compute type when mask_grad, else an empty (0,) tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor> sdpa_bwd(const Tensor& grad_out, const Tensor& query, const Tensor& key,
                                                    const Tensor& value, const std::optional<Tensor>& attn_mask,
                                                    const Tensor& out, const Tensor& lse, bool is_causal,
                                                    double scale, double dropout_p, int64_t seed, bool mask_grad) {
  constexpr const char* op = "seqkernels::sdpa_bwd";
  const Shape d = check_qkv(op, query, key, value);
  const Dropout dr = make_dropout(op, dropout_p, seed);
  const auto dt = query.scalar_type(), ct = compute_type(dt);
  check_arg(op, "grad_out", grad_out, {d.Z, d.Hq, d.L, d.Ev}, "(batch, heads, L, Ev)", "query", query);
  check_arg(op, "out", out, {d.Z, d.Hq, d.L, d.Ev}, "(batch, heads, L, Ev)", "query", query);
  check_cpu_float(op, "lse", lse);
  TORCH_CHECK(lse.scalar_type() == ct, op, ": expected lse (saved by sdpa_fwd) to have dtype ", ct, ", got ",
              lse.scalar_type());
  check_shape(op, "lse", lse, {d.Z, d.Hq, d.L}, "(batch, heads, L)");
  TORCH_CHECK(!mask_grad || (attn_mask.has_value() && attn_mask->scalar_type() != at::kBool), op,
              ": mask_grad needs a float attn_mask");
  const Tensor q = to_compute(query), k = to_compute(key), v = to_compute(value), go = to_compute(grad_out);
  const Tensor lse_c = lse.contiguous(), out_c = to_compute(out);
  Tensor D = at::empty({d.Z, d.Hq, d.L}, q.options());  // rowsum(dO * O)
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  // The kernel writes dS where it visits; with is_causal the keys past each query tile are not visited (dS = 0).
  Tensor dmask = !mask_grad ? at::empty({0}, q.options())
                 : is_causal ? at::zeros({d.Z, d.Hq, d.L, d.S}, q.options())
                             : at::empty({d.Z, d.Hq, d.L, d.S}, q.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "sdpa_bwd", [&] {
    const scalar_t* g = go.data_ptr<scalar_t>();
    const scalar_t* o = out_c.data_ptr<scalar_t>();
    scalar_t* Dp = D.data_ptr<scalar_t>();
    const int64_t rows = d.Z * d.Hq * d.L;
    at::parallel_for(0, (rows + 15) / 16, 64, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) row_dots(g, o, blk * 16, std::min<int64_t>(16, rows - blk * 16), d.Ev, Dp);
    });
    const Mask<scalar_t> m = mask_view<scalar_t>(op, attn_mask, d, ct);
    attention_backward<scalar_t>(d, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), m,
                                 is_causal, static_cast<scalar_t>(scale), dr, go.data_ptr<scalar_t>(),
                                 lse_c.data_ptr<scalar_t>(), D.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                                 dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(),
                                 mask_grad ? dmask.data_ptr<scalar_t>() : nullptr, q);
  });
  return {dq.to(dt), dk.to(dt), dv.to(dt), dmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("sdpa_fwd", &sdpa_fwd);
  m.impl("sdpa_bwd", &sdpa_bwd);
}

}  // namespace seqkernels
