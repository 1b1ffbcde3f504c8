// Vectorized sigmoid and tanh over arrays, for the gate activations; the softmax's 2^x; 16 x 16 transposes.
//
// float: 16 lanes at a time (one AVX-512 register, two AVX2 ones), written with GCC/Clang vector extensions:
// relying on auto-vectorization proved fragile, since GCC would not always if-convert the range clamps.
// Several vectors are computed in lockstep where the caller has them (activate_lockstep). Accuracy against float64:
// see activate_lockstep (tanh keeps its relative precision near 0, where the usual 1 - 2 / (e^2x + 1) form would
// lose it all). NaN propagates.
// double: libm, for gradcheck and exact float64 comparisons.
// `in` may equal `out`.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace seqkernels {
namespace vec_math {

typedef float vfloat16 __attribute__((vector_size(64)));
typedef int32_t vint16 __attribute__((vector_size(64)));
typedef float vfloat8 __attribute__((vector_size(32)));
typedef int32_t vint8 __attribute__((vector_size(32)));

// Without AVX-512, comparisons and selects of 16-float vectors are done on their two 8-float halves (vfloat8),
// AVX's register width: on vfloat16 GCC lowers them to scalar code there (the LSTM's pointwise pass over a step
// took 77 us, against 16-20 us on halves, at batch 32 and 128 units on a Zen 3 core). The arithmetic does not
// depend on the width, so the results are the same either way. Where the caller's data need not be vfloat16,
// vnative (below) avoids the round trip: GCC keeps vfloat16 values in memory on AVX2.
template <int N>
__attribute__((always_inline)) inline void split_halves(const vfloat16 (&v)[N], vfloat8 (&h)[2 * N]) {
  std::memcpy(h, v, sizeof v);
}
template <int N>
__attribute__((always_inline)) inline void join_halves(const vfloat8 (&h)[2 * N], vfloat16 (&v)[N]) {
  std::memcpy(v, h, sizeof v);
}

// The widest vector the build's registers hold, for loops written lane-count generic (AVX2: 8 floats).
#if defined(__AVX512F__)
typedef vfloat16 vnative;
typedef vint16 vinative;
#else
typedef vfloat8 vnative;
typedef vint8 vinative;
#endif
constexpr int kNativeLanes = sizeof(vnative) / sizeof(float);

#if !defined(__AVX512F__)
// e^x for N vectors at once, in place, each step of the computation applied to all N before the next (lockstep):
// the chains are long (about 40 cycles) and the scheduler holds only a few of them, so independent work placed
// side by side is what keeps both FMA ports busy (sigmoid and tanh of the LSTM gates ran 25% faster this way).
// e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2, e^r by its degree-7 Taylor polynomial (truncation
// < 3e-9 relative), ln 2 split in two (Cody-Waite) so r is exact to float precision. NaN propagates. The result
// is 0 below -87.34 (where e^x leaves the normal range) and x is clamped at 88.
template <int N>
__attribute__((always_inline)) inline void exp_lockstep(vfloat8 (&x)[N]) {
  vfloat8 n[N], r[N], p[N];
  vint8 underflow[N];
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) {
    underflow[q] = x[q] < -87.33654f;
    x[q] = x[q] < -87.0f ? vfloat8{} - 87.0f : x[q];
    x[q] = x[q] > 88.0f ? vfloat8{} + 88.0f : x[q];
    n[q] = (x[q] * 1.44269504088896341f + round_magic) - round_magic;
  }
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) r[q] = x[q] - n[q] * 0.693145751953125f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) r[q] = r[q] - n[q] * 1.428606765330187e-06f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = r[q] * (1.0f / 5040.0f) + 1.0f / 720.0f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 1.0f / 120.0f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 1.0f / 24.0f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 1.0f / 6.0f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 0.5f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 1.0f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 1.0f;
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) {
    const vint8 bits = (__builtin_convertvector(n[q], vint8) + 127) << 23;
    // (a cast between same-size vector types reinterprets the bits)
    x[q] = underflow[q] ? vfloat8{} : p[q] * (vfloat8)bits;
  }
}
#endif

