// CPU kernels for the LSTM and RNN (Elman) recurrences.
//
// Cell steps: the two matmuls go to the BLAS (at::mm / addmm_, which run at the machine's GEMM rate), and
// everything else - both biases, the gate activations, the cell and hidden update - is one fused,
// auto-vectorized pass over the gate matrix, parallel over batch rows. Batches up to kSmallBatch compute the
// matmuls as dot products instead; float32 LSTMs among them (hidden size a multiple of 16) do the whole step per
// block of 16 hidden units in registers. The forward keeps the activated gates so the backward needs no
// transcendental but one tanh per cell element.
//
// bfloat16 arguments are computed in float32 (matmul accumulation, activations and state) and rounded once on
// output.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "cells.h"
#include "gemm_kernel.h"
#include "vec_math.h"

namespace seqkernels {
namespace {

using at::Tensor;

// Rows per parallel task: enough pointwise work per task to pay for handing it to a thread.
int64_t row_grain(int64_t elems_per_row) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(elems_per_row, 1));
}

// Batches up to this size compute the gate matmuls as dot products over the row-major weights: at::mm's fixed
// cost (about 7 us per call here) would dominate a step loop at batch 1.
constexpr int64_t kSmallBatch = 4;

// sum(a[k] * b[k]) with vector-wide partial sums reduced in a fixed order.
template <typename T>
inline T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using V = typename gemm::Vec<T>::type;
  constexpr int64_t L = gemm::lanes<T>();
  V acc0{}, acc1{};
  int64_t k = 0;
  for (; k + 2 * L <= n; k += 2 * L) {
    acc0 += *reinterpret_cast<const V*>(a + k) * *reinterpret_cast<const V*>(b + k);
    acc1 += *reinterpret_cast<const V*>(a + k + L) * *reinterpret_cast<const V*>(b + k + L);
  }
  for (; k + L <= n; k += L) acc0 += *reinterpret_cast<const V*>(a + k) * *reinterpret_cast<const V*>(b + k);
  acc0 += acc1;
  T sum = T(0);
  for (int64_t i = 0; i < L; ++i) sum += acc0[i];
  for (; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// float: kRows gate rows at once (a register's floats: 16 with AVX-512, 8 with AVX2), one accumulator register
// per row over the input then the hidden part, so the accumulators fit in the register file (16 rows of two AVX2
// registers each spilled: the step's binding at batch 1, hidden size 128 took 53 us against 17 on a Zen 3 core).
// The kRows lane partials are summed by one in-register transpose and a tree of adds, instead of a horizontal sum
// per row.
using RowsVec = vec_math::vnative;
constexpr int kRows = vec_math::kNativeLanes;

inline void add_row_products(const float* v, int64_t n, const float* w, RowsVec (&acc)[kRows]) {
  int64_t k = 0;
  for (; k + kRows <= n; k += kRows) {  // whole vectors, without a length test (it cost 10% of the op here)
    RowsVec xv;
    std::memcpy(&xv, v + k, sizeof xv);
    for (int i = 0; i < kRows; ++i) {
      RowsVec wv;
      std::memcpy(&wv, w + i * n + k, sizeof wv);
      acc[i] += wv * xv;
    }
  }
  if (k < n) {  // the last n - k columns, zero-padded
    const RowsVec xv = vec_math::load_native(v + k, n - k);
    for (int i = 0; i < kRows; ++i) acc[i] += vec_math::load_native(w + i * n + k, n - k) * xv;
  }
}

// Rows [0, kRows) of x @ w_ih^T + h @ w_hh^T.
inline RowsVec rows_matvec(const float* x, int64_t I, const float* h, int64_t H, const float* w_ih,
                           const float* w_hh) {
  RowsVec acc[kRows] = {};
  add_row_products(x, I, w_ih, acc);
  add_row_products(h, H, w_hh, acc);
  vec_math::transpose_native(acc);  // acc[i][j]: lane i's partial of row j
  for (int step = kRows / 2; step >= 1; step /= 2)
    for (int i = 0; i < step; ++i) acc[i] += acc[i + step];
  return acc[0];
}

// Rows [0, 16) of x @ w_ih^T + h @ w_hh^T, kRows at a time.
inline vec_math::vfloat16 rows16_matvec(const float* x, int64_t I, const float* h, int64_t H, const float* w_ih,
                                        const float* w_hh) {
  vec_math::vfloat16 y;
  for (int q = 0; q < 16 / kRows; ++q) {
    const RowsVec part = rows_matvec(x, I, h, H, w_ih + q * kRows * I, w_hh + q * kRows * H);
    std::memcpy(reinterpret_cast<float*>(&y) + q * kRows, &part, sizeof part);
  }
  return y;
}

// (B, rows) = x @ w_ih^T + h @ w_hh^T for a small batch, parallel over blocks of 16 gate rows when there is enough
// work (each output element is summed the same way whichever thread computes it).
template <typename T>
void small_batch_matmul(const T* x, int64_t I, const T* h, int64_t H, const T* w_ih, const T* w_hh, int64_t B,
                        int64_t rows, T* out) {
  const int64_t blocks = (rows + 15) / 16;
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 16 * B * (I + H)));
  at::parallel_for(0, blocks, grain, [&](int64_t blk0, int64_t blk1) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t r0 = blk * 16, r1 = std::min(rows, r0 + 16);
        if constexpr (std::is_same_v<T, float>) {
          if (r1 - r0 == 16) {
            const vec_math::vfloat16 y = rows16_matvec(x + b * I, I, h + b * H, H, w_ih + r0 * I, w_hh + r0 * H);
            std::memcpy(out + b * rows + r0, &y, sizeof y);
            continue;
          }
        }
        for (int64_t r = r0; r < r1; ++r) out[b * rows + r] = dot(x + b * I, w_ih + r * I, I) + dot(h + b * H, w_hh + r * H, H);
      }
  });
}

