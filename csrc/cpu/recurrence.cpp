// Whole-sequence LSTM and RNN layers (one layer, one direction per call), forward and backward through time.
//
// Layout: the packed-rows form of torch's PackedSequence. `input` is (N, input_size); `batch_sizes` (T,) says how
// many sequences take part in each time step (non-increasing: sequences sorted by decreasing length), and the
// rows of step t are the `batch_sizes[t]` rows that follow those of steps < t. A batch of equal lengths is the
// case batch_sizes[t] = B, N = T * B. Because the sequences active at step t are always a prefix of the batch,
// finished sequences simply stop being computed, outputs exist only for real steps, and each sequence's final
// state is its state at its own length.
//
// Forward: one OpenMP team for the whole sequence. Each thread owns a slice of the hidden units and packs the
// matching rows of W_ih and W_hh once (so they stay in its cache for every step). It computes the input
// projection of its gate columns as GEMMs over chunks of steps (128 rows, or one step if larger), each just
// before the chunk's first step so the result is read back from L2 (InputProjection); and per step its slice of
// h_{t-1} @ W_hh^T with a register-blocked micro-kernel, added onto the projection in place, followed by the fused
// gate activations and state update of its own units. Without a projection each thread publishes its part of h_t
// (written straight into the step's output rows, which the next step reads) through a step counter and starts
// the next step on the part it wrote itself, waiting for the others' parts only when it reaches them (StepFlags),
// and meanwhile computing pieces of the next chunk of the projection of the thread it waits for;
// with one (split by output columns) two barriers per step publish h~_t and h_t. A float forward whose weights
// outgrow L2 keeps the batch in the vector lanes instead (see "Batch-in-lanes forward"). Sequences of one length
// split the batch between the threads instead of the units, forward and backward (row_groups).
//
// Backward: per step (in reverse processing order) the gate gradients of each thread's units, summed into their
// bias gradient as they are written (BiasGrad), then dh_{t-1} = dG_t @ W_hh split by columns. Without a projection
// a thread's columns of dh are its own units, so it only waits for the others' gate gradients, each when it
// reaches them (StepFlags, as in the forward); with one, two barriers per step. The output gradient is read in
// place, with its strides (GradRows). In the LSTM, after dh, each thread also computes its columns of the
// step's rows of grad_input = dG_t @ W_ih while dG_t is in cache (with W_ih's columns packed once, as W_hh's):
// the training step at batch 32 ran 0.7-1.0 ms faster than with grad_input as a GEMM afterwards, which read dG
// back from memory (the RNN's grad_input still is one). The weight gradients are one GEMM over all steps
// afterwards (gemm::parallel_matmul: [grad_w_ih | grad_w_hh] = dG^T @ [x | h_prev], which packs dG^T once).
// Where the time goes at batch 32, hidden size 256, 128 steps (a thread, rdtsc), on a Zen 4 core, before
// grad_input moved into the loop: the pointwise part 2.9 ms, which looks bound by memory traffic (a step reads
// about 100 KB of saved gates and cells and writes 64 KB of dG a thread); the dh matmul 10.0 ms (92% of the
// core's FMA peak); then the GEMMs, 31.4 ms on both cores at 88-90% of their peak (torch's BLAS, MKL, took 35 ms
// on them). On an Intel AVX-512 core the pointwise part took 2.5 ms and stayed there with a one-pass register
// version, with the next step's rows prefetched, and with dG streamed out non-temporally; the dh matmul 7.5 ms;
// MKL's GEMMs 22.5 ms (the packed GEMMs of an earlier version of ours were no faster there).
//
// Every multiply-add chain has a fixed order for a given thread count, so results are bitwise reproducible; they
// depend on the thread count by rounding only (the recurrences without a projection, whose threads sum the
// recurrent matmul's k-ranges starting with their own, as the LSTM's grad_input does).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common.h"
#include "gemm_kernel.h"
#include "gemm_parallel.h"
#include "vec_math.h"

namespace seqkernels {
namespace {

using at::Tensor;
using gemm::round_up;

// ---------------------------------------------------------------------------------------------------------------
// Time schedule of a packed batch

struct Schedule {
  int64_t T = 0, B = 0, N = 0;
  bool reverse = false;
  bool contiguous = true;        // the rows of consecutive steps follow each other (not in a row group's)
  std::vector<int64_t> bs, off;  // per time index t: active rows, offset of the step's first row

  // Time index of the s-th step in forward processing order.
  int64_t t_of(int64_t s) const { return reverse ? T - 1 - s : s; }
  // Active rows of the step processed after the s-th (0 after the last). Rows in [bs_after(s), bs[t_of(s)])
  // take their last step at s.
  int64_t bs_after(int64_t s) const { return s + 1 < T ? bs[t_of(s + 1)] : 0; }
  // Rows [r0, r1) of the processing steps [s0, s1): contiguous, since the steps' time indices are.
  std::pair<int64_t, int64_t> rows_of_steps(int64_t s0, int64_t s1) const {
    const int64_t ta = std::min(t_of(s0), t_of(s1 - 1)), tb = std::max(t_of(s0), t_of(s1 - 1));
    return {off[ta], off[tb] + bs[tb]};
  }
  // Packed row holding the state that row b of step t starts from, or -1 for the initial state.
  int64_t prev_row(int64_t t, int64_t b) const {
    if (!reverse) return t > 0 ? off[t - 1] + b : -1;
    return (t + 1 < T && b < bs[t + 1]) ? off[t + 1] + b : -1;
  }
  // Rows [r0, r1) of every step as a batch of their own (a row group, see row_groups): row b of its step t is
  // row r0 + b of this schedule's, at the same packed row, so outputs and saves keep their places.
  Schedule rows(int64_t r0, int64_t r1) const {
    Schedule g = *this;
    g.B = r1 - r0;
    g.contiguous = r0 == 0 && r1 == B;
    for (int64_t t = 0; t < T; ++t) {
      g.bs[t] = std::clamp<int64_t>(bs[t] - r0, 0, r1 - r0);
      g.off[t] = off[t] + r0;
    }
    return g;
  }
};

Schedule make_schedule(const char* op, const Tensor& batch_sizes, int64_t N, int64_t B, bool reverse) {
  TORCH_CHECK(batch_sizes.device().is_cpu() && batch_sizes.scalar_type() == at::kLong && batch_sizes.dim() == 1,
              op, ": expected batch_sizes to be a 1-D int64 CPU tensor, got a ", batch_sizes.dim(), "-D ",
              batch_sizes.scalar_type(), " tensor on ", batch_sizes.device());
  Schedule s;
  s.T = batch_sizes.size(0);
  s.B = B;
  s.reverse = reverse;
  TORCH_CHECK(s.T > 0, op, ": expected at least one time step (batch_sizes of length > 0), got 0");
  const Tensor bsc = batch_sizes.contiguous();
  const int64_t* p = bsc.data_ptr<int64_t>();
  s.bs.assign(p, p + s.T);
  s.off.resize(s.T);
  TORCH_CHECK(s.bs[0] == B, op, ": expected batch_sizes[0] to equal the batch size of h0 (", B, "), got ", s.bs[0]);
  int64_t total = 0;
  for (int64_t t = 0; t < s.T; ++t) {
    TORCH_CHECK(s.bs[t] >= (B > 0 ? 1 : 0), op, ": expected batch_sizes[", t, "] >= 1, got ", s.bs[t]);
    TORCH_CHECK(t == 0 || s.bs[t] <= s.bs[t - 1], op,
                ": expected batch_sizes to be non-increasing (sequences sorted by decreasing length), got ",
                s.bs[t], " after ", s.bs[t - 1], " at step ", t);
    s.off[t] = total;
    total += s.bs[t];
  }
  TORCH_CHECK(total == N, op, ": expected input to have sum(batch_sizes) = ", total, " rows, got ", N);
  s.N = N;
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Step synchronization

// Waits until done() holds: a step lasts a few microseconds, so the thread spins (with a pause) rather than sleep
// as OpenMP's barrier may; after a long wait it yields the core.
template <typename Done>
void spin_until(Done done) {
  spin_until(done, [] { return false; });
}

// spin_until that calls work() while it waits: work does a piece of useful work and returns true, or returns
// false when there is none.
template <typename Done, typename Work>
void spin_until(Done done, Work work) {
  for (int spins = 0; !done(); ++spins) {
    if (work()) {
      spins = 0;
      continue;
    }
    if (spins < 20000) {
#if defined(__x86_64__) || defined(__i386__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// A sense-reversing barrier for one OpenMP team, waited on with spin_until. Release/acquire on the sense
// publishes every write made before the barrier.
class StepBarrier {
 public:
  // One thread's handle on the barrier, holding that thread's sense.
  class Member {
   public:
    explicit Member(StepBarrier& barrier) : barrier_(barrier) {}
    void wait() { barrier_.wait(sense_); }

   private:
    StepBarrier& barrier_;
    bool sense_ = false;
  };

  // Called by every thread at the start of the parallel region: sizes the barrier to the actual team.
  Member join(int team) {
#pragma omp single
    size_ = team;
    return Member(*this);
  }

 private:
  void wait(bool& sense) {
    sense = !sense;
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      sense_.store(sense, std::memory_order_release);
      return;
    }
    spin_until([&] { return sense_.load(std::memory_order_acquire) == sense; });
  }

  int size_ = 1;
  std::atomic<int> arrived_{0};
  std::atomic<bool> sense_{false};
};

// A state double buffer (two halves of n values) with both halves starting as `init`: rows a step does not
// update keep their value whichever half is read next.
template <typename T>
gemm::Buffer<T> double_buffer(const T* init, int64_t n) {
  gemm::Buffer<T> buf(2 * n);
  std::copy(init, init + n, buf.begin());
  std::copy(init, init + n, buf.begin() + n);
  return buf;
}

// ---------------------------------------------------------------------------------------------------------------
// Work split

struct Range {
  int64_t begin = 0, end = 0;
  int64_t size() const { return end - begin; }
};

// Thread `tid` of `team` gets a contiguous block of [0, n), aligned to `align` so vectors do not straddle threads.
Range split(int64_t n, int team, int tid, int64_t align) {
  const int64_t chunk = round_up((n + team - 1) / team, align);
  Range r;
  r.begin = std::min(n, tid * chunk);
  r.end = std::min(n, r.begin + chunk);
  return r;
}

// Every thread's block of the H hidden units (split's blocks for u = 0 .. team - 1).
std::vector<Range> unit_ranges(int64_t H, int team, int64_t align) {
  std::vector<Range> units(team);
  for (int u = 0; u < team; ++u) units[u] = split(H, team, u, align);
  return units;
}

// Threads for a recurrence: one per 16 hidden units at most, and one in all when a step is too small to pay
// for a barrier.
int team_size(int64_t gates, int64_t H, int64_t P, int64_t B) {
  const int64_t step_madds = B * gates * H * P;
  if (step_madds < 16384 || at::in_parallel_region()) return 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (H + 15) / 16)));
}

// Per-thread step counters for the recurrences without a projection, where thread u computes (and publishes)
// the columns J_u of h. At step s a thread first multiplies the part of h_{t-1} it wrote itself, then, for each
// other thread u, waits until u has published step s - 1 and multiplies u's part: the wait overlaps with the
// thread's own share of the matmul instead of a barrier stalling every step. Each step's values go to rows of
// their own (the output rows in the forward, see previous_outputs; the gate-gradient rows in the backward), so
// nothing another thread may still read is overwritten.
//
// A thread that waits may work for the one it waits for meanwhile (set_help: help(u, published) does a piece of
// u's work, given the steps u has published, or returns false), see InputProjection::help.
class StepFlags {
 public:
  explicit StepFlags(int team) : flags_(team) {}
  void set_help(std::function<bool(int, int64_t)> help) { help_ = std::move(help); }
  // Blocks until thread u has published `steps` steps.
  void wait(int u, int64_t steps) const {
    auto published = [&] { return flags_[u].steps.load(std::memory_order_acquire); };
    spin_until([&] { return published() >= steps; }, [&] { return help_ && help_(u, published()); });
  }
  // Publishes thread u's writes of its first `steps` steps.
  void publish(int u, int64_t steps) { flags_[u].steps.store(steps, std::memory_order_release); }