// 2^t for t < 128, meant for t <= 0 (softmax's shifted scores in base 2): 2^n 2^r, n = round(t), r = t - n exact in [-1/2, 1/2],
// 2^r by a degree-6 polynomial fitted for relative error (0.8 ulp in float arithmetic). t is clamped at -127,
// where the scale 2^n, built from n's bits, is exactly 0: so the result is 0 for t < -126.5 (-inf included)
// and no separate underflow test is needed. NaN propagates. About half the work of exp_lockstep, which must handle
// the whole range.
template <typename V, typename VI>
__attribute__((always_inline)) inline V exp2_nonpositive(V t) {
  t = t < -127.0f ? V{} - 127.0f : t;
  const float round_magic = 12582912.0f;  // 1.5 * 2^23: the sum's low mantissa bits hold round(t)
  const V shifted = t + round_magic;
  const V r = t - (shifted - round_magic);
  V p = r * 1.5353361959569156e-4f + 1.3398875016719103e-3f;
  p = p * r + 9.618436917662621e-3f;
  p = p * r + 5.5503323674201965e-2f;
  p = p * r + 0.24022647738456726f;
  p = p * r + 0.6931471824645996f;
  p = p * r + 1.0f;
  const VI bits = (((VI)shifted) << 23) + (127 << 23);  // n + 127 in the exponent (bit casts)
  return p * (V)bits;
}

__attribute__((always_inline)) inline vnative exp2_nonpositive(vnative t) {
  return exp2_nonpositive<vnative, vinative>(t);
}

__attribute__((always_inline)) inline vfloat16 abs16(vfloat16 x) {
  return (vfloat16)((vint16)x & 0x7fffffff);
}

// activate_lockstep's kTanh for `groups` sets of LSTM gates i, f, g, o side by side: tanh for each g.
constexpr uint32_t lstm_gates(int groups) {
  return groups == 0 ? 0u : lstm_gates(groups - 1) << 4 | 0b0100u;
}

#if defined(__AVX512F__)
// 1 / d for N vectors: AVX-512's 14-bit reciprocal estimate and one Newton step (about 2^-28 relative before
// rounding), a quarter of a division's cost.
template <int N>
__attribute__((always_inline)) inline void reciprocal_lockstep(const vfloat16 (&d)[N], vfloat16 (&r)[N]) {
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) r[q] = (vfloat16)_mm512_rcp14_ps((__m512)d[q]);
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) r[q] = r[q] + r[q] * (1.0f - d[q] * r[q]);
}

// sigmoid(x) = 1 / (1 + e^-x) for N vectors in lockstep, in place. e^-x = 2^n e^-r: n = round(-x / ln 2) by the
// 1.5 * 2^23 rounding constant, r = x + n ln 2 with ln 2 split in two (Cody-Waite) so r is exact to float
// precision, |r| <= ln 2 / 2, e^-r by a degree-6 polynomial fitted for relative error (minimax, 1.9e-9), 2^n
// applied by scalef. x is clamped to [-88.5, 88.5] first: beyond it the result is 1, or at most 4e-39 (where the
// exact value is smaller still). NaN propagates (max/min return their second operand when one is NaN).
template <int N>
__attribute__((always_inline)) inline void sigmoid_lockstep(vfloat16 (&v)[N]) {
  const float round_magic = 12582912.0f;
  vfloat16 x[N], n[N], r[N], p[N], d[N];
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q)
    x[q] = (vfloat16)_mm512_max_ps(_mm512_set1_ps(-88.5f), _mm512_min_ps(_mm512_set1_ps(88.5f), (__m512)v[q]));
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) n[q] = (x[q] * -1.44269504088896341f + round_magic) - round_magic;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) r[q] = x[q] + n[q] * 0.693145751953125f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) r[q] = r[q] + n[q] * 1.428606765330187e-06f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) p[q] = r[q] * 0.0013836834467089963f - 0.008374815817848833f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 0.04166822574731865f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] - 0.16666420170048935f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 0.4999999207916971f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] - 1.000000036323049f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) p[q] = p[q] * r[q] + 1.0000000005541976f;
#pragma GCC unroll 8
  for (int q = 0; q < N; ++q) d[q] = (vfloat16)_mm512_scalef_ps((__m512)p[q], (__m512)n[q]) + 1.0f;
  reciprocal_lockstep(d, v);
}

// tanh(k / 2) for k < 20 (float-rounded), then 1: tanh_lockstep's table, one permute of two registers.
alignas(64) inline constexpr float kTanhHalves[32] = {
    0.0f, 0.46211716532707214f, 0.7615941762924194f, 0.9051482677459717f,
    0.9640275835990906f, 0.9866142868995667f, 0.9950547814369202f, 0.9981778860092163f,
    0.9993293285369873f, 0.9997532367706299f, 0.9999092221260071f, 0.9999666213989258f,
    0.9999877214431763f, 0.9999954700469971f, 0.9999983310699463f, 0.9999994039535522f,
    0.9999997615814209f, 0.9999999403953552f, 0.9999999403953552f, 1.0f,
    1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};