// x @ w_ih^T + h @ w_hh^T in the compute type, (B, rows) contiguous; the biases are added in the fused pass.
Tensor input_and_hidden_matmul(const Tensor& x, const Tensor& w_ih, const Tensor& h, const Tensor& w_hh) {
  const auto ct = compute_type(x.scalar_type());
  const int64_t B = x.size(0), rows = w_ih.size(0);
  if (B <= kSmallBatch && ct == x.scalar_type()) {
    const Tensor xc = x.contiguous(), hc = h.contiguous(), wi = w_ih.contiguous(), wh = w_hh.contiguous();
    Tensor out = at::empty({B, rows}, x.options());
    AT_DISPATCH_FLOATING_TYPES(ct, "small_batch_matmul", [&] {
      small_batch_matmul(xc.data_ptr<scalar_t>(), x.size(1), hc.data_ptr<scalar_t>(), h.size(1),
                         wi.data_ptr<scalar_t>(), wh.data_ptr<scalar_t>(), B, rows, out.data_ptr<scalar_t>());
    });
    return out;
  }
  Tensor out = at::mm(as_type(x, ct), as_type(w_ih, ct).t());
  out.addmm_(as_type(h, ct), as_type(w_hh, ct).t());
  return out;
}

// A bias in the compute type, contiguous, or zeros when absent: the fused pass reads both unconditionally.
Tensor bias_or_zeros(const std::optional<Tensor>& bias, int64_t rows, const Tensor& like) {
  const auto ct = compute_type(like.scalar_type());
  if (!bias.has_value()) return at::zeros({rows}, like.options().dtype(ct));
  return as_type(*bias, ct).contiguous();
}

// Checks input (B, I), w_ih (gates*H, I), w_hh (gates*H, H) and returns H.
int64_t check_cell_weights(const char* op, const Tensor& input, const Tensor& w_ih, const Tensor& w_hh,
                           int64_t gates, const char* w_ih_layout, const char* w_hh_layout) {
  check_cpu_float(op, "input", input);
  check_dim(op, "input", input, 2, "(batch, input_size)");
  check_cpu_float(op, "w_ih", w_ih);
  check_same_dtype(op, "w_ih", w_ih, "input", input);
  check_dim(op, "w_ih", w_ih, 2, w_ih_layout);
  TORCH_CHECK(w_ih.size(0) % gates == 0 && w_ih.size(0) > 0, op, ": expected w_ih.size(0) to be a positive multiple of ",
              gates, " ", w_ih_layout, ", got ", w_ih.size(0));
  const int64_t H = w_ih.size(0) / gates;
  check_arg(op, "w_ih", w_ih, {gates * H, input.size(1)}, w_ih_layout, "input", input);
  check_arg(op, "w_hh", w_hh, {gates * H, H}, w_hh_layout, "input", input);
  return H;
}