 private:
  struct alignas(64) Flag {  // one cache line each: a thread's stores do not disturb the others' loads
    std::atomic<int64_t> steps{0};
  };
  std::vector<Flag> flags_;
  std::function<bool(int, int64_t)> help_;
};

// C (+)= A @ Bp (adding to C with `accumulate`) over the k-ranges of every thread, the calling thread's own
// first, then the others' in thread order, each once thread u has published `steps` steps (see StepFlags).
// Thread u's k-ranges are units[u] offset by g * stride for g < segments: its hidden units in each of the
// `segments` gate blocks. Another thread's part of A was just written in that thread's cache, so every line of it
// is prefetched as soon as it is published: left to the micro-kernel's broadcasts, the lines arrive one row block
// at a time, a cross-core miss each. (Measured in A/B runs alternating within one process: the prefetch took
// 0.6-1.7% off the forward at batch 32, hidden size 256, in three runs and 2% off the packed-sequence forward; the
// training step did not change beyond noise, nor did whole benchmark runs, which are noisier than that.)
template <typename T>
void matmul_own_first(int64_t M, const T* A, int64_t lda, const gemm::PackedB<T>& Bp, T* C, int64_t ldc,
                      const std::vector<Range>& units, int tid, const StepFlags& flags, int64_t steps,
                      int segments = 1, int64_t stride = 0, bool accumulate = false) {
  bool first = true;
  auto multiply = [&](const Range& r) {
    for (int g = 0; g < segments; ++g) {
      const int64_t k0 = g * stride + r.begin, k1 = g * stride + r.end;
      if (first || k1 > k0) Bp.matmul(M, k0, k1, A + k0, lda, C, ldc, /*accumulate=*/accumulate || !first);
      first = false;
    }
  };
  multiply(units[tid]);
  for (int u = 0; u < static_cast<int>(units.size()); ++u) {
    if (u == tid) continue;
    flags.wait(u, steps);
    for (int64_t m = 0; m < M; ++m)
      for (int g = 0; g < segments; ++g) {
        const T* row = A + m * lda + g * stride;
        for (int64_t k = units[u].begin; k < units[u].end; k += 64 / sizeof(T)) __builtin_prefetch(row + k);
      }
    multiply(units[u]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Pointwise parts of one step for a thread's units [j0, j0 + Jn). `g` points at the thread's gate sums for the row
// (input projection plus recurrent sums), gate-major (gate k of local unit jj at g[k * Jn + jj]); `bias` at unit j0
// of b_ih + b_hh (gate k of unit j at bias[k * H + j]). `tmp` holds Jn values.

// Where a row's training saves go besides the state (c, h): the activated gates and cell state kept for the
// backward (gate k of the first unit at gates[k * H]), both null when not training. `stream`: they are 64-byte
// aligned with H a multiple of 16, so whole vectors of them are written with non-temporal stores (see
// vec_math::stream_copy).
template <typename T>
struct RowOut {
  T* gates;
  T* cells;
  bool stream;
};

template <typename T>
inline void lstm_units_fwd(const T* __restrict__ bias, int64_t H, T* __restrict__ g, int64_t Jn, T* __restrict__ c,
                           T* __restrict__ h, T* __restrict__ tmp, const RowOut<T>& o) {
  for (int k = 0; k < 4; ++k)
    for (int64_t jj = 0; jj < Jn; ++jj) g[k * Jn + jj] += bias[k * H + jj];
  vec_math::sigmoid(g, g, 2 * Jn);  // i, f
  vec_math::tanh(g + 2 * Jn, g + 2 * Jn, Jn);
  vec_math::sigmoid(g + 3 * Jn, g + 3 * Jn, Jn);
  for (int64_t jj = 0; jj < Jn; ++jj) c[jj] = g[Jn + jj] * c[jj] + g[jj] * g[2 * Jn + jj];
  vec_math::tanh(c, tmp, Jn);
  for (int64_t jj = 0; jj < Jn; ++jj) h[jj] = g[3 * Jn + jj] * tmp[jj];
  if (o.gates) {
    for (int k = 0; k < 4; ++k) vec_math::stream_copy(g + k * Jn, o.gates + k * H, Jn);
    vec_math::stream_copy(c, o.cells, Jn);
  }
}

// float: one pass, 32 units at a time, their eight gate activations and then their two tanh(c) in lockstep
// (vec_math::activate_lockstep), everything in registers between the loads and the stores. The pass over a step
// went from 10.2 to 7.4 us at batch 32 and 128 units (measured alone), and to 6.7 us with AVX-512's table tanh
// (see vec_math), and the saves go straight from the registers. `n` is the number of units left from j on: kFull
// (n >= 32) takes whole-vector loads and stores, which keep the loop in registers; the tail takes partial ones.
template <bool kFull>
inline void lstm_units32_fwd(const float* __restrict__ bias, int64_t H, const float* __restrict__ g, int64_t Jn,
                             int64_t j, int64_t n, float* __restrict__ c, float* __restrict__ h,
                             const RowOut<float>& o) {
  using V = vec_math::vnative;                    // 16 floats with AVX-512, 8 with AVX2
  constexpr int W = vec_math::kNativeLanes, NV = 32 / W;  // vectors per gate
  int64_t lanes[NV];  // elements from each vector's first unit on (<= 0: none)
  for (int u = 0; u < NV; ++u) lanes[u] = n - W * u;
  auto load = [&](const float* p, int u) { return vec_math::load_native(p, kFull ? W : lanes[u]); };
  auto store = [&](float* p, const V& v, int u) {
    std::memcpy(p, &v, (kFull ? W : std::clamp<int64_t>(lanes[u], 0, W)) * sizeof(float));
  };
  auto save = [&](float* p, const V& v, int u) {
    if (kFull && o.stream)
      vec_math::stream_native(p, v);
    else
      store(p, v, u);
  };
  V v[4 * NV] = {}, cs[NV] = {};
  for (int u = 0; u < NV && lanes[u] > 0; ++u)
    for (int k = 0; k < 4; ++k) {
      const int64_t at = k * Jn + j + W * u;
      v[4 * u + k] = load(g + at, u) + load(bias + k * H + j + W * u, u);
    }
  vec_math::activate_native<4 * NV, vec_math::lstm_gates(NV)>(v);
  for (int u = 0; u < NV && lanes[u] > 0; ++u) {
    cs[u] = v[4 * u + 1] * load(c + j + W * u, u) + v[4 * u] * v[4 * u + 2];
    store(c + j + W * u, cs[u], u);
    if (o.gates) {
      for (int k = 0; k < 4; ++k) save(o.gates + k * H + j + W * u, v[4 * u + k], u);
      save(o.cells + j + W * u, cs[u], u);
    }
  }
  vec_math::activate_native<NV, (1u << NV) - 1>(cs);
  for (int u = 0; u < NV && lanes[u] > 0; ++u) store(h + j + W * u, v[4 * u + 3] * cs[u], u);
}

inline void lstm_units_fwd(const float* __restrict__ bias, int64_t H, float* __restrict__ g, int64_t Jn,
                           float* __restrict__ c, float* __restrict__ h, float* /*tmp*/, const RowOut<float>& o) {
  int64_t j = 0;
  for (; j + 32 <= Jn; j += 32) lstm_units32_fwd<true>(bias, H, g, Jn, j, 32, c, h, o);
  if (j < Jn) lstm_units32_fwd<false>(bias, H, g, Jn, j, Jn - j, c, h, o);
}

template <typename T, bool kProj>
inline void lstm_units_bwd(const T* __restrict__ gates, int64_t H, const T* __restrict__ cell,
                           const T* __restrict__ cprev, const T* __restrict__ dh, T* __restrict__ dc,
                           T* __restrict__ dG, T* __restrict__ htilde, T* __restrict__ tc, int64_t Jn) {
  vec_math::tanh(cell, tc, Jn);
  for (int64_t jj = 0; jj < Jn; ++jj) {
    const T i = gates[jj], f = gates[H + jj], g = gates[2 * H + jj], o = gates[3 * H + jj];
    const T d = dc[jj] + dh[jj] * o * (T(1) - tc[jj] * tc[jj]);
    dG[jj] = d * g * i * (T(1) - i);
    dG[H + jj] = d * cprev[jj] * f * (T(1) - f);
    dG[2 * H + jj] = d * i * (T(1) - g * g);
    dG[3 * H + jj] = dh[jj] * tc[jj] * o * (T(1) - o);
    dc[jj] = d * f;
    if (kProj) htilde[jj] = o * tc[jj];
  }
}

template <typename T>
inline void rnn_units_fwd(const T* __restrict__ bias, T* __restrict__ g, int64_t Jn, bool relu, T* __restrict__ h) {
  for (int64_t jj = 0; jj < Jn; ++jj) g[jj] += bias[jj];
  if (relu) {
    for (int64_t jj = 0; jj < Jn; ++jj) h[jj] = g[jj] > T(0) ? g[jj] : T(0);
  } else {
    vec_math::tanh(g, h, Jn);
  }
}

// A thread's slice of W transposed, as the B of its recurrent matmuls: B[k][r] = W[row_of(r)][k] for k < K,
// r < rows, columns padded with zeros to `ldo`. `max_rows` is the batch size (see gemm::PackedB).
template <typename T, typename RowOf>
gemm::PackedB<T> pack_transposed(const T* W, int64_t ld, int64_t rows, RowOf row_of, int64_t K, int64_t ldo,
                                 int64_t max_rows) {
  gemm::PackedB<T> packed;
  packed.pack_transposed(K, ldo, max_rows, rows, [&](int64_t r) { return W + row_of(r) * ld; });
  return packed;
}

// Columns [c0, c0 + C) of a row-major (R, ld) matrix as the B of a thread's matmuls, columns padded with zeros to
// `ldo`.
template <typename T>
gemm::PackedB<T> pack_columns(const T* W, int64_t ld, int64_t R, int64_t c0, int64_t C, int64_t ldo,
                              int64_t max_rows) {
  gemm::PackedB<T> packed;
  packed.pack_rows(R, ldo, max_rows, C, [&](int64_t r) { return W + r * ld + c0; });
  return packed;
}

// The input projection x @ W_ih^T of a thread's gate columns, computed a chunk of steps at a time (one GEMM per
// chunk, of up to max(batch, kChunkRows) rows) just before the chunk's first step, into a buffer that stays in the
// thread's L2. Computed for all steps at once (16 MB at batch 32 and hidden size 256), the projection is read back
// from L3 or memory: at batch 32 the layer ran 8% slower with it computed by the BLAS and 11% slower with it
// computed by the team (at batch 64: as fast, and 12% slower). The rows of step s are at step_rows(s), its gate
// columns in the layout of the thread's recurrent sums, which each step adds in place (so the step's sums need no
// buffer of their own, and its pointwise part reads one stream rather than two); a buffer holds its chunk's steps
// in time order. A row group's steps (S.B rows each, not contiguous from step to step) are the sets of one
// PackedB::matmul_sets: with a GEMM per step, the group streamed its slice of W_ih from L3 every step where its
// weights outgrow L2.
//
// Shared (a team of several threads): a chunk's GEMM is split into kPieces ranges of column blocks, which the
// owner claims at the chunk's first step, and which a thread waiting for the owner's part of h (StepFlags) may
// claim beforehand for the owner's next chunk (help), written into the second of two buffers. The VM's cores run
// at different speeds for seconds at a time, and the fast thread otherwise spent the wait spinning: in the packed
// forward at batch 32 one thread waited 0-15 ms of a 20-40 ms call. With this sharing that forward took 4-10% less
// (medians 25.3 against 26.4 ms and 23.1 against 25.2, alternating in one process on a Zen 3 VM) and the forward at
// batch 8, sizes 256, 3% less. A piece's sums do not depend on who computes it, so the results stay bitwise
// reproducible.
template <typename T>
class InputProjection {
 public:
  static constexpr int64_t kChunkRows = 128;
  static constexpr int kPieces = 4;

  template <typename RowOf>
  InputProjection(const Schedule& S, const T* x, const T* w_ih, int64_t I, int64_t cols, RowOf row_of, int64_t ldg,
                  bool shared)
      : S_(S), x_(x), I_(I), ldg_(ldg), cap_(std::max(S.B, kChunkRows)), buffers_(shared ? 2 : 1) {
    w_ = pack_transposed(w_ih, I, cols, row_of, I, ldg, cap_);
    pieces_ = shared ? static_cast<int>(std::clamp<int64_t>(w_.blocks(), 1, kPieces)) : 1;
    chunk_of_.resize(S.T);
    for (int64_t s = 0; s < S.T;) {  // chunks: as many steps as fit in cap_ rows, one at least
      int64_t s1 = s + 1;
      while (s1 < S.T && rows_of(s, s1 + 1) <= cap_) ++s1;
      for (int64_t q = s; q < s1; ++q) chunk_of_[q] = static_cast<int64_t>(starts_.size());
      starts_.push_back(s);
      s = s1;
    }
    starts_.push_back(S.T);
    claims_ = std::vector<Claims>(starts_.size() - 1);
    buf_.resize(buffers_ * cap_ * ldg);
  }

  // Called at every step s (in processing order): at a chunk's first step, computes the pieces no other thread has
  // claimed and waits for those that one has.
  void at_step(int64_t s) {
    const int64_t c = chunk_of_[s];
    if (c == current_) return;
    current_ = c;
    Claims& cl = claims_[c];
    for (int p; (p = cl.claimed.fetch_add(1, std::memory_order_relaxed)) < pieces_;) {
      compute(c, p);
      cl.done.fetch_add(1, std::memory_order_release);
    }
    spin_until([&] { return cl.done.load(std::memory_order_acquire) >= pieces_; });
  }

  // Called by another thread, given the steps this one has published (at least 1, so that this one exists):
  // computes one unclaimed piece of the chunk after the one this thread is in, if there is one (whose buffer it no
  // longer reads), and returns whether it did. A stale count only points at a chunk already claimed in full.
  bool help(int64_t published) {
    if (pieces_ < 2 || published >= S_.T) return false;
    const int64_t c = chunk_of_[published] + 1;
    if (c + 1 >= static_cast<int64_t>(starts_.size())) return false;
    Claims& cl = claims_[c];
    if (cl.claimed.load(std::memory_order_relaxed) >= pieces_) return false;
    const int p = cl.claimed.fetch_add(1, std::memory_order_relaxed);
    if (p >= pieces_) return false;
    compute(c, p);
    cl.done.fetch_add(1, std::memory_order_release);
    return true;
  }

  T* step_rows(int64_t s) {
    const int64_t c = chunk_of_[s], t = S_.t_of(s), t0 = first_time(c);
    return buffer(c) + (S_.contiguous ? S_.off[t] - S_.off[t0] : (t - t0) * S_.B) * ldg_;
  }

 private:
  struct alignas(64) Claims {  // per chunk: pieces claimed and pieces done
    std::atomic<int> claimed{0}, done{0};
  };

  int64_t rows_of(int64_t s0, int64_t s1) const {  // rows of the steps [s0, s1)
    const auto [r0, r1] = S_.rows_of_steps(s0, s1);
    return S_.contiguous ? r1 - r0 : (s1 - s0) * S_.B;
  }
  int64_t first_time(int64_t c) const { return std::min(S_.t_of(starts_[c]), S_.t_of(starts_[c + 1] - 1)); }
  T* buffer(int64_t c) { return buf_.data() + (c % buffers_) * cap_ * ldg_; }

  // Piece p of chunk c: its column blocks of every row of the chunk.
  void compute(int64_t c, int p) {
    const int64_t s0 = starts_[c], s1 = starts_[c + 1], t0 = first_time(c), nb = w_.blocks();
    const int64_t b0 = nb * p / pieces_, b1 = nb * (p + 1) / pieces_;
    T* buf = buffer(c);
    if (S_.contiguous) {
      const T* a = x_ + S_.off[t0] * I_;
      w_.matmul_sets(1, rows_of(s0, s1), 0, I_, [&](int64_t) { return std::pair<const T*, T*>(a, buf); }, I_, ldg_,
                     false, b0, b1);
    } else {
      w_.matmul_sets(s1 - s0, S_.B, 0, I_, [&](int64_t j) {
        return std::pair<const T*, T*>(x_ + S_.off[t0 + j] * I_, buf + j * S_.B * ldg_);
      }, I_, ldg_, false, b0, b1);
    }
  }

  const Schedule& S_;
  const T* x_;
  int64_t I_, ldg_, cap_, buffers_;
  int pieces_ = 1;
  gemm::PackedB<T> w_;
  std::vector<int64_t> chunk_of_, starts_;  // each step's chunk; each chunk's first step, then S.T
  std::vector<Claims> claims_;
  gemm::UninitBuffer<T> buf_;  // each chunk's pieces write its rows in full
  int64_t current_ = -1;       // the chunk of the last at_step
};

// h_{t-1} of the s-th step's rows (bs rows, P apart), as the A of the recurrent matmul of a forward without a
// projection. There a row's h_t is its output row: written once, by its step, and only read after that (by the next
// step), so no thread waits before writing its part and no line that another core has read is written again (as
// it was in a double buffer). Where the step has rows its predecessor did not (a reverse pass over sequences of
// different lengths, where they begin), the rows are gathered with h0 into `scratch`, after ready() (every thread
// has published the previous step).
template <typename T, typename Ready>
const T* previous_outputs(const Schedule& S, int64_t s, const T* out, const T* h0, int64_t P, gemm::Buffer<T>& scratch,
                          Ready ready) {
  if (s == 0) return h0;
  const int64_t t = S.t_of(s), tp = S.t_of(s - 1), bs = S.bs[t], kept = std::min(bs, S.bs[tp]);
  if (kept == bs) return out + S.off[tp] * P;
  ready();
  scratch.resize(bs * P);
  std::copy(out + S.off[tp] * P, out + (S.off[tp] + kept) * P, scratch.begin());
  std::copy(h0 + kept * P, h0 + bs * P, scratch.begin() + kept * P);
  return scratch.data();
}

// Waits until every thread has published `steps` steps.
inline void wait_all(const StepFlags& flags, int team, int64_t steps) {
  for (int u = 0; u < team; ++u) flags.wait(u, steps);
}

// Row groups: the batch split between the threads, each running the recurrence of its own rows over every unit
// alone (a team of one), so that no step waits for another core's part of h or of the gate gradients. Used for
// sequences of one length without a projection, with kRowsPerGroup rows a thread or more; returns the groups' row
// bounds (team + 1 of them), or nothing where the team splits the units instead. A group's rows of consecutive
// steps are not contiguous: its input projection multiplies a chunk's steps as the sets of one matmul_sets.
//
// On the 2-core Zen 4 VM of the README the two cores' round trip through a shared cache line takes about 80 ns in
// some spells and 330-390 ns in others (the VM's cores on different parts of the host's chip, it seems). In the
// slow spells the unit split's per-step exchange made the batch-32 training step 15-17% slower (76 against 65-66
// ms), where torch's got 6% slower; with row groups it took 66-68 ms in those spells (two one-thread layers
// side by side), and 1.5-2% less than the unit split in the fast ones (64.0-64.7 against 65.3-66.6 ms), with
// inference as fast (20.4-20.9 ms both). For packed sequences of different lengths (measured there when a row
// group's projection was a GEMM per step) the per-step projections of the shrinking steps cost more than the
// exchange saves in fast spells (batch 32: 13.2-13.3 against 12.3-12.7 ms), so those keep the unit split.
//
// A row group reads all of the layer's weights every step, where the unit split reads a slice of 1/team of them.
// Where that slice fits in a core's L2 and the whole does not, the unit split wins: on an Intel AVX-512 VM (2 MiB
// of L2 a core, a fast round trip) row groups made the batch-32 LSTM at hidden size 256 (2 MiB of W_ih and W_hh)
// 27% slower in inference (20.7 against 16.2 ms) and 11% in training (59.1 against 53.4), each streaming its
// weights from L3, where the unit split's halves stay in L2; the RNN (512 KiB) was 9% faster with row groups
// (4.3 against 4.8 ms). `weight_bytes` is the size of the weights a step reads.
constexpr int64_t kRowsPerGroup = 8;

using gemm::l2_cache_bytes;

// Whether `bytes` of weights stay in a core's L2 (3/4 of it, leaving room for the step's other rows).
bool fits_l2(int64_t bytes) { return 4 * bytes <= 3 * l2_cache_bytes(); }

std::vector<int64_t> row_groups(const Schedule& S, int team, bool proj, int64_t weight_bytes) {
  if (proj || team < 2 || S.B < kRowsPerGroup * team || S.N != S.T * S.B) return {};
  if (fits_l2(weight_bytes / team) && !fits_l2(weight_bytes)) return {};
  std::vector<int64_t> bounds(team + 1);
  for (int g = 0; g <= team; ++g) bounds[g] = S.B * g / team;
  return bounds;
}

// Runs layer(schedule, first_row, team, group) once per row group, in parallel, each as a team of one; or, where
// row_groups declines, once over the whole batch (first row 0, group 0) with the units split across `team`.
// Returns the number of groups run (at most `team`).
template <typename Layer>
int run_layer(const Schedule& S, int team, bool proj, int64_t weight_bytes, Layer layer) {
  const std::vector<int64_t> bounds = row_groups(S, team, proj, weight_bytes);
  if (bounds.empty()) {
    layer(S, int64_t{0}, team, 0);
    return 1;
  }
  const int groups = static_cast<int>(bounds.size()) - 1;
#pragma omp parallel num_threads(groups)
  for (int g = omp_get_thread_num(); g < groups; g += omp_get_num_threads())
    layer(S.rows(bounds[g], bounds[g + 1]), bounds[g], 1, g);
  return groups;
}

// A bias gradient from per-group parts (`groups` rows of n), summed in group order.
template <typename T>
void sum_parts(const std::vector<T>& parts, int groups, int64_t n, T* out) {
  std::copy(parts.begin(), parts.begin() + n, out);
  for (int g = 1; g < groups; ++g)
    for (int64_t j = 0; j < n; ++j) out[j] += parts[g * n + j];
}

// ---------------------------------------------------------------------------------------------------------------
// LSTM forward

template <typename T>
struct LstmFwd {
  const T* x;     // (N, I) input
  const T* w_ih;  // (4H, I)
  const T* bias;  // (4H) b_ih + b_hh (zeros without bias)
  const T* w_hh;  // (4H, P)
  const T* w_hr;  // (P, H) or null
  const T* h0;    // (B, P)
  const T* c0;    // (B, H)
  T* out;         // (N, P)
  T* h_n;         // (B, P)
  T* c_n;         // (B, H)
  T* gates;       // (N, 4H) activated gates, or null when not training
  T* cells;       // (N, H) cell states, or null when not training
  int64_t I, H, P;
};

template <typename T>
void lstm_forward_team(const Schedule& S, const LstmFwd<T>& a, int team) {
  constexpr int64_t L = gemm::lanes<T>();
  const int64_t H = a.H, P = a.P, B = S.B;
  const bool proj = a.w_hr != nullptr;
  // h state: with a projection a double buffer, without one the output rows (previous_outputs)
  gemm::Buffer<T> hbuf = double_buffer(a.h0, proj ? B * P : 0), cbuf(a.c0, a.c0 + B * H), htilde(proj ? B * H : 0);
  auto aligned = [](const T* p) { return reinterpret_cast<uintptr_t>(p) % 64 == 0; };
  const bool stream = a.gates && aligned(a.gates) && aligned(a.cells) && H % (64 / sizeof(T)) == 0;
  StepBarrier barrier;
  StepFlags flags(team);
  // Each thread's projection, kept until the whole team is done: other threads may work on it (help).
  std::vector<std::unique_ptr<InputProjection<T>>> projections(team);
  flags.set_help([&](int u, int64_t published) { return published >= 1 && projections[u]->help(published); });
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    StepBarrier::Member step = barrier.join(nt);
    const std::vector<Range> units = unit_ranges(H, nt, L);  // without a projection, also its columns of h
    const Range J = units[tid];
    const int64_t Jn = J.size(), ldg = round_up(4 * Jn, L);
    gemm::Buffer<T> tmp(Jn), scratch;
    auto gate_row = [&](int64_t r) { return (r / Jn) * H + J.begin + r % Jn; };  // local column r: gate r / Jn
    const auto Wp = pack_transposed(a.w_hh, P, 4 * Jn, gate_row, P, ldg, B);
    // (with a projection the team waits at barriers, where no thread helps another)
    projections[tid] =
        std::make_unique<InputProjection<T>>(S, a.x, a.w_ih, a.I, 4 * Jn, gate_row, ldg, /*shared=*/nt > 1 && !proj);
    InputProjection<T>& xproj = *projections[tid];
    const Range Q = proj ? split(P, nt, tid, L) : Range{};
    const int64_t ldq = round_up(Q.size(), L);
    gemm::Buffer<T> Y(proj ? B * ldq : 0);
    gemm::PackedB<T> Rp;
    if (proj) Rp = pack_transposed(a.w_hr, H, Q.size(), [&](int64_t r) { return Q.begin + r; }, H, ldq, B);
    const Range own = proj ? Q : J;  // the columns of h this thread writes

    for (int64_t s = 0; s < S.T; ++s) {
      const int64_t t = S.t_of(s), bs = S.bs[t], off = S.off[t], done = S.bs_after(s);
      // the double buffer's halves (with a projection only: without one, hbuf is empty)
      const T* h_cur = proj ? hbuf.data() + (s & 1) * B * P : nullptr;
      T* h_nxt = proj ? hbuf.data() + ((s + 1) & 1) * B * P : nullptr;
      if (Jn > 0 && bs > 0) {
        xproj.at_step(s);
        T* G = xproj.step_rows(s);  // the step's gate sums: the recurrent sums added to the input projection
        if (proj) {
          Wp.matmul(bs, 0, P, h_cur, P, G, ldg, /*accumulate=*/true);
        } else {
          const T* h_prev = previous_outputs(S, s, a.out, a.h0, P, scratch, [&] { wait_all(flags, nt, s); });
          matmul_own_first(bs, h_prev, P, Wp, G, ldg, units, tid, flags, /*steps=*/s, 1, 0, /*accumulate=*/true);
        }
        for (int64_t b = 0; b < bs; ++b) {
          const int64_t row = off + b;
          T* h = proj ? htilde.data() + b * H + J.begin : a.out + row * P + J.begin;
          T* c = cbuf.data() + b * H + J.begin;
          T* g = G + b * ldg;
          const RowOut<T> o{a.gates ? a.gates + row * 4 * H + J.begin : nullptr,
                            a.gates ? a.cells + row * H + J.begin : nullptr, stream};
          lstm_units_fwd(a.bias + J.begin, H, g, Jn, c, h, tmp.data(), o);
        }
      }
      if (proj) {
        step.wait();
        if (Q.size() > 0 && bs > 0) {
          Rp.matmul(bs, 0, H, htilde.data(), H, Y.data(), ldq);
          for (int64_t b = 0; b < bs; ++b) {
            std::copy(Y.data() + b * ldq, Y.data() + b * ldq + Q.size(), h_nxt + b * P + Q.begin);
            std::copy(Y.data() + b * ldq, Y.data() + b * ldq + Q.size(), a.out + (off + b) * P + Q.begin);
          }
        }
      }
      for (int64_t b = done; b < bs; ++b) {  // rows whose last step this was: final states
        const T* h = proj ? h_nxt + b * P : a.out + (off + b) * P;
        std::copy(h + own.begin, h + own.end, a.h_n + b * P + own.begin);
        std::copy(cbuf.data() + b * H + J.begin, cbuf.data() + b * H + J.end, a.c_n + b * H + J.begin);
      }
      if (proj)
        step.wait();
      else
        flags.publish(tid, s + 1);
    }
    vec_math::stream_fence();  // the saved gates and cells, before the backward reads them
  }
}

// The bytes of W_ih and W_hh, which every step of an LSTM layer reads, forward and backward (run_layer).
template <typename T>
int64_t lstm_weight_bytes(int64_t H, int64_t I, int64_t P) {
  return 4 * H * (I + P) * static_cast<int64_t>(sizeof(T));
}

template <typename T>
void lstm_forward(const Schedule& S, const LstmFwd<T>& a) {
  const int64_t weight_bytes = lstm_weight_bytes<T>(a.H, a.I, a.P);
  const int team = team_size(4, a.H, a.P, S.B);
  run_layer(S, team, a.w_hr != nullptr, weight_bytes, [&](const Schedule& Sg, int64_t r0, int tm, int) {
    LstmFwd<T> ag = a;
    ag.h0 += r0 * a.P;
    ag.c0 += r0 * a.H;
    ag.h_n += r0 * a.P;
    ag.c_n += r0 * a.H;
    lstm_forward_team(Sg, ag, tm);
  });
}

// ---------------------------------------------------------------------------------------------------------------
// LSTM backward through time

// The output gradient as autograd hands it over, read in place with its strides: often a broadcast (the gradient
// of a sum has stride 0 everywhere), which a contiguous copy would write out in full (0.6 ms at batch 32).
template <typename T>
struct GradRows {
  const T* data;
  int64_t row_stride, col_stride;
  // dst[q] = base[q] + grad[r, c0 + q] for q < n.
  void add_to(int64_t r, int64_t c0, int64_t n, const T* base, T* dst) const {
    const T* g = data + r * row_stride + c0 * col_stride;
    if (col_stride == 1) {
      for (int64_t q = 0; q < n; ++q) dst[q] = base[q] + g[q];
    } else {
      for (int64_t q = 0; q < n; ++q) dst[q] = base[q] + g[q * col_stride];
    }
  }
};

// The bias gradient of a thread's units: the column sums of its gate-gradient columns, `segments` blocks of n
// columns at `stride` apart in each row (one per gate), summed as the backward writes them. Each step's rows are
// summed apart and the step sums added to the total in processing order, so the order does not depend on the
// thread count and no chain is longer than a batch or the step count.
template <typename T>
class BiasGrad {
 public:
  BiasGrad(int segments, int64_t n, int64_t stride)
      : segments_(segments), n_(n), stride_(stride), step_(segments * n, T(0)), total_(segments * n, T(0)) {}
  void add_row(const T* row) {
    for (int k = 0; k < segments_; ++k)
      for (int64_t j = 0; j < n_; ++j) step_[k * n_ + j] += row[k * stride_ + j];
  }
  void end_step() {
    for (size_t i = 0; i < step_.size(); ++i) total_[i] += step_[i];
    std::fill(step_.begin(), step_.end(), T(0));
  }
  // Writes the sums into a row laid out as the gate-gradient rows.
  void store(T* row) const {
    for (int k = 0; k < segments_; ++k)
      std::copy(total_.begin() + k * n_, total_.begin() + (k + 1) * n_, row + k * stride_);
  }

 private:
  int segments_;
  int64_t n_, stride_;
  gemm::Buffer<T> step_, total_;
};

template <typename T>
struct LstmBwd {
  GradRows<T> grad_out;  // (N, P)
  const T* grad_hn;   // (B, P)
  const T* grad_cn;   // (B, H)
  const T* gates;     // (N, 4H) saved activated gates
  const T* cells;     // (N, H) saved cell states
  const T* c0;        // (B, H)
  const T* w_hh;      // (4H, P)
  const T* w_hr;      // (P, H) or null
  T* dG;              // (N, 4H) out: gradients of the gate pre-activations
  T* DH;              // (N, P) out, projection only: gradient reaching h at each step
  T* Ht;              // (N, H) out, projection only: o * tanh(c) at each step
  T* grad_h0;         // (B, P)
  T* grad_c0;         // (B, H)
  T* grad_bias;       // (4H) column sums of dG
  const T* w_ih;      // (4H, I)
  T* grad_input;      // (N, I) out: dG @ W_ih
  int64_t H, P, I;
};

template <typename T>
void lstm_backward_team(const Schedule& S, const LstmBwd<T>& a, int team) {
  constexpr int64_t L = gemm::lanes<T>();
  const int64_t H = a.H, P = a.P, B = S.B, T_ = S.T;
  const bool proj = a.w_hr != nullptr;
  auto t_bwd = [&](int64_t s) { return S.t_of(T_ - 1 - s); };  // time index of the s-th backward step
  // dh double buffer: rows not yet reached hold grad_hn; the first step's rows also get their output gradient.
  gemm::Buffer<T> dhbuf = double_buffer(a.grad_hn, B * P), dcbuf(a.grad_cn, a.grad_cn + B * H);
  {
    const int64_t t0 = t_bwd(0);
    for (int64_t b = 0; b < S.bs[t0]; ++b) {
      T* dh = dhbuf.data() + b * P;
      a.grad_out.add_to(S.off[t0] + b, 0, P, dh, dh);
      if (proj) std::copy(dh, dh + P, a.DH + (S.off[t0] + b) * P);
    }
  }
  StepBarrier barrier;
  StepFlags flags(team);
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    StepBarrier::Member step = barrier.join(nt);
    const std::vector<Range> units = unit_ranges(H, nt, L);  // without a projection, also its columns of dh
    const Range J = units[tid], Q = split(P, nt, tid, L);
    const int64_t Jn = J.size(), ldj = round_up(Jn, L), Qn = Q.size(), ldq = round_up(Qn, L);
    const auto Wp = pack_columns(a.w_hh, P, 4 * H, Q.begin, Qn, ldq, B);  // W_hh[:, Q] for dh_{t-1} = dG_t @ W_hh
    gemm::Buffer<T> Y(B * ldq), D(proj ? B * ldj : 0), tc(Jn);
    BiasGrad<T> db(4, Jn, H);
    const Range Ix = split(a.I, nt, tid, L);  // the thread's columns of grad_input
    const int64_t Ixn = Ix.size(), ldx = round_up(Ixn, L);
    const auto Wx = pack_columns(a.w_ih, a.I, 4 * H, Ix.begin, Ixn, ldx, B);  // W_ih[:, Ix]
    gemm::Buffer<T> X(B * ldx);
    gemm::PackedB<T> Rp;  // W_hr[:, J] for dh~ = dh @ W_hr
    if (proj) Rp = pack_columns(a.w_hr, H, P, J.begin, Jn, ldj, B);

    for (int64_t s = 0; s < T_; ++s) {
      const int64_t t = t_bwd(s), bs = S.bs[t], off = S.off[t];
      const int64_t t2 = s + 1 < T_ ? t_bwd(s + 1) : -1;
      const int64_t bs2 = t2 >= 0 ? S.bs[t2] : 0, off2 = t2 >= 0 ? S.off[t2] : 0;
      const T* dh_cur = dhbuf.data() + (s & 1) * B * P;
      T* dh_nxt = dhbuf.data() + ((s + 1) & 1) * B * P;
      if (Jn > 0 && bs > 0) {  // gate gradients of this thread's units
        const T* dht = dh_cur + J.begin;
        int64_t ld_dht = P;
        if (proj) {
          Rp.matmul(bs, 0, P, dh_cur, P, D.data(), ldj);
          dht = D.data();
          ld_dht = ldj;
        }
        for (int64_t b = 0; b < bs; ++b) {
          const int64_t row = off + b, prev = S.prev_row(t, b);
          const T* cprev = (prev >= 0 ? a.cells + prev * H : a.c0 + b * H) + J.begin;
          T* dc = dcbuf.data() + b * H + J.begin;
          const T* g = a.gates + row * 4 * H + J.begin;
          T* dG = a.dG + row * 4 * H + J.begin;
          if (proj)
            lstm_units_bwd<T, true>(g, H, a.cells + row * H + J.begin, cprev, dht + b * ld_dht, dc, dG,
                                    a.Ht + row * H + J.begin, tc.data(), Jn);
          else
            lstm_units_bwd<T, false>(g, H, a.cells + row * H + J.begin, cprev, dht + b * ld_dht, dc, dG,
                                     nullptr, tc.data(), Jn);
          db.add_row(dG);
        }
        db.end_step();
      }
      // The other threads' gate gradients are read below: a barrier with a projection (which also reads the
      // others' dh columns); without one, each thread's part is waited for when reached (matmul_own_first).
      if (proj)
        step.wait();
      else
        flags.publish(tid, s + 1);
      if (Qn > 0) {  // dh_{t-1}[:, Q] = dG_t @ W_hh[:, Q], plus the output gradient of the next step
        if (bs > 0) {
          if (proj)
            Wp.matmul(bs, 0, 4 * H, a.dG + off * 4 * H, 4 * H, Y.data(), ldq);
          else
            matmul_own_first(bs, a.dG + off * 4 * H, 4 * H, Wp, Y.data(), ldq, units, tid, flags, s + 1, 4, H);
        }
        for (int64_t b = 0; b < std::max(bs, bs2); ++b) {
          if (b < bs2) {
            const T* base = b < bs ? Y.data() + b * ldq : a.grad_hn + b * P + Q.begin;  // b >= bs: starts next
            T* dst = dh_nxt + b * P + Q.begin;
            a.grad_out.add_to(off2 + b, Q.begin, Qn, base, dst);
            if (proj) std::copy(dst, dst + Qn, a.DH + (off2 + b) * P + Q.begin);
          } else {  // this was the row's first step: what reaches its initial state
            std::copy(Y.data() + b * ldq, Y.data() + b * ldq + Qn, a.grad_h0 + b * P + Q.begin);
          }
        }
      }
      if (Ixn > 0 && bs > 0) {  // grad_input[:, Ix] of the step's rows = dG_t @ W_ih[:, Ix], while dG_t is in cache
        if (proj)
          Wx.matmul(bs, 0, 4 * H, a.dG + off * 4 * H, 4 * H, X.data(), ldx);
        else
          matmul_own_first(bs, a.dG + off * 4 * H, 4 * H, Wx, X.data(), ldx, units, tid, flags, s + 1, 4, H);
        for (int64_t b = 0; b < bs; ++b)
          std::copy(X.data() + b * ldx, X.data() + b * ldx + Ixn, a.grad_input + (off + b) * a.I + Ix.begin);
      }
      if (proj) step.wait();  // without a projection, a thread's dh columns are its own: no one else reads them
    }
    db.store(a.grad_bias + J.begin);
  }
  std::copy(dcbuf.begin(), dcbuf.end(), a.grad_c0);
}

template <typename T>
void lstm_backward(const Schedule& S, const LstmBwd<T>& a) {
  const int team = team_size(4, a.H, a.P, S.B);
  std::vector<T> bias_parts(team * 4 * a.H);  // each row group's bias gradient (the whole batch's in the first)
  const int64_t weight_bytes = lstm_weight_bytes<T>(a.H, a.I, a.P);
  const bool proj = a.w_hr != nullptr;
  const int groups = run_layer(S, team, proj, weight_bytes, [&](const Schedule& Sg, int64_t r0, int tm, int g) {
    LstmBwd<T> ag = a;
    ag.grad_hn += r0 * a.P;
    ag.grad_cn += r0 * a.H;
    ag.c0 += r0 * a.H;
    ag.grad_h0 += r0 * a.P;
    ag.grad_c0 += r0 * a.H;
    ag.grad_bias = bias_parts.data() + g * 4 * a.H;
    lstm_backward_team(Sg, ag, tm);
  });
  sum_parts(bias_parts, groups, 4 * a.H, a.grad_bias);
}

// ---------------------------------------------------------------------------------------------------------------
// RNN forward and backward (one gate, P = H)

template <typename T>
void rnn_forward_team(const Schedule& S, const T* x, const T* w_ih, int64_t I, const T* bias, const T* w_hh,
                      const T* h0, bool relu, T* out, T* h_n, int64_t H, int team) {
  constexpr int64_t L = gemm::lanes<T>();
  const int64_t B = S.B;
  StepFlags flags(team);
  std::vector<std::unique_ptr<InputProjection<T>>> projections(team);  // as in lstm_forward_team
  flags.set_help([&](int u, int64_t published) { return published >= 1 && projections[u]->help(published); });
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const std::vector<Range> units = unit_ranges(H, nt, L);
    const Range J = units[tid];
    const int64_t Jn = J.size(), ldg = round_up(Jn, L);
    auto unit_row = [&](int64_t r) { return J.begin + r; };
    const auto Wp = pack_transposed(w_hh, H, Jn, unit_row, H, ldg, B);
    projections[tid] = std::make_unique<InputProjection<T>>(S, x, w_ih, I, Jn, unit_row, ldg, nt > 1);
    InputProjection<T>& xproj = *projections[tid];
    gemm::Buffer<T> scratch;
    for (int64_t s = 0; s < S.T; ++s) {
      const int64_t t = S.t_of(s), bs = S.bs[t], off = S.off[t], done = S.bs_after(s);
      if (Jn > 0 && bs > 0) {
        xproj.at_step(s);
        T* G = xproj.step_rows(s);  // the step's sums: the recurrent sums added to the input projection
        const T* h_prev = previous_outputs(S, s, out, h0, H, scratch, [&] { wait_all(flags, nt, s); });
        matmul_own_first(bs, h_prev, H, Wp, G, ldg, units, tid, flags, /*steps=*/s, 1, 0, /*accumulate=*/true);
        for (int64_t b = 0; b < bs; ++b)
          rnn_units_fwd(bias + J.begin, G + b * ldg, Jn, relu, out + (off + b) * H + J.begin);
      }
      for (int64_t b = done; b < bs; ++b)
        std::copy(out + (off + b) * H + J.begin, out + (off + b) * H + J.end, h_n + b * H + J.begin);
      flags.publish(tid, s + 1);
    }
  }
}

template <typename T>
void rnn_forward(const Schedule& S, const T* x, const T* w_ih, int64_t I, const T* bias, const T* w_hh, const T* h0,
                 bool relu, T* out, T* h_n, int64_t H) {
  const int64_t weight_bytes = H * (I + H) * static_cast<int64_t>(sizeof(T));  // W_ih, W_hh
  run_layer(S, team_size(1, H, H, S.B), false, weight_bytes, [&](const Schedule& Sg, int64_t r0, int team, int) {
    rnn_forward_team(Sg, x, w_ih, I, bias, w_hh, h0 + r0 * H, relu, out, h_n + r0 * H, H, team);
  });
}

template <typename T>
void rnn_backward_team(const Schedule& S, const GradRows<T>& grad_out, const T* grad_hn, const T* out,
                       const T* w_hh, bool relu, T* dG, T* grad_h0, T* grad_bias, int64_t H, int team) {
  constexpr int64_t L = gemm::lanes<T>();
  const int64_t B = S.B, T_ = S.T;
  auto t_bwd = [&](int64_t s) { return S.t_of(T_ - 1 - s); };
  gemm::Buffer<T> dhbuf = double_buffer(grad_hn, B * H);
  {
    const int64_t t0 = t_bwd(0);
    for (int64_t b = 0; b < S.bs[t0]; ++b) {
      T* dh = dhbuf.data() + b * H;
      grad_out.add_to(S.off[t0] + b, 0, H, dh, dh);
    }
  }
  StepFlags flags(team);
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const std::vector<Range> units = unit_ranges(H, nt, L);  // also its columns of dG and dh
    const Range J = units[tid];
    const int64_t Jn = J.size(), ldq = round_up(Jn, L);
    const auto Wp = pack_columns(w_hh, H, H, J.begin, Jn, ldq, B);
    gemm::Buffer<T> Y(B * ldq);
    BiasGrad<T> db(1, Jn, H);
    for (int64_t s = 0; s < T_; ++s) {
      const int64_t t = t_bwd(s), bs = S.bs[t], off = S.off[t];
      const int64_t t2 = s + 1 < T_ ? t_bwd(s + 1) : -1;
      const int64_t bs2 = t2 >= 0 ? S.bs[t2] : 0, off2 = t2 >= 0 ? S.off[t2] : 0;
      const T* dh_cur = dhbuf.data() + (s & 1) * B * H;
      T* dh_nxt = dhbuf.data() + ((s + 1) & 1) * B * H;
      for (int64_t b = 0; b < bs; ++b) {
        const T* dh = dh_cur + b * H + J.begin;
        const T* y = out + (off + b) * H + J.begin;
        T* d = dG + (off + b) * H + J.begin;
        if (relu)
          for (int64_t jj = 0; jj < Jn; ++jj) d[jj] = y[jj] > T(0) ? dh[jj] : T(0);
        else
          for (int64_t jj = 0; jj < Jn; ++jj) d[jj] = dh[jj] * (T(1) - y[jj] * y[jj]);
        db.add_row(d);
      }
      db.end_step();
      flags.publish(tid, s + 1);  // the others read this step's dG columns when they reach them
      if (Jn > 0) {
        if (bs > 0) matmul_own_first(bs, dG + off * H, H, Wp, Y.data(), ldq, units, tid, flags, s + 1);
        for (int64_t b = 0; b < std::max(bs, bs2); ++b) {
          if (b < bs2) {
            const T* base = b < bs ? Y.data() + b * ldq : grad_hn + b * H + J.begin;
            grad_out.add_to(off2 + b, J.begin, Jn, base, dh_nxt + b * H + J.begin);
          } else {
            std::copy(Y.data() + b * ldq, Y.data() + b * ldq + Jn, grad_h0 + b * H + J.begin);
          }
        }
      }
    }
    db.store(grad_bias + J.begin);
  }
}

template <typename T>
void rnn_backward(const Schedule& S, const GradRows<T>& grad_out, const T* grad_hn, const T* out, const T* w_hh,
                  bool relu, T* dG, T* grad_h0, T* grad_bias, int64_t H) {
  const int team = team_size(1, H, H, S.B);
  std::vector<T> bias_parts(team * H);  // each row group's bias gradient (the whole batch's in the first)
  const int64_t weight_bytes = H * H * static_cast<int64_t>(sizeof(T));  // W_hh (grad_input is a GEMM afterwards)
  const int groups = run_layer(S, team, false, weight_bytes, [&](const Schedule& Sg, int64_t r0, int tm, int g) {
    rnn_backward_team(Sg, grad_out, grad_hn + r0 * H, out, w_hh, relu, dG, grad_h0 + r0 * H,
                      bias_parts.data() + g * H, H, tm);
  });
  sum_parts(bias_parts, groups, H, grad_bias);
}

// ---------------------------------------------------------------------------------------------------------------
// Batch-in-lanes forward: float with AVX-512, every sequence of the same length, a batch that fills its vectors
//
// The forward above puts a thread's gate columns in the vector lanes and broadcasts the rows of h, so a weight
// vector loaded serves one block of 8 rows: at batch 64 a thread's packed W_hh is read eight times a step. When
// the thread's weights do not fit in its L2 (4 MiB at hidden size 512) they come from L3 every step, at a rate
// that cannot feed the 8-row tile. Here the batch is in the lanes (16 sequences per vector) and the weights are
// broadcast: the state is kept transposed (h^T and c^T: hidden unit x batch), and a register tile of 12 weight
// rows x 2 vectors serves 32 sequences per weight read. At batch 64, hidden size 512 the layer runs 3-6% faster
// (59 against 62 ms); at batch 32, hidden size 256, whose weights fit in L2, both reach the same matmul rate and
// the transposes below make this one 1-2% slower, so it is taken only for weights larger than L2.
// A tile's rows are the 4 gates of 3 hidden units (LSTM) or 12 units (RNN), so the activations and the state
// update run on the accumulators, in registers. The input projection is computed in the same layout, a chunk of
// steps at a time (as InputProjection) from a transposed copy of the chunk's input, and the recurrent sums are
// accumulated onto it. Output rows (and in training the saved gates and cells) are transposed back each step in
// 16 x 16 register blocks. Lanes past the batch size hold zeros and finite values derived from them, never read
// back. The k-ranges of h are summed in the same order as matmul_own_first's (the thread's own units first), and
// each thread's partial sums wait in the projection buffer between them.

constexpr int64_t kLanes = 16;

// Whether a forward takes the batch-in-lanes path: float without a projection; a thread's slices of W_ih and
// W_hh larger than its L2 (see above); every sequence as long as the first (a PackedSequence's tail of shorter
// sequences would leave lanes idle); and at most one lane in eight idle.
bool lanes_forward_applies(const Schedule& S, bool is_float, bool proj, int gates, int64_t I, int64_t H) {
#if defined(__AVX512F__)
  const int64_t B = S.B, team = team_size(gates, H, H, B);
  const int64_t slice_bytes = gates * ((H + team - 1) / team) * (I + H) * static_cast<int64_t>(sizeof(float));
  return is_float && !proj && slice_bytes > l2_cache_bytes() && B >= 14 && S.bs[S.T - 1] == B &&
         8 * B >= 7 * round_up(B, kLanes);
#else
  (void)S, (void)is_float, (void)proj, (void)gates, (void)I, (void)H;
  return false;
#endif
}

// Hidden units per register tile: 3 LSTM units (12 gate rows), 12 RNN units; then blocks of 4 RNN units; then 1.
inline int64_t tile_units(int gates, int64_t left) {
  if (gates == 4) return left >= 3 ? 3 : 1;
  return left >= 12 ? 12 : left >= 4 ? 4 : 1;
}

// A thread's rows of a gate-stacked weight matrix (gates * H rows of K, row stride ld), units [j0, j0 + Jn), as the
// broadcast operand of the tiles: per tile (tile_units units from local unit u0), its rows m = unit * gates + gate
// k-major, element (k, m) at block(u0)[k * rows + m]. The tiles' rows, in order, are the local rows of every
// lanes buffer: local row u * gates + g is gate g of unit j0 + u.
class LaneWeights {
 public:
  LaneWeights(const float* W, int64_t ld, int64_t K, int64_t H, int gates, int64_t j0, int64_t Jn)
      : K_(K), gates_(gates), data_(Jn * gates * K) {
    std::vector<const float*> src;
    for (int64_t u0 = 0; u0 < Jn;) {
      const int64_t units = tile_units(gates, Jn - u0), rows = units * gates;
      src.clear();
      for (int64_t m = 0; m < rows; ++m) src.push_back(W + ((m % gates) * H + j0 + u0 + m / gates) * ld);
      float* dst = block(u0);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t m = 0; m < rows; ++m) dst[k * rows + m] = src[m][k];
      u0 += units;
    }
  }
  float* block(int64_t u0) { return data_.data() + u0 * gates_ * K_; }
  const float* block(int64_t u0) const { return data_.data() + u0 * gates_ * K_; }

