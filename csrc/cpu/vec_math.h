// Branch-free exp, sigmoid and tanh that GCC/Clang auto-vectorize (AVX2/AVX-512/NEON) when called in a plain
// loop.
//
// float: evaluated in double precision and rounded once, so sigmoid and tanh are within about 0.5 ulp - as
// accurate as PyTorch's own (Sleef) float functions. A cheaper all-float evaluation (1-2 ulp) was measurably
// less accurate across long recurrences, where each step's rounding feeds the next.
// double: libm (exact to the last bit or so), for gradcheck and the float64 reference comparisons.
//
// Inputs beyond +-700 saturate, which changes sigmoid/tanh results only below 1e-300. NaN propagates.
#pragma once

#include <cmath>
#include <cstdint>

namespace seqkernels {
namespace vec_math {

// e^x for |x| <= 700 with ~1e-12 relative error: e^x = 2^n e^r, n = round(x / ln 2), |r| <= ln2 / 2,
// e^r by its degree-10 Taylor polynomial (truncation < 1e-12), ln 2 split in two (Cody-Waite).
inline double exp_d(double x) {
  x = x < -700.0 ? -700.0 : x;
  x = x > 700.0 ? 700.0 : x;
  const double round_magic = 6755399441055744.0;  // 1.5 * 2^52: adding and subtracting it rounds to an integer
  const double n = (x * 1.4426950408889634 + round_magic) - round_magic;
  double r = std::fma(n, -0.6931471803691238, x);
  r = std::fma(n, -1.9082149292705877e-10, r);
  double p = 1.0 / 3628800.0;
  p = std::fma(p, r, 1.0 / 362880.0);
  p = std::fma(p, r, 1.0 / 40320.0);
  p = std::fma(p, r, 1.0 / 5040.0);
  p = std::fma(p, r, 1.0 / 720.0);
  p = std::fma(p, r, 1.0 / 120.0);
  p = std::fma(p, r, 1.0 / 24.0);
  p = std::fma(p, r, 1.0 / 6.0);
  p = std::fma(p, r, 0.5);
  p = std::fma(p, r, 1.0);
  p = std::fma(p, r, 1.0);
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  return p * __builtin_bit_cast(double, bits);
}

inline float sigmoid(float x) {
  return static_cast<float>(1.0 / (1.0 + exp_d(-static_cast<double>(x))));
}

inline float tanh(float x) {
  const double d = static_cast<double>(x);
  const double e = exp_d(2.0 * d);
  // (e - 1) / (e + 1) loses relative precision only for |x| < 1e-4, where x - x^3/3 is exact in float.
  const double small = d * (1.0 - d * d * (1.0 / 3.0));
  const double large = (e - 1.0) / (e + 1.0);
  return static_cast<float>(std::fabs(d) < 1e-4 ? small : large);
}

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh(double x) { return std::tanh(x); }

}  // namespace vec_math
}  // namespace seqkernels