// tanh(x) for N vectors in lockstep, in place, by a table and the addition formula: with a = min(|x|, 9.5),
// 2a = k + r, k = floor(2a), 0 <= r < 1 (both exact: cvttps and vreduceps of 2a), and
//   tanh(a) = T + tau (1 - T^2) / (1 + T tau),  T = tanh(k / 2) from kTanhHalves,  tau = tanh(r / 2),
// tau = r/2 + (r/2)^3 Q((r/2)^2), Q fitted for relative error (1.8e-8) on r/2 in [0, 1/2]. The correction to T
// is positive and small against the result, so rounding T and the correction's own errors stay near half an ulp
// each; for k = 0 the result is tau, relatively precise down to the subnormals. x's sign is put back last. About
// 22 instructions against 32 for the 1 - 2 / (e^2|x| + 1) form with its separate polynomial near 0. NaN
// propagates (through min, as in sigmoid_lockstep); tanh(9.5) rounds to 1.
template <int N>
__attribute__((always_inline)) inline void tanh_lockstep(vfloat16 (&v)[N]) {
  const __m512 low = _mm512_load_ps(kTanhHalves), high = _mm512_load_ps(kTanhHalves + 16);
  vfloat16 a[N], r[N], t[N], q[N], tau[N], T[N], num[N], den[N], rc[N], y[N];
  __m512i k[N];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) a[i] = (vfloat16)_mm512_min_ps(_mm512_set1_ps(9.5f), (__m512)abs16(v[i]));
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) a[i] = a[i] + a[i];  // 2a
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) k[i] = _mm512_cvttps_epi32((__m512)a[i]);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) r[i] = (vfloat16)_mm512_reduce_ps((__m512)a[i], _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) T[i] = (vfloat16)_mm512_permutex2var_ps(low, k[i], high);
  // tau = r/2 + r^3 Q((r/2)^2) / 8, the scalings folded into the coefficients
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) t[i] = r[i] * r[i];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) q[i] = t[i] * 3.336503102737721e-05f - 0.0004138857739669223f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) q[i] = q[i] * t[i] + 0.00416406671278255f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) q[i] = q[i] * t[i] - 0.04166639183842068f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) tau[i] = (r[i] * t[i]) * q[i] + r[i] * 0.5f;
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    num[i] = tau[i] * (1.0f - T[i] * T[i]);
    den[i] = T[i] * tau[i] + 1.0f;
  }
  // num / den: the reciprocal estimate, then one Newton step on the quotient itself
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) rc[i] = (vfloat16)_mm512_rcp14_ps((__m512)den[i]);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) y[i] = num[i] * rc[i];
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) y[i] = T[i] + (y[i] + (num[i] - den[i] * y[i]) * rc[i]);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) v[i] = (vfloat16)((vint16)y[i] | ((vint16)v[i] & (int32_t)0x80000000));
}
#endif

#if !defined(__AVX512F__)
// activate_lockstep on N 8-float halves (see split_halves), in place: half q gets tanh when bit q of kTanh is set.
template <int N, uint32_t kTanh>
__attribute__((always_inline)) inline void activate_lockstep8(vfloat8 (&v)[N]) {
  vfloat8 e[N], d[N], r[N];
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) {
    const vfloat8 a = (vfloat8)((vint8)v[q] & 0x7fffffff);
    e[q] = (kTanh >> q & 1) ? a * -2.0f : -v[q];
  }
  exp_lockstep(e);
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) d[q] = 1.0f + e[q];
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) r[q] = 1.0f / d[q];
#pragma GCC unroll 16
  for (int q = 0; q < N; ++q) {
    if (!(kTanh >> q & 1)) {
      v[q] = r[q];
      continue;
    }
    const vfloat8 x = v[q], t = x * x;
    vfloat8 p = t * 0.002125637838616967f - 0.008155734278261662f;
    p = p * t + 0.021690327674150467f;
    p = p * t - 0.05394439399242401f;
    p = p * t + 0.1333318054676056f;
    p = p * t - 0.333333283662796f;
    p = p * t + 1.0f;
    const vfloat8 mag = 1.0f - (e[q] + e[q]) * r[q];
    const vfloat8 large = (vfloat8)((vint8)mag | ((vint8)x & (int32_t)0x80000000));  // mag >= 0: x's sign
    v[q] = (vfloat8)((vint8)x & 0x7fffffff) < 0.625f ? x * p : large;
  }
}