 private:
  int64_t K_;
  int gates_;
  gemm::Buffer<float> data_;
};

inline vec_math::vfloat16 load_lanes(const float* p) { return vec_math::load16(p, kLanes); }
inline void store_lanes(float* p, const vec_math::vfloat16& v) { std::memcpy(p, &v, sizeof v); }

// What a tile does once its k-range is summed: keep the partial sums, or finish the step.
struct LaneEpilogue {
  bool last;        // this k-range completes the sums: activations and state update
  float* c;         // LSTM: c^T at the tile's first unit and column (updated in place), row stride ldb
  float* h;         // h^T of the next step at the tile's first unit and column, row stride ldb
  int64_t ldb;
  bool relu;        // RNN nonlinearity
  bool keep;        // training: the activated gates replace the sums in `acc_out`
};

// acc = init + w[k0:k1]^T-rows @ hT[k0:k1] for MR weight rows x NR vectors of columns, in panels of
// gemm::kPackedPanel products as PackedB sums: the first panel's chains start from init, each later one's from
// zero, added to the total once done (one chain over a long input would round like a naive sum: 6x torch's
// error at input size 8000). Not inlined into the epilogues: inlined, the activations' constants pushed GCC to
// keep the RNN tile's accumulators on the stack through the k loop (a third slower).
template <int MR, int NR>
__attribute__((noinline)) void lane_sums(const float* __restrict__ w, const float* __restrict__ hT, int64_t ldh,
                                         int64_t k0, int64_t k1, const float* init, int64_t ldi,
                                         vec_math::vfloat16 (&acc)[MR][NR]) {
  using vec_math::vfloat16;
  int64_t p0 = k0;
  do {
    const bool first = p0 == k0;
    const int64_t p1 = std::min(k1, p0 + gemm::kPackedPanel);
    vfloat16 r[MR][NR];
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) r[m][n] = first ? load_lanes(init + m * ldi + n * kLanes) : vfloat16{};
    for (int64_t k = p0; k < p1; ++k) {
      vfloat16 b[NR];
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) b[n] = load_lanes(hT + k * ldh + n * kLanes);
      const float* wk = w + k * MR;
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const float a = wk[m];
#pragma GCC unroll 2
        for (int n = 0; n < NR; ++n) r[m][n] += a * b[n];
      }
    }
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) acc[m][n] = first ? r[m][n] : acc[m][n] + r[m][n];
    p0 = p1;
  } while (p0 < k1);
}