// ---------------------------------------------------------------------------------------------------------------
// LSTM cell (gate order i, f, g, o as torch)

// One batch row: gate pre-activations (without biases) in, activated gates out (in place), new state written.
template <typename T>
void lstm_pointwise_fwd(T* __restrict__ gates, const T* __restrict__ b_ih, const T* __restrict__ b_hh,
                        const T* __restrict__ c_prev, T* __restrict__ c_out, T* __restrict__ h_out, int64_t H) {
  for (int64_t j = 0; j < 4 * H; ++j) gates[j] += b_ih[j] + b_hh[j];
  vec_math::sigmoid(gates, gates, 2 * H);  // i, f
  vec_math::tanh(gates + 2 * H, gates + 2 * H, H);
  vec_math::sigmoid(gates + 3 * H, gates + 3 * H, H);
  for (int64_t j = 0; j < H; ++j) c_out[j] = gates[H + j] * c_prev[j] + gates[j] * gates[2 * H + j];
  vec_math::tanh(c_out, h_out, H);
  for (int64_t j = 0; j < H; ++j) h_out[j] *= gates[3 * H + j];
}

// From the activated gates and the new cell state: gradients of the gate pre-activations and of c_prev.
// `tc` is scratch for H values.
template <typename T>
void lstm_pointwise_bwd(const T* __restrict__ gates, const T* __restrict__ c_prev, const T* __restrict__ c_new,
                        const T* __restrict__ grad_h, const T* __restrict__ grad_c, T* __restrict__ grad_gates,
                        T* __restrict__ grad_c_prev, T* __restrict__ tanh_c, int64_t H) {
  vec_math::tanh(c_new, tanh_c, H);
  for (int64_t j = 0; j < H; ++j) {
    const T i = gates[j], f = gates[H + j], g = gates[2 * H + j], o = gates[3 * H + j];
    const T tc = tanh_c[j];
    const T dh = grad_h[j];
    const T dc = grad_c[j] + dh * o * (T(1) - tc * tc);
    grad_gates[j] = dc * g * i * (T(1) - i);
    grad_gates[H + j] = dc * c_prev[j] * f * (T(1) - f);
    grad_gates[2 * H + j] = dc * i * (T(1) - g * g);
    grad_gates[3 * H + j] = dh * tc * o * (T(1) - o);
    grad_c_prev[j] = dc * f;
  }
}

// float, batch <= kSmallBatch, hidden_size % 16 == 0: the whole step per block of 16 hidden units - the four gate
// matvecs, biases, activations and state update in registers - parallel over unit blocks, each output element
// computed the same way whichever thread takes its block. `gates` (B, 4H) receives the activated gates.
void small_batch_lstm_step(const float* x, int64_t I, const float* h, const float* c, const float* w_ih,
                           const float* w_hh, const float* b_ih, const float* b_hh, int64_t B, int64_t H,
                           float* gates, float* hy, float* cy) {
  using vec_math::load16;
  using vec_math::vfloat16;
  const int64_t blocks = H / 16;
  // One thread per `grain` blocks at most. The team is started here rather than by at::parallel_for, whose
  // bookkeeping costs about a microsecond per call: a tenth of this step at batch 1.
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, 64 * B * (I + H)));
  const int team = at::in_parallel_region()
                       ? 1
                       : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks / grain)));
  auto run = [&](int nt, int tid) {
    const int64_t chunk = (blocks + nt - 1) / nt, u0 = std::min(blocks, tid * chunk), u1 = std::min(blocks, u0 + chunk);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t u = u0; u < u1; ++u) {
        vfloat16 g[4];
        for (int k = 0; k < 4; ++k) {
          const int64_t r0 = k * H + u * 16;
          g[k] = rows16_matvec(x + b * I, I, h + b * H, H, w_ih + r0 * I, w_hh + r0 * H) +
                 (load16(b_ih + r0, 16) + load16(b_hh + r0, 16));
        }
        vec_math::activate_lockstep<4, vec_math::lstm_gates(1)>(g);
        const vfloat16 c_new = g[1] * load16(c + b * H + u * 16, 16) + g[0] * g[2];
        const vfloat16 h_new = g[3] * vec_math::tanh16(c_new);
        for (int k = 0; k < 4; ++k) std::memcpy(gates + b * 4 * H + k * H + u * 16, &g[k], sizeof g[k]);
        std::memcpy(cy + b * H + u * 16, &c_new, sizeof c_new);
        std::memcpy(hy + b * H + u * 16, &h_new, sizeof h_new);
      }
  };
  // A team of one runs here: even with its `if` clause false, an OpenMP region costs about 0.5 us to enter and
  // leave, an eighth of a step at input and hidden size 64.
  if (team == 1) {
    run(1, 0);
    return;
  }
