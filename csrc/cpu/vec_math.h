// Vectorized sigmoid and tanh over arrays, for the gate activations; the softmax's 2^x; 16 x 16 transposes.
//
// float: 16 lanes at a time (one AVX-512 register, two AVX2 ones), written with GCC/Clang vector extensions:
// relying on auto-vectorization proved fragile, since GCC would not always if-convert the range clamps.
// Accuracy against float64 over the whole range: exp within 1 ulp, tanh within 2 ulp (including near 0, where the
// usual 1 - 2 / (e^2x + 1) form would lose all relative precision: a fitted odd polynomial is used there), sigmoid
// within 2 ulp. exp is exactly 0 below -87.34 (where e^x leaves float's normal range; -inf included) and
// saturates above 88. NaN propagates.
// double: libm, for gradcheck and exact float64 comparisons.
// `in` may equal `out`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace seqkernels {
namespace vec_math {

typedef float vfloat16 __attribute__((vector_size(64)));
typedef int32_t vint16 __attribute__((vector_size(64)));

// e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (truncation
// < 3e-9 relative), ln 2 split in two (Cody-Waite) so r is exact to float precision.
inline vfloat16 exp16(vfloat16 x) {
  const vfloat16 lo = vfloat16{} - 87.0f, hi = vfloat16{} + 88.0f;
  const auto underflow = x < -87.33654f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vfloat16 n = (x * 1.44269504088896341f + round_magic) - round_magic;
  vfloat16 r = x - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  vfloat16 p = r * (1.0f / 5040.0f) + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vint16 bits = (__builtin_convertvector(n, vint16) + 127) << 23;
  const vfloat16 e = p * (vfloat16)bits;  // a cast between same-size vector types reinterprets the bits
  return underflow ? vfloat16{} : e;
}

// 2^t for t < 128, meant for t <= 0 (softmax's shifted scores in base 2): 2^n 2^r, n = round(t), r = t - n exact in [-1/2, 1/2],
// 2^r by a degree-6 polynomial fitted for relative error (0.8 ulp in float arithmetic). t is clamped at -127,
// where the scale 2^n, built from n's bits, is exactly 0: so the result is 0 for t < -126.5 (-inf included)
// and no separate underflow test is needed. NaN propagates. About half the work of exp16, which must handle
// the whole range.
__attribute__((always_inline)) inline vfloat16 exp2_nonpositive16(vfloat16 t) {
  t = t < -127.0f ? vfloat16{} - 127.0f : t;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: the sum's low mantissa bits hold round(t)
  const vfloat16 shifted = t + round_magic;
  const vfloat16 r = t - (shifted - round_magic);
  vfloat16 p = r * 1.5353361959569156e-4f + 1.3398875016719103e-3f;
  p = p * r + 9.618436917662621e-3f;
  p = p * r + 5.5503323674201965e-2f;
  p = p * r + 0.24022647738456726f;
  p = p * r + 0.6931471824645996f;
  p = p * r + 1.0f;
  const vint16 bits = (((vint16)shifted) << 23) + (127 << 23);  // n + 127 in the exponent (bit casts, as in exp16)
  return p * (vfloat16)bits;
}

inline vfloat16 sigmoid16(vfloat16 x) {
  return 1.0f / (1.0f + exp16(-x));
}

inline vfloat16 tanh16(vfloat16 x) {
  const vfloat16 ax = x < 0.0f ? -x : x;
  // |x| < 0.625: tanh(x) = x * P(x^2), P fitted (least squares, relative) on [0, 0.625^2]: 1.25 ulp.
  const vfloat16 t = x * x;
  vfloat16 p = t * 0.002125637838616967f - 0.008155734278261662f;
  p = p * t + 0.021690327674150467f;
  p = p * t - 0.05394439399242401f;
  p = p * t + 0.1333318054676056f;
  p = p * t - 0.333333283662796f;
  p = p * t + 1.0f;
  const vfloat16 small = x * p;
  // |x| >= 0.625: no cancellation left in 1 - 2 / (e^{2|x|} + 1).
  const vfloat16 mag = 1.0f - 2.0f / (exp16(2.0f * ax) + 1.0f);
  const vfloat16 large = x < 0.0f ? -mag : mag;
  return ax < 0.625f ? small : large;
}

// In-register transpose of a 16 x 16 block held as 16 row vectors: four stages, each swapping one bit of the row
// index with the same bit of the column index across pairs of rows i, i | bit (64 two-source shuffles in all).
// Row i keeps its columns whose bit is clear and takes row i|bit's columns without the bit (LO); row i|bit takes
// the rest (HI).
#define SEQKERNELS_LIST(...) __VA_ARGS__
#define SEQKERNELS_TRANSPOSE_STAGE(BIT, LO, HI)                       \
  for (int i = 0; i < 16; ++i)                                        \
    if (!(i & BIT)) {                                                 \
      const vfloat16 a = x[i], b = x[i | BIT];                        \
      x[i] = __builtin_shufflevector(a, b, SEQKERNELS_LIST LO);       \
      x[i | BIT] = __builtin_shufflevector(a, b, SEQKERNELS_LIST HI); \
    }
inline void transpose16(vfloat16 (&x)[16]) {
  SEQKERNELS_TRANSPOSE_STAGE(8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                             (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  SEQKERNELS_TRANSPOSE_STAGE(4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                             (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  SEQKERNELS_TRANSPOSE_STAGE(2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                             (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  SEQKERNELS_TRANSPOSE_STAGE(1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                             (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}
#undef SEQKERNELS_TRANSPOSE_STAGE
#undef SEQKERNELS_LIST

// The whole 16 x 16 blocks of a matrix transpose, each through registers: dst[c * ldd + r] = row(r)[c] * alpha
// for r < rows / 16 * 16, c < cols / 16 * 16, where row(r) points at row r. The caller does the edges.
template <typename RowPtr>
inline void transpose_blocks16(int64_t rows, int64_t cols, RowPtr row, float alpha, float* dst, int64_t ldd) {
  for (int64_t r0 = 0; r0 + 16 <= rows; r0 += 16)
    for (int64_t c0 = 0; c0 + 16 <= cols; c0 += 16) {
      vfloat16 x[16];
      for (int i = 0; i < 16; ++i) {
        std::memcpy(&x[i], row(r0 + i) + c0, sizeof x[i]);
        x[i] *= alpha;
      }
      transpose16(x);
      for (int i = 0; i < 16; ++i) std::memcpy(dst + (c0 + i) * ldd + r0, &x[i], sizeof x[i]);
    }
}

// A whole matrix transpose: dst[c * ldd + r] = row(r)[c] * alpha for r < rows, c < cols; float through 16 x 16
// register blocks, the edges (and double) element by element.
template <typename T, typename RowPtr>
inline void transpose(int64_t rows, int64_t cols, RowPtr row, T* dst, int64_t ldd, T alpha = T(1)) {
  int64_t r16 = 0, c16 = 0;
  if constexpr (std::is_same_v<T, float>) {
    transpose_blocks16(rows, cols, row, alpha, dst, ldd);
    r16 = rows / 16 * 16;
    c16 = cols / 16 * 16;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = r < r16 ? c16 : 0; c < cols; ++c) dst[c * ldd + r] = row(r)[c] * alpha;
}

// The first min(n, 16) floats at p, zero-padded to a vector.
inline vfloat16 load16(const float* p, int64_t n) {
  vfloat16 v{};
  if (n >= 16)
    std::memcpy(&v, p, sizeof v);
  else
    std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// dst[0, n) = src[0, n), with non-temporal stores when dst is 64-byte aligned and n fills whole vectors: for data
// written once and read back only much later (the activations a forward saves for its backward), whose plain
// stores would first read every destination line into the cache. Otherwise a plain copy. The writing thread
// calls stream_fence() before another thread may read what it streamed.
template <typename T>
inline void stream_copy(const T* src, T* dst, int64_t n) {
#if defined(__AVX512F__)
  constexpr int64_t kVec = 64 / sizeof(T);
  if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && n % kVec == 0) {
    for (int64_t i = 0; i < n; i += kVec) {
      if constexpr (std::is_same_v<T, float>)
        _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
      else
        _mm512_stream_pd(dst + i, _mm512_loadu_pd(src + i));
    }
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

template <typename F>
inline void map_float(const float* in, float* out, int64_t n, F f) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    vfloat16 v;
    std::memcpy(&v, in + i, sizeof v);
    const vfloat16 r = f(v);
    std::memcpy(out + i, &r, sizeof r);
  }
  if (i < n) {
    const vfloat16 r = f(load16(in + i, n - i));
    std::memcpy(out + i, &r, (n - i) * sizeof(float));
  }
}

inline void sigmoid(const float* in, float* out, int64_t n) { map_float(in, out, n, sigmoid16); }
inline void tanh(const float* in, float* out, int64_t n) { map_float(in, out, n, tanh16); }

inline void sigmoid(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0 / (1.0 + std::exp(-in[i]));
}
inline void tanh(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::tanh(in[i]);
}

}  // namespace vec_math
}  // namespace seqkernels