// kTanh of N vectors as the mask of their 2N halves: bit q becomes bits 2q and 2q + 1.
constexpr uint32_t spread_bits(uint32_t mask, int q = 0) {
  return q == 16 ? 0u : ((mask >> q & 1u) * (3u << 2 * q)) | spread_bits(mask, q + 1);
}

// Halves in lockstep at a time: independent chains for both FMA ports, within AVX's 16 registers (2, 3, 6 and 8
// measured the same as 4, within the noise, on Zen 3).
constexpr int kHalvesInLockstep = 4;

// activate_lockstep8 over N halves, kHalvesInLockstep at a time, from half G0 on.
template <int N, uint32_t kTanh, int G0 = 0>
__attribute__((always_inline)) inline void activate_halves(vfloat8 (&h)[N]) {
  if constexpr (G0 < N) {
    constexpr int G = N - G0 < kHalvesInLockstep ? N - G0 : kHalvesInLockstep;
    vfloat8 g[G];
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i) g[i] = h[G0 + i];
    activate_lockstep8<G, (kTanh >> G0) & ((1u << G) - 1u)>(g);
#pragma GCC unroll 16
    for (int i = 0; i < G; ++i) h[G0 + i] = g[i];
    activate_halves<N, kTanh, G0 + G>(h);
  }
}
#endif

// Sigmoid or tanh of N vectors in lockstep, in place: vector q gets tanh when bit q of kTanh is set, sigmoid
// otherwise (the LSTM's gates i, f, g, o are kTanh = lstm_gates(1)). Accuracy against float64 over every float
// input (measured exhaustively, both forms): sigmoid within 2.5 ulp, tanh within 1.42 ulp, for results in float's
// normal range; below it, within 4e-39 absolutely with AVX-512 and 6.1e-39 otherwise.
// AVX-512: sigmoid_lockstep and tanh_lockstep, each over its own vectors in lockstep. Against the earlier form
// (below, kept for other targets) the LSTM's pointwise pass over a step took 6.7 instead of 8.8 us at batch 32
// and 128 units a thread (measured alone), with the same accuracy bounds.
// Otherwise:
//   sigmoid(x) = 1 / (1 + e^-x).
//   tanh(x): for |x| < 0.625, x * P(x^2), P fitted (least squares, relative) on [0, 0.625^2]; above, where nothing
//   cancels, sign(x) (1 - 2 e / (1 + e)) with e = e^-2|x| (at most 0.29).
template <int N, uint32_t kTanh>
__attribute__((always_inline)) inline void activate_lockstep(vfloat16 (&v)[N]) {
#if defined(__AVX512F__)
  constexpr int kTanhs = __builtin_popcount(kTanh & ((N < 32 ? 1u << N : 0u) - 1u)), kSigmoids = N - kTanhs;
  vfloat16 s[kSigmoids > 0 ? kSigmoids : 1], t[kTanhs > 0 ? kTanhs : 1];
  // vector q's place among the tanh vectors (those before it with their bit set) or among the sigmoid ones
  auto place = [](int q) { return __builtin_popcount(kTanh & ((1u << q) - 1u)); };
#pragma GCC unroll 32
  for (int q = 0; q < N; ++q) {
    if (kTanh >> q & 1)
      t[place(q)] = v[q];
    else
      s[q - place(q)] = v[q];
  }
  if constexpr (kSigmoids > 0) sigmoid_lockstep(s);
  if constexpr (kTanhs > 0) tanh_lockstep(t);
#pragma GCC unroll 32
  for (int q = 0; q < N; ++q) v[q] = (kTanh >> q & 1) ? t[place(q)] : s[q - place(q)];
#else
  vfloat8 h[2 * N];
  split_halves(v, h);
  activate_halves<2 * N, spread_bits(kTanh)>(h);
  join_halves(h, v);
#endif
}

// activate_lockstep on vectors of the registers' width.
template <int N, uint32_t kTanh>
__attribute__((always_inline)) inline void activate_native(vnative (&v)[N]) {
#if defined(__AVX512F__)
  activate_lockstep<N, kTanh>(v);
#else
  activate_halves<N, kTanh>(v);
#endif
}

inline vfloat16 sigmoid16(vfloat16 x) {
  vfloat16 v[1] = {x};
  activate_lockstep<1, 0>(v);
  return v[0];
}