#pragma omp parallel num_threads(team)
  run(omp_get_num_threads(), omp_get_thread_num());
}

// lstm_cell_fwd's work once its arguments are checked. Without keep_gates the activated gates go to a per-thread
// scratch buffer where they can (the inference step) and the returned gates tensor is undefined.
std::tuple<Tensor, Tensor, Tensor> lstm_cell_compute(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                                     const Tensor& w_ih, const Tensor& w_hh,
                                                     const std::optional<Tensor>& b_ih,
                                                     const std::optional<Tensor>& b_hh, int64_t H,
                                                     bool keep_gates) {
  const int64_t B = input.size(0);
  const auto ct = compute_type(input.scalar_type());
  const Tensor bi = bias_or_zeros(b_ih, 4 * H, input), bh = bias_or_zeros(b_hh, 4 * H, input);
  const Tensor c_prev = to_compute(cx);
  if (input.scalar_type() == at::kFloat && B <= kSmallBatch && H % 16 == 0) {
    const Tensor xc = input.contiguous(), hc = hx.contiguous(), wi = w_ih.contiguous(), wh = w_hh.contiguous();
    thread_local gemm::Buffer<float> scratch;
    Tensor gates;
    float* g = nullptr;
    if (keep_gates) {
      gates = at::empty({B, 4 * H}, input.options());
      g = gates.data_ptr<float>();
    } else {
      scratch.resize(B * 4 * H);
      g = scratch.data();
    }
    // (at::detail::empty_cpu: the allocation without a dispatched call, a tenth of a microsecond each)
    Tensor cy = at::detail::empty_cpu({B, H}, at::kFloat), hy = at::detail::empty_cpu({B, H}, at::kFloat);
    small_batch_lstm_step(xc.data_ptr<float>(), input.size(1), hc.data_ptr<float>(), c_prev.data_ptr<float>(),
                          wi.data_ptr<float>(), wh.data_ptr<float>(), bi.data_ptr<float>(), bh.data_ptr<float>(), B,
                          H, g, hy.data_ptr<float>(), cy.data_ptr<float>());
    return {hy, cy, gates};
  }
  Tensor gates = input_and_hidden_matmul(input, w_ih, hx, w_hh);  // (B, 4H), contiguous
  Tensor cy = at::empty({B, H}, gates.options());
  Tensor hy = at::empty({B, H}, gates.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_cell_fwd", [&] {
    scalar_t* g = gates.data_ptr<scalar_t>();
    const scalar_t* b1 = bi.data_ptr<scalar_t>();
    const scalar_t* b2 = bh.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    scalar_t* c = cy.data_ptr<scalar_t>();
    scalar_t* h = hy.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(4 * H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        lstm_pointwise_fwd(g + r * 4 * H, b1, b2, cp + r * H, c + r * H, h + r * H, H);
      }
    });
  });
  return {as_type(hy, input.scalar_type()), as_type(cy, input.scalar_type()), gates};
}