// One register tile: lane_sums, then (epilogue) the sums either stored to acc_out (partial sums) or turned into
// the step's states. Rows are ldh (hT), ldi (init) and ldo (acc_out) apart; init and acc_out may be the same (the
// projection buffer holds the partial sums).
template <int G, int MR, int NR>
inline void lane_tile(const float* w, const float* hT, int64_t ldh, int64_t k0, int64_t k1, const float* init,
                      int64_t ldi, float* acc_out, int64_t ldo, const LaneEpilogue& e) {
  using vec_math::vfloat16;
  vfloat16 acc[MR][NR];
  lane_sums<MR, NR>(w, hT, ldh, k0, k1, init, ldi, acc);
  if constexpr (G == 4) {
    if (e.last) {  // each unit's 4 gates (rows) of its NR column vectors, activated in lockstep
#pragma GCC unroll 3
      for (int u = 0; u < MR / 4; ++u) {
        vfloat16 v[4 * NR];
#pragma GCC unroll 8
        for (int q = 0; q < 4 * NR; ++q) v[q] = acc[4 * u + q % 4][q / 4];
        vec_math::activate_lockstep<4 * NR, vec_math::lstm_gates(NR)>(v);  // i, f, g, o per vector
#pragma GCC unroll 8
        for (int q = 0; q < 4 * NR; ++q) acc[4 * u + q % 4][q / 4] = v[q];
      }
    }
  }
  if (!e.last || e.keep) {  // partial sums, or in training the activated gates
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) store_lanes(acc_out + m * ldo + n * kLanes, acc[m][n]);
    if (!e.last) return;
  }
  if constexpr (G == 4) {
#pragma GCC unroll 3
    for (int u = 0; u < MR / 4; ++u) {
      vfloat16 c[NR];
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) {
        float* cp = e.c + u * e.ldb + n * kLanes;
        c[n] = acc[4 * u + 1][n] * load_lanes(cp) + acc[4 * u][n] * acc[4 * u + 2][n];
        store_lanes(cp, c[n]);
      }
      vec_math::activate_lockstep<NR, (1u << NR) - 1>(c);  // tanh
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) store_lanes(e.h + u * e.ldb + n * kLanes, acc[4 * u + 3][n] * c[n]);
    }
  } else {
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 2
      for (int n = 0; n < NR; ++n) {
        const vfloat16 v = acc[m][n];
        store_lanes(e.h + m * e.ldb + n * kLanes, e.relu ? (v > 0.0f ? v : vfloat16{}) : vec_math::tanh16(v));
      }
  }
}