inline vfloat16 tanh16(vfloat16 x) {
  vfloat16 v[1] = {x};
  activate_lockstep<1, 1>(v);
  return v[0];
}

// In-register transpose of a 16 x 16 block held as 16 row vectors: four stages, each swapping one bit of the row
// index with the same bit of the column index across pairs of rows i, i | bit (64 two-source shuffles in all).
// Row i keeps its columns whose bit is clear and takes row i|bit's columns without the bit (LO); row i|bit takes
// the rest (HI).
#define SEQKERNELS_LIST(...) __VA_ARGS__
#define SEQKERNELS_TRANSPOSE_STAGE(V, N, BIT, LO, HI)                 \
  for (int i = 0; i < N; ++i)                                         \
    if (!(i & BIT)) {                                                 \
      const V a = x[i], b = x[i | BIT];                               \
      x[i] = __builtin_shufflevector(a, b, SEQKERNELS_LIST LO);       \
      x[i | BIT] = __builtin_shufflevector(a, b, SEQKERNELS_LIST HI); \
    }
inline void transpose16(vfloat16 (&x)[16]) {
  SEQKERNELS_TRANSPOSE_STAGE(vfloat16, 16, 8, (0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                             (8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31))
  SEQKERNELS_TRANSPOSE_STAGE(vfloat16, 16, 4, (0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27),
                             (4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31))
  SEQKERNELS_TRANSPOSE_STAGE(vfloat16, 16, 2, (0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29),
                             (2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31))
  SEQKERNELS_TRANSPOSE_STAGE(vfloat16, 16, 1, (0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30),
                             (1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31))
}

// The same for an 8 x 8 block of 8-float vectors (AVX2 registers): three stages.
inline void transpose8(vfloat8 (&x)[8]) {
  SEQKERNELS_TRANSPOSE_STAGE(vfloat8, 8, 4, (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15))
  SEQKERNELS_TRANSPOSE_STAGE(vfloat8, 8, 2, (0, 1, 8, 9, 4, 5, 12, 13), (2, 3, 10, 11, 6, 7, 14, 15))
  SEQKERNELS_TRANSPOSE_STAGE(vfloat8, 8, 1, (0, 8, 2, 10, 4, 12, 6, 14), (1, 9, 3, 11, 5, 13, 7, 15))
}

// transpose16 or transpose8, by the registers' width (vnative).
#if defined(__AVX512F__)
inline void transpose_native(vnative (&x)[16]) { transpose16(x); }
#else
inline void transpose_native(vnative (&x)[8]) { transpose8(x); }
#endif
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

// The first n floats at p (clamped to [0, kNativeLanes]), zero-padded to a vector of the registers' width.
inline vnative load_native(const float* p, int64_t n) {
  vnative v{};
  std::memcpy(&v, p, std::clamp<int64_t>(n, 0, kNativeLanes) * sizeof(float));
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

// One vector stored non-temporally at p (64-byte aligned), as stream_copy does; a plain store without AVX-512.
inline void stream_native(float* p, const vnative& v) {
#if defined(__AVX512F__)
  _mm512_stream_ps(p, (__m512)v);
#else
  std::memcpy(p, &v, sizeof v);
#endif
}

inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}

// out = sigmoid(in) or tanh(in) (kTanh = 0 or 1 for every element), two vectors of the registers' width in
// lockstep.
template <uint32_t kTanh>
inline void activate(const float* in, float* out, int64_t n) {
  constexpr int64_t W = kNativeLanes;
  int64_t i = 0;
  for (; i + 2 * W <= n; i += 2 * W) {
    vnative v[2];
    std::memcpy(v, in + i, sizeof v);
    activate_native<2, kTanh * 3>(v);
    std::memcpy(out + i, v, sizeof v);
  }
  for (; i < n; i += W) {
    vnative v[1] = {load_native(in + i, n - i)};
    activate_native<1, kTanh>(v);
    std::memcpy(out + i, v, std::min<int64_t>(W, n - i) * sizeof(float));
  }
}

inline void sigmoid(const float* in, float* out, int64_t n) { activate<0>(in, out, n); }
inline void tanh(const float* in, float* out, int64_t n) { activate<1>(in, out, n); }

inline void sigmoid(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0 / (1.0 + std::exp(-in[i]));
}
inline void tanh(const double* in, double* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = std::tanh(in[i]);
}

}  // namespace vec_math
}  // namespace seqkernels