int64_t check_lstm_cell(const char* op, const Tensor& input, const Tensor& hx, const Tensor& cx, const Tensor& w_ih,
                        const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh) {
  const int64_t H = check_cell_weights(op, input, w_ih, w_hh, 4, "(4 * hidden_size, input_size)",
                                       "(4 * hidden_size, hidden_size)");
  const int64_t B = input.size(0);
  check_arg(op, "hx", hx, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "cx", cx, {B, H}, "(batch, hidden_size)", "input", input);
  check_biases(op, b_ih, b_hh, 4 * H, "(4 * hidden_size)", input);
  return H;
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell_fwd(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                                 const Tensor& w_ih, const Tensor& w_hh,
                                                 const std::optional<Tensor>& b_ih,
                                                 const std::optional<Tensor>& b_hh) {
  const int64_t H = check_lstm_cell("seqkernels::lstm_cell_fwd", input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  return lstm_cell_compute(input, hx, cx, w_ih, w_hh, b_ih, b_hh, H, /*keep_gates=*/true);
}

}  // namespace

std::tuple<Tensor, Tensor> lstm_cell_step(const Tensor& input, const Tensor& hx, const Tensor& cx,
                                          const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                          const std::optional<Tensor>& b_hh) {
  const int64_t H = check_lstm_cell("seqkernels::lstm_cell_step", input, hx, cx, w_ih, w_hh, b_ih, b_hh);
  auto [hy, cy, gates] = lstm_cell_compute(input, hx, cx, w_ih, w_hh, b_ih, b_hh, H, /*keep_gates=*/false);
  return {hy, cy};
}

namespace {

// Returns grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias (the same for b_ih and b_hh).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_cell_bwd(
    const Tensor& grad_hy, const Tensor& grad_cy, const Tensor& input, const Tensor& hx, const Tensor& cx,
    const Tensor& w_ih, const Tensor& w_hh, const Tensor& cy, const Tensor& gates) {
  constexpr const char* op = "seqkernels::lstm_cell_bwd";
  const int64_t H = check_cell_weights(op, input, w_ih, w_hh, 4, "(4 * hidden_size, input_size)",
                                       "(4 * hidden_size, hidden_size)");
  const int64_t B = input.size(0);
  const auto ct = compute_type(input.scalar_type());
  check_arg(op, "grad_hy", grad_hy, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "grad_cy", grad_cy, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "hx", hx, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "cx", cx, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "cy", cy, {B, H}, "(batch, hidden_size)", "input", input);
  check_cpu_float(op, "gates", gates);
  TORCH_CHECK(gates.scalar_type() == ct, op, ": expected gates (saved by lstm_cell_fwd) to have dtype ", ct,
              ", got ", gates.scalar_type());
  check_shape(op, "gates", gates, {B, 4 * H}, "(batch, 4 * hidden_size)");

  const Tensor gates_c = gates.contiguous();
  const Tensor c_prev = cx.to(ct).contiguous();
  const Tensor c_new = cy.to(ct).contiguous();
  const Tensor dh = grad_hy.to(ct).contiguous();
  const Tensor dc = grad_cy.to(ct).contiguous();
  Tensor grad_gates = at::empty({B, 4 * H}, gates_c.options());
  Tensor grad_cx = at::empty({B, H}, gates_c.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_cell_bwd", [&] {
    const scalar_t* g = gates_c.data_ptr<scalar_t>();
    const scalar_t* cp = c_prev.data_ptr<scalar_t>();
    const scalar_t* cn = c_new.data_ptr<scalar_t>();
    const scalar_t* gh = dh.data_ptr<scalar_t>();
    const scalar_t* gc = dc.data_ptr<scalar_t>();
    scalar_t* gg = grad_gates.data_ptr<scalar_t>();
    scalar_t* gcx = grad_cx.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(4 * H), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> tanh_c(H);
      for (int64_t r = begin; r < end; ++r) {
        lstm_pointwise_bwd(g + r * 4 * H, cp + r * H, cn + r * H, gh + r * H, gc + r * H, gg + r * 4 * H,
                           gcx + r * H, tanh_c.data(), H);
      }
    });
  });
  const auto dt = input.scalar_type();
  Tensor grad_input = at::mm(grad_gates, w_ih.to(ct)).to(dt);
  Tensor grad_hx = at::mm(grad_gates, w_hh.to(ct)).to(dt);
  Tensor grad_w_ih = at::mm(grad_gates.t(), input.to(ct)).to(dt);
  Tensor grad_w_hh = at::mm(grad_gates.t(), hx.to(ct)).to(dt);
  Tensor grad_bias = grad_gates.sum(0).to(dt);
  return {grad_input, grad_hx, grad_cx.to(dt), grad_w_ih, grad_w_hh, grad_bias};
}

}  // namespace