// The tiles of units [u0, u0 + units), one column group of nr vectors.
template <int G>
void lane_tile_n(int64_t units, int nr, const float* w, const float* hT, int64_t ldh, int64_t k0, int64_t k1,
                 const float* init, int64_t ldi, float* acc_out, int64_t ldo, const LaneEpilogue& e) {
  auto run = [&](auto mr) {
    constexpr int MR = decltype(mr)::value;
    if (nr == 2)
      lane_tile<G, MR, 2>(w, hT, ldh, k0, k1, init, ldi, acc_out, ldo, e);
    else
      lane_tile<G, MR, 1>(w, hT, ldh, k0, k1, init, ldi, acc_out, ldo, e);
  };
  switch (units * G) {
    case 12: run(std::integral_constant<int, 12>{}); break;
    case 4: run(std::integral_constant<int, 4>{}); break;
    default: run(std::integral_constant<int, 1>{}); break;  // RNN, one unit
  }
}

struct LanesFwd {
  const float* x;     // (N, I)
  const float* w_ih;  // (G * H, I)
  const float* bias;  // (G * H) b_ih + b_hh
  const float* w_hh;  // (G * H, H)
  const float* h0;    // (B, H)
  const float* c0;    // (B, H), LSTM
  float* out;         // (N, H)
  float* h_n;         // (B, H)
  float* c_n;         // (B, H), LSTM
  float* gates;       // (N, 4H) activated gates, or null when not training (LSTM)
  float* cells;       // (N, H) cell states, or null when not training (LSTM)
  int64_t I, H;
  bool relu;  // RNN
};