// ---------------------------------------------------------------------------------------------------------------
// RNN cell: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh), act = tanh or relu

Tensor rnn_cell_fwd(const Tensor& input, const Tensor& hx, const Tensor& w_ih, const Tensor& w_hh,
                    const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
                    const std::string& nonlinearity) {
  constexpr const char* op = "seqkernels::rnn_cell_fwd";
  const bool relu = is_relu(op, nonlinearity);
  const int64_t H =
      check_cell_weights(op, input, w_ih, w_hh, 1, "(hidden_size, input_size)", "(hidden_size, hidden_size)");
  const int64_t B = input.size(0);
  check_arg(op, "hx", hx, {B, H}, "(batch, hidden_size)", "input", input);
  check_biases(op, b_ih, b_hh, H, "(hidden_size)", input);

  Tensor pre = input_and_hidden_matmul(input, w_ih, hx, w_hh);
  const Tensor bi = bias_or_zeros(b_ih, H, input), bh = bias_or_zeros(b_hh, H, input);
  AT_DISPATCH_FLOATING_TYPES(pre.scalar_type(), "rnn_cell_fwd", [&] {
    scalar_t* p = pre.data_ptr<scalar_t>();
    const scalar_t* b1 = bi.data_ptr<scalar_t>();
    const scalar_t* b2 = bh.data_ptr<scalar_t>();
    at::parallel_for(0, B, row_grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* __restrict__ row = p + r * H;
        if (relu) {
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t v = row[j] + (b1[j] + b2[j]);
            row[j] = v > scalar_t(0) ? v : scalar_t(0);
          }
        } else {
          for (int64_t j = 0; j < H; ++j) row[j] += b1[j] + b2[j];
          vec_math::tanh(row, row, H);
        }
      }
    });
  });
  return as_type(pre, input.scalar_type());
}

namespace {

// Returns grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias (the same for b_ih and b_hh).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_cell_bwd(const Tensor& grad_hy, const Tensor& input,
                                                                const Tensor& hx, const Tensor& w_ih,
                                                                const Tensor& w_hh, const Tensor& hy,
                                                                const std::string& nonlinearity) {
  constexpr const char* op = "seqkernels::rnn_cell_bwd";
  const bool relu = is_relu(op, nonlinearity);
  const int64_t H =
      check_cell_weights(op, input, w_ih, w_hh, 1, "(hidden_size, input_size)", "(hidden_size, hidden_size)");
  const int64_t B = input.size(0);
  check_arg(op, "grad_hy", grad_hy, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "hx", hx, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "hy", hy, {B, H}, "(batch, hidden_size)", "input", input);

  const auto ct = compute_type(input.scalar_type());
  Tensor grad_pre = grad_hy.to(ct).contiguous().clone();
  const Tensor out = hy.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "rnn_cell_bwd", [&] {
    scalar_t* d = grad_pre.data_ptr<scalar_t>();
    const scalar_t* y = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * H, 16384, [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        d[k] *= relu ? (y[k] > scalar_t(0) ? scalar_t(1) : scalar_t(0)) : scalar_t(1) - y[k] * y[k];
      }
    });
  });
  const auto dt = input.scalar_type();
  return {at::mm(grad_pre, w_ih.to(ct)).to(dt), at::mm(grad_pre, w_hh.to(ct)).to(dt),
          at::mm(grad_pre.t(), input.to(ct)).to(dt), at::mm(grad_pre.t(), hx.to(ct)).to(dt),
          grad_pre.sum(0).to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("lstm_cell_fwd", &lstm_cell_fwd);
  m.impl("lstm_cell_bwd", &lstm_cell_bwd);
  m.impl("rnn_cell_fwd", &rnn_cell_fwd);
  m.impl("rnn_cell_bwd", &rnn_cell_bwd);
}

}  // namespace seqkernels