// The forward of an LSTM (G = 4) or RNN (G = 1) layer in the batch-in-lanes layout (see above).
template <int G>
void lanes_forward(const Schedule& S, const LanesFwd& a) {
  const int64_t H = a.H, I = a.I, B = S.B, ldb = round_up(B, kLanes), nv = ldb / kLanes;
  const int64_t chunk_steps = std::max<int64_t>(1, InputProjection<float>::kChunkRows / B);
  // h^T (two halves, both starting as h0^T) and c^T: unit j's lanes at row j. Padding lanes stay finite.
  gemm::Buffer<float> hT(2 * H * ldb, 0.0f), cT(G == 4 ? H * ldb : 0, 0.0f);
  for (int half = 0; half < 2; ++half)
    vec_math::transpose(B, H, [&](int64_t r) { return a.h0 + r * H; }, hT.data() + half * H * ldb, ldb);
  if (G == 4) vec_math::transpose(B, H, [&](int64_t r) { return a.c0 + r * H; }, cT.data(), ldb);
  const int team = team_size(G, H, H, B);
  StepFlags flags(team);
#pragma omp parallel num_threads(team)
  {
    const int nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const std::vector<Range> units = unit_ranges(H, nt, kLanes);
    const Range J = units[tid];
    const int64_t Jn = J.size(), rows = G * Jn, ldp = chunk_steps * ldb;
    const LaneWeights Wh(a.w_hh, H, H, H, G, J.begin, Jn), Wi(a.w_ih, I, I, H, G, J.begin, Jn);
    // The chunk's input transposed (x^T: feature x lanes, a step per ldb columns; padding lanes zero), its
    // projection for the thread's local rows (ldp apart), and the bias of each local row across 2 vectors.
    gemm::Buffer<float> xT(Jn > 0 ? I * ldp : 0, 0.0f), proj(rows * ldp), bias(rows * 2 * kLanes);
    for (int64_t m = 0; m < rows; ++m)
      std::fill_n(bias.data() + m * 2 * kLanes, 2 * kLanes, a.bias[(m % G) * H + J.begin + m / G]);
    int64_t chunk_first = 0, chunk_end = 0;
    // Runs the tiles of every local unit over the first nv_ column vectors of src (ldh apart): row m, vector v of
    // the sums starts at init + m * ldi + v * init_v and goes to dst + m * ldd + v * kLanes.
    auto tiles = [&](const LaneWeights& W, const float* src, int64_t ldh, int64_t k0, int64_t k1, int64_t nv_,
                     const float* init, int64_t ldi, int64_t init_v, float* dst, int64_t ldd,
                     const LaneEpilogue& e0) {
      for (int64_t u0 = 0; u0 < Jn;) {
        const int64_t nu = tile_units(G, Jn - u0);
        for (int64_t v = 0; v < nv_;) {
          const int nr = v + 2 <= nv_ ? 2 : 1;
          LaneEpilogue e = e0;
          if (e.last) {
            e.h += (J.begin + u0) * ldb + v * kLanes;
            if (G == 4) e.c += (J.begin + u0) * ldb + v * kLanes;
          }
          lane_tile_n<G>(nu, nr, W.block(u0), src + v * kLanes, ldh, k0, k1, init + u0 * G * ldi + v * init_v, ldi,
                         dst + u0 * G * ldd + v * kLanes, ldd, e);
          v += nr;
        }
        u0 += nu;
      }
    };

    for (int64_t s = 0; s < S.T; ++s) {
      const int64_t t = S.t_of(s), off = S.off[t];
      const float* h_cur = hT.data() + (s & 1) * H * ldb;
      float* h_nxt = hT.data() + ((s + 1) & 1) * H * ldb;
      if (Jn > 0) {
        if (s >= chunk_end) {  // the next chunk's projection: bias + W_ih x^T
          chunk_first = s;
          chunk_end = std::min(S.T, s + chunk_steps);
          for (int64_t sl = 0; sl < chunk_end - s; ++sl) {
            const float* xs = a.x + S.off[S.t_of(s + sl)] * I;
            vec_math::transpose(B, I, [&](int64_t r) { return xs + r * I; }, xT.data() + sl * ldb, ldp);
          }
          const LaneEpilogue keep_sums{false, nullptr, nullptr, ldb, false, false};
          tiles(Wi, xT.data(), ldp, 0, I, (chunk_end - s) * nv, bias.data(), 2 * kLanes, 0, proj.data(), ldp,
                keep_sums);
        }
        // This step's sums, own k-range first, accumulated in the projection buffer, the last range finishing.
        float* sums = proj.data() + (s - chunk_first) * ldb;
        for (int p = 0; p < nt; ++p) {
          const int u = p == 0 ? tid : (p <= tid ? p - 1 : p);
          if (p > 0) flags.wait(u, s);
          const LaneEpilogue e{p == nt - 1, cT.data(), h_nxt, ldb, a.relu, a.gates != nullptr};
          tiles(Wh, h_cur, ldb, units[u].begin, units[u].end, nv, sums, ldp, kLanes, sums, ldp, e);
        }
        auto rows_of = [&](const float* base, int64_t ld) { return [=](int64_t r) { return base + r * ld; }; };
        vec_math::transpose(Jn, B, rows_of(h_nxt + J.begin * ldb, ldb), a.out + off * H + J.begin, H);
        if (a.gates) {
          for (int g = 0; g < 4; ++g)
            vec_math::transpose(Jn, B, rows_of(sums + g * ldp, 4 * ldp), a.gates + off * 4 * H + g * H + J.begin,
                                4 * H);
          vec_math::transpose(Jn, B, rows_of(cT.data() + J.begin * ldb, ldb), a.cells + off * H + J.begin, H);
        }
        if (s == S.T - 1) {  // final states: h_n is the output rows just written
          for (int64_t b = 0; b < B; ++b)
            std::copy(a.out + (off + b) * H + J.begin, a.out + (off + b) * H + J.end, a.h_n + b * H + J.begin);
          if (G == 4) vec_math::transpose(Jn, B, rows_of(cT.data() + J.begin * ldb, ldb), a.c_n + J.begin, H);
        }
      }
      flags.publish(tid, s + 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Op entry points

// Internal buffers (never returned) are kept per thread and reused across calls, like oneDNN's scratchpad:
// a fresh multi-megabyte allocation costs a page fault per 4 KiB on first touch, which measurably slowed the
// GEMMs writing them. `slot` tells the buffers of one call apart.
Tensor workspace(int slot, at::IntArrayRef shape, at::ScalarType dtype) {
  thread_local std::vector<Tensor> buffers;
  if (static_cast<int>(buffers.size()) <= slot) buffers.resize(slot + 1);
  int64_t numel = 1;
  for (const int64_t d : shape) numel *= d;
  Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.scalar_type() != dtype || buf.numel() < numel) {
    buf = Tensor();  // free the old one first
    buf = at::empty({numel}, at::TensorOptions().dtype(dtype));
  }
  return buf.narrow(0, 0, numel).view(shape);
}

// Pointers to the n rows of a row-major matrix with row stride ld.
template <typename T>
std::vector<const T*> matrix_rows(const T* base, int64_t n, int64_t ld) {
  std::vector<const T*> rows(n);
  for (int64_t k = 0; k < n; ++k) rows[k] = base + k * ld;
  return rows;
}

// op(A) @ B_s for each operand s, given by its K row pointers and its width, as contiguous (M, width) tensors;
// op(A) = A, or A^T with `a_transposed`. A is a contiguous matrix of type T. See gemm::parallel_matmul.
template <typename T>
std::vector<Tensor> products(const Tensor& A, bool a_transposed,
                             const std::vector<std::pair<std::vector<const T*>, int64_t>>& operands) {
  constexpr int64_t L = gemm::lanes<T>();
  const int64_t M = A.size(a_transposed ? 1 : 0), K = A.size(a_transposed ? 0 : 1);
  std::vector<Tensor> results;  // rows padded to whole vectors, the padding cut off below
  std::vector<gemm::Operand<T>> ops;
  for (const auto& [rows, n] : operands) {
    results.push_back(at::empty({M, gemm::round_up(n, L)}, A.options()));
    ops.push_back({rows.data(), n, results.back().template data_ptr<T>(), results.back().size(1)});
  }
  Tensor pack = workspace(1, {gemm::packed_size(ops, K)}, A.scalar_type());
  gemm::parallel_matmul<T>(M, K, A.template data_ptr<T>(), A.size(1), a_transposed, ops, pack.template data_ptr<T>(),
                           at::in_parallel_region() ? 1 : at::get_num_threads());
  for (size_t s = 0; s < ops.size(); ++s)
    if (results[s].size(1) != ops[s].n) results[s] = results[s].narrow(1, 0, ops[s].n).contiguous();
  return results;
}

// The gradients of a layer's weights, given dG (N, G) of the gate pre-activations: [grad_w_ih | grad_w_hh] =
// dG^T @ [x | h_prev], where h_prev's row is the state that row started from (the previous step's output row, or
// h0), read in place. One GEMM over all steps, which packs dG^T once for both. Tensors of the compute type.
std::pair<Tensor, Tensor> weight_grads(const Schedule& S, const Tensor& dG, const Tensor& input, const Tensor& output,
                                       const Tensor& h0) {
  return AT_DISPATCH_FLOATING_TYPES(dG.scalar_type(), "weight_grads", [&] {
    using T = scalar_t;
    const Tensor x = input.contiguous(), out = output.contiguous(), h = h0.contiguous();
    const int64_t N = S.N, I = x.size(1), P = out.size(1);
    std::vector<const T*> h_rows(N);
    for (int64_t t = 0; t < S.T; ++t)
      for (int64_t b = 0; b < S.bs[t]; ++b) {
        const int64_t r = S.prev_row(t, b);
        h_rows[S.off[t] + b] = r >= 0 ? out.data_ptr<T>() + r * P : h.data_ptr<T>() + b * P;
      }
    const std::vector<Tensor> gw = products<T>(dG, true, {{matrix_rows(x.data_ptr<T>(), N, I), I}, {h_rows, P}});
    return std::make_pair(gw[0], gw[1]);
  });
}

// A (rows, cols) gradient tensor of element type T as GradRows, with its own strides.
template <typename T>
GradRows<T> grad_rows(const Tensor& g) {
  return {g.data_ptr<T>(), g.stride(0), g.stride(1)};
}

// b_ih + b_hh in the compute type, or zeros.
Tensor bias_sum(const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh, int64_t rows,
                at::ScalarType ct) {
  if (!b_ih.has_value()) return at::zeros({rows}, at::TensorOptions().dtype(ct));
  return (b_ih->to(ct) + b_hh->to(ct)).contiguous();
}

// Shapes of an LSTM layer call: returns {H, P}.
std::pair<int64_t, int64_t> check_lstm_layer(const char* op, const Tensor& input, const Tensor& h0, const Tensor& c0,
                                             const Tensor& w_ih, const Tensor& w_hh,
                                             const std::optional<Tensor>& w_hr) {
  check_cpu_float(op, "input", input);
  check_dim(op, "input", input, 2, "(rows, input_size)");
  check_cpu_float(op, "w_ih", w_ih);
  check_same_dtype(op, "w_ih", w_ih, "input", input);
  check_dim(op, "w_ih", w_ih, 2, "(4 * hidden_size, input_size)");
  TORCH_CHECK(w_ih.size(0) > 0 && w_ih.size(0) % 4 == 0, op,
              ": expected w_ih.size(0) to be a positive multiple of 4 (4 * hidden_size), got ", w_ih.size(0));
  const int64_t H = w_ih.size(0) / 4;
  int64_t P = H;
  if (w_hr.has_value()) {
    check_cpu_float(op, "w_hr", *w_hr);
    check_dim(op, "w_hr", *w_hr, 2, "(proj_size, hidden_size)");
    P = w_hr->size(0);
    TORCH_CHECK(P > 0, op, ": expected w_hr to have proj_size > 0 rows, got 0");
    check_arg(op, "w_hr", *w_hr, {P, H}, "(proj_size, hidden_size)", "input", input);
  }
  check_arg(op, "w_ih", w_ih, {4 * H, input.size(1)}, "(4 * hidden_size, input_size)", "input", input);
  check_arg(op, "w_hh", w_hh, {4 * H, P}, "(4 * hidden_size, proj_size or hidden_size)", "input", input);
  check_cpu_float(op, "h0", h0);
  check_dim(op, "h0", h0, 2, "(batch, proj_size or hidden_size)");
  const int64_t B = h0.size(0);
  check_arg(op, "h0", h0, {B, P}, "(batch, proj_size or hidden_size)", "input", input);
  check_arg(op, "c0", c0, {B, H}, "(batch, hidden_size)", "input", input);
  return {H, P};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq_fwd(
    const Tensor& input, const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0, const Tensor& w_ih,
    const Tensor& w_hh, const std::optional<Tensor>& b_ih, const std::optional<Tensor>& b_hh,
    const std::optional<Tensor>& w_hr, bool reverse, bool train) {
  constexpr const char* op = "seqkernels::lstm_seq_fwd";
  const auto [H, P] = check_lstm_layer(op, input, h0, c0, w_ih, w_hh, w_hr);
  check_biases(op, b_ih, b_hh, 4 * H, "(4 * hidden_size)", input);
  const int64_t B = h0.size(0), N = input.size(0);
  const Schedule S = make_schedule(op, batch_sizes, N, B, reverse);

  const auto dt = input.scalar_type(), ct = compute_type(dt);
  const Tensor xc = to_compute(input), wih = to_compute(w_ih), bias = bias_sum(b_ih, b_hh, 4 * H, ct);
  const Tensor whh = to_compute(w_hh), h0c = to_compute(h0), c0c = to_compute(c0);
  const Tensor whr = w_hr.has_value() ? to_compute(*w_hr) : Tensor();
  const auto opts = bias.options();
  Tensor out = at::empty({N, P}, opts), h_n = at::empty({B, P}, opts), c_n = at::empty({B, H}, opts);
  Tensor gates = at::empty({train ? N : 0, 4 * H}, opts), cells = at::empty({train ? N : 0, H}, opts);
  if (lanes_forward_applies(S, ct == at::kFloat, whr.defined(), 4, input.size(1), H)) {
    const LanesFwd a{xc.data_ptr<float>(),  wih.data_ptr<float>(), bias.data_ptr<float>(),
                     whh.data_ptr<float>(), h0c.data_ptr<float>(),  c0c.data_ptr<float>(),
                     out.data_ptr<float>(), h_n.data_ptr<float>(),  c_n.data_ptr<float>(),
                     train ? gates.data_ptr<float>() : nullptr,     train ? cells.data_ptr<float>() : nullptr,
                     input.size(1),         H,                      false};
    lanes_forward<4>(S, a);
    return {out.to(dt), h_n.to(dt), c_n.to(dt), gates, cells};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_seq_fwd", [&] {
    LstmFwd<scalar_t> a{xc.data_ptr<scalar_t>(),
                        wih.data_ptr<scalar_t>(),
                        bias.data_ptr<scalar_t>(),
                        whh.data_ptr<scalar_t>(),
                        whr.defined() ? whr.data_ptr<scalar_t>() : nullptr,
                        h0c.data_ptr<scalar_t>(),
                        c0c.data_ptr<scalar_t>(),
                        out.data_ptr<scalar_t>(),
                        h_n.data_ptr<scalar_t>(),
                        c_n.data_ptr<scalar_t>(),
                        train ? gates.data_ptr<scalar_t>() : nullptr,
                        train ? cells.data_ptr<scalar_t>() : nullptr,
                        input.size(1),
                        H,
                        P};
    lstm_forward(S, a);
  });
  return {out.to(dt), h_n.to(dt), c_n.to(dt), gates, cells};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_seq_bwd(
    const Tensor& grad_output, const Tensor& grad_hn, const Tensor& grad_cn, const Tensor& input,
    const Tensor& batch_sizes, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const Tensor& output, const Tensor& gates, const Tensor& cells,
    bool reverse) {
  constexpr const char* op = "seqkernels::lstm_seq_bwd";
  const auto [H, P] = check_lstm_layer(op, input, h0, c0, w_ih, w_hh, w_hr);
  const int64_t B = h0.size(0), N = input.size(0);
  const Schedule S = make_schedule(op, batch_sizes, N, B, reverse);
  const auto dt = input.scalar_type(), ct = compute_type(dt);
  check_arg(op, "grad_output", grad_output, {N, P}, "(rows, proj_size or hidden_size)", "input", input);
  check_arg(op, "grad_hn", grad_hn, {B, P}, "(batch, proj_size or hidden_size)", "input", input);
  check_arg(op, "grad_cn", grad_cn, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "output", output, {N, P}, "(rows, proj_size or hidden_size)", "input", input);
  for (const auto& [name, t, cols] : {std::tuple<const char*, const Tensor&, int64_t>{"gates", gates, 4 * H},
                                      std::tuple<const char*, const Tensor&, int64_t>{"cells", cells, H}}) {
    check_cpu_float(op, name, t);
    TORCH_CHECK(t.scalar_type() == ct, op, ": expected ", name, " (saved by lstm_seq_fwd with train=True) to have dtype ",
                ct, ", got ", t.scalar_type());
    check_shape(op, name, t, {N, cols}, "(rows, 4 * hidden_size or hidden_size)");
  }

  const Tensor go = as_type(grad_output, ct), ghn = to_compute(grad_hn), gcn = to_compute(grad_cn);
  const Tensor g = gates.contiguous(), cs = cells.contiguous(), c0c = to_compute(c0);
  const Tensor whh = to_compute(w_hh), whr = w_hr.has_value() ? to_compute(*w_hr) : Tensor();
  const auto opts = g.options();
  Tensor dG = workspace(2, {N, 4 * H}, ct);
  Tensor DH = at::empty({whr.defined() ? N : 0, P}, opts), Ht = at::empty({whr.defined() ? N : 0, H}, opts);
  Tensor grad_h0 = at::empty({B, P}, opts), grad_c0 = at::empty({B, H}, opts), grad_bias = at::empty({4 * H}, opts);
  const Tensor wih = to_compute(w_ih);
  Tensor grad_input = at::empty({N, input.size(1)}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "lstm_seq_bwd", [&] {
    LstmBwd<scalar_t> a{grad_rows<scalar_t>(go), ghn.data_ptr<scalar_t>(), gcn.data_ptr<scalar_t>(),
                        g.data_ptr<scalar_t>(),   cs.data_ptr<scalar_t>(),  c0c.data_ptr<scalar_t>(),
                        whh.data_ptr<scalar_t>(), whr.defined() ? whr.data_ptr<scalar_t>() : nullptr,
                        dG.data_ptr<scalar_t>(),  whr.defined() ? DH.data_ptr<scalar_t>() : nullptr,
                        whr.defined() ? Ht.data_ptr<scalar_t>() : nullptr,
                        grad_h0.data_ptr<scalar_t>(), grad_c0.data_ptr<scalar_t>(), grad_bias.data_ptr<scalar_t>(),
                        wih.data_ptr<scalar_t>(), grad_input.data_ptr<scalar_t>(), H, P, input.size(1)};
    lstm_backward(S, a);
  });
  const auto [grad_w_ih, grad_w_hh] = weight_grads(S, dG, to_compute(input), to_compute(output), to_compute(h0));
  Tensor grad_w_hr = at::empty({0, 0}, input.options());
  if (whr.defined()) {  // DH^T @ Ht
    grad_w_hr = AT_DISPATCH_FLOATING_TYPES(ct, "lstm_seq_bwd", [&] {
      return products<scalar_t>(DH, true, {{matrix_rows(Ht.data_ptr<scalar_t>(), N, H), H}})[0].to(dt);
    });
  }
  return {grad_input.to(dt), grad_h0.to(dt), grad_c0.to(dt), grad_w_ih.to(dt), grad_w_hh.to(dt), grad_bias.to(dt),
          grad_w_hr};
}

int64_t check_rnn_layer(const char* op, const Tensor& input, const Tensor& h0, const Tensor& w_ih,
                        const Tensor& w_hh) {
  check_cpu_float(op, "input", input);
  check_dim(op, "input", input, 2, "(rows, input_size)");
  check_cpu_float(op, "w_ih", w_ih);
  check_same_dtype(op, "w_ih", w_ih, "input", input);
  check_dim(op, "w_ih", w_ih, 2, "(hidden_size, input_size)");
  const int64_t H = w_ih.size(0);
  TORCH_CHECK(H > 0, op, ": expected w_ih to have hidden_size > 0 rows, got 0");
  check_arg(op, "w_ih", w_ih, {H, input.size(1)}, "(hidden_size, input_size)", "input", input);
  check_arg(op, "w_hh", w_hh, {H, H}, "(hidden_size, hidden_size)", "input", input);
  check_cpu_float(op, "h0", h0);
  check_dim(op, "h0", h0, 2, "(batch, hidden_size)");
  check_arg(op, "h0", h0, {h0.size(0), H}, "(batch, hidden_size)", "input", input);
  return H;
}

std::tuple<Tensor, Tensor> rnn_seq_fwd(const Tensor& input, const Tensor& batch_sizes, const Tensor& h0,
                                       const Tensor& w_ih, const Tensor& w_hh, const std::optional<Tensor>& b_ih,
                                       const std::optional<Tensor>& b_hh, const std::string& nonlinearity,
                                       bool reverse) {
  constexpr const char* op = "seqkernels::rnn_seq_fwd";
  const bool relu = is_relu(op, nonlinearity);
  const int64_t H = check_rnn_layer(op, input, h0, w_ih, w_hh);
  check_biases(op, b_ih, b_hh, H, "(hidden_size)", input);
  const int64_t B = h0.size(0), N = input.size(0);
  const Schedule S = make_schedule(op, batch_sizes, N, B, reverse);
  const auto dt = input.scalar_type(), ct = compute_type(dt);
  const Tensor xc = to_compute(input), wih = to_compute(w_ih), bias = bias_sum(b_ih, b_hh, H, ct);
  const Tensor whh = to_compute(w_hh), h0c = to_compute(h0);
  Tensor out = at::empty({N, H}, bias.options()), h_n = at::empty({B, H}, bias.options());
  if (lanes_forward_applies(S, ct == at::kFloat, /*proj=*/false, 1, input.size(1), H)) {
    const LanesFwd a{xc.data_ptr<float>(),  wih.data_ptr<float>(), bias.data_ptr<float>(), whh.data_ptr<float>(),
                     h0c.data_ptr<float>(), nullptr,               out.data_ptr<float>(),  h_n.data_ptr<float>(),
                     nullptr,               nullptr,               nullptr,                input.size(1),
                     H,                     relu};
    lanes_forward<1>(S, a);
    return {out.to(dt), h_n.to(dt)};
  }
  AT_DISPATCH_FLOATING_TYPES(ct, "rnn_seq_fwd", [&] {
    rnn_forward<scalar_t>(S, xc.data_ptr<scalar_t>(), wih.data_ptr<scalar_t>(), input.size(1),
                          bias.data_ptr<scalar_t>(), whh.data_ptr<scalar_t>(), h0c.data_ptr<scalar_t>(), relu,
                          out.data_ptr<scalar_t>(), h_n.data_ptr<scalar_t>(), H);
  });
  return {out.to(dt), h_n.to(dt)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> rnn_seq_bwd(
    const Tensor& grad_output, const Tensor& grad_hn, const Tensor& input, const Tensor& batch_sizes,
    const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh, const Tensor& output, const std::string& nonlinearity,
    bool reverse) {
  constexpr const char* op = "seqkernels::rnn_seq_bwd";
  const bool relu = is_relu(op, nonlinearity);
  const int64_t H = check_rnn_layer(op, input, h0, w_ih, w_hh);
  const int64_t B = h0.size(0), N = input.size(0);
  const Schedule S = make_schedule(op, batch_sizes, N, B, reverse);
  check_arg(op, "grad_output", grad_output, {N, H}, "(rows, hidden_size)", "input", input);
  check_arg(op, "grad_hn", grad_hn, {B, H}, "(batch, hidden_size)", "input", input);
  check_arg(op, "output", output, {N, H}, "(rows, hidden_size)", "input", input);
  const auto dt = input.scalar_type(), ct = compute_type(dt);
  const Tensor go = as_type(grad_output, ct), ghn = to_compute(grad_hn), out = to_compute(output);
  const Tensor whh = to_compute(w_hh);
  Tensor dG = workspace(2, {N, H}, ct), grad_h0 = at::empty({B, H}, go.options());
  Tensor grad_bias = at::empty({H}, go.options());
  AT_DISPATCH_FLOATING_TYPES(ct, "rnn_seq_bwd", [&] {
    rnn_backward<scalar_t>(S, grad_rows<scalar_t>(go), ghn.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                           whh.data_ptr<scalar_t>(), relu, dG.data_ptr<scalar_t>(), grad_h0.data_ptr<scalar_t>(),
                           grad_bias.data_ptr<scalar_t>(), H);
  });
  const Tensor wih = to_compute(w_ih);
  const Tensor grad_input = AT_DISPATCH_FLOATING_TYPES(ct, "rnn_seq_bwd", [&] {  // dG @ W_ih
    return products<scalar_t>(dG, false, {{matrix_rows(wih.data_ptr<scalar_t>(), H, wih.size(1)), wih.size(1)}})[0];
  });
  const auto [grad_w_ih, grad_w_hh] = weight_grads(S, dG, to_compute(input), out, to_compute(h0));
  return {grad_input.to(dt), grad_h0.to(dt), grad_w_ih.to(dt), grad_w_hh.to(dt), grad_bias.to(dt)};
}

}  // namespace

TORCH_LIBRARY_IMPL(seqkernels, CPU, m) {
  m.impl("lstm_seq_fwd", &lstm_seq_fwd);
  m.impl("lstm_seq_bwd", &lstm_seq_bwd);
  m.impl("rnn_seq_fwd", &rnn_seq_fwd);
  m.impl("rnn_seq_bwd", &rnn_seq_bwd);
}

}  // namespace seqkernels
