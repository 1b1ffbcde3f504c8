"""LSTM and RNN in Triton: kernels, launch configurations, launchers as custom ops.

The same launcher interface as the C++ kernels (``cpu.py``), so the autograd Functions of ``function.py`` run either:

- Cell step (``lstm_cell_fwd`` / ``rnn_cell_fwd``): one launch of ``_step_fwd_kernel``, which runs both matmuls
  (x W_ih^T and h W_hh^T, ``tl.dot``), the biases, the gate activations and the state update, and saves the
  activated gates. Backward: ``_step_bwd_kernel`` turns the upstream gradients into gate gradients, then
  ``_matmul_kernel`` gives the input, state and weight gradients.
- Whole sequence (``lstm_seq_fwd`` / ``rnn_seq_fwd``) over packed rows (``reference.py`` has the layout): the
  input projection of all steps is one matmul (biases folded in); the recurrence then runs either
  * persistently (hidden and projection sizes up to ``PERSISTENT_MAX``): ``_seq_fwd_kernel``, one program per
    block of sequences, runs every time step in one launch with h and c in registers, and the recurrent weights
    loaded once into shared memory where they fit (``persistent_config``: up to 128 KiB, so hidden 128 in
    float16/bfloat16 and 64 in float32), else re-read each step from L2; or
  * step by step: one ``_step_fwd_kernel`` launch per time step, the hidden size split across programs.
  Backward through time mirrors it (``_seq_bwd_kernel``, or ``_step_bwd_kernel`` + a matmul per step); the
  input and weight gradients are matmuls over all time steps at once.

Per-sequence lengths are handled in the kernels: at step t the rows below batch_sizes[t] update, the others keep
their state, so final states come out at each sequence's own length. Every kernel accumulates in float32; the
hidden state is rounded to the input dtype each step (as the output it is), the cell state stays float32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_common import DTYPES, dot, dtype_reasons, launch, precision

LSTM, RNN_TANH, RNN_RELU = 0, 1, 2
CELLS = {"lstm": LSTM, "tanh": RNN_TANH, "relu": RNN_RELU}
PERSISTENT_MAX = 128  # hidden / projection sizes the persistent kernels take
# Recurrent weights (W_hh, plus W_hr with a projection) up to this size are loaded on chip once per block of
# sequences. Triton keeps a loop-invariant matmul operand in shared memory, loaded before the loop: 128 KiB leaves
# room for the kernels' own scratch within the 163 KiB an sm_80 block may use.
RESIDENT_BYTES = 128 * 1024


# ------------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _matmul_kernel(A, B, C, Bias, M, N, K, sam, sak, sbk, sbn, scm, scn,
                   HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, PREC: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """C (+)= A @ B (+ bias over columns), any strides; A is rounded to B's dtype, products accumulate in float32."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(A + rm[:, None] * sam + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(B + kk[:, None] * sbk + rn[None, :] * sbn, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += dot(a.to(b.dtype), b, PREC)
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    ptrs = C + rm[:, None] * scm + rn[None, :] * scn
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
    tl.store(ptrs, acc.to(C.dtype.element_ty), mask=inside)


@triton.jit
def _gate_matmul(acc, a_rows, a_mask, W, w_row0, cols, cmask, K, PREC: tl.constexpr, BK: tl.constexpr):
    """acc + A @ W[w_row0 + cols, :K]^T, where row r of A starts at pointer a_rows[r]: one gate's share of
    x W_ih^T or h W_hh^T."""
    rk = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_rows[:, None] + kk[None, :], mask=a_mask[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(W + (w_row0 + cols)[None, :] * K + kk[:, None], mask=cmask[None, :] & (kk[:, None] < K),
                    other=0.0)
        acc += dot(a.to(w.dtype), w, PREC)
    return acc


@triton.jit
def _rows_matmul(acc, a_rows, a_mask, W, w_row0, w_stride, cols, cmask, K, PREC: tl.constexpr, BK: tl.constexpr):
    """acc + A @ W[w_row0 : w_row0 + K, cols], where row r of A starts at pointer a_rows[r]."""
    rk = tl.arange(0, BK)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        a = tl.load(a_rows[:, None] + kk[None, :], mask=a_mask[:, None] & (kk[None, :] < K), other=0.0)
        w = tl.load(W + (w_row0 + kk)[:, None] * w_stride + cols[None, :], mask=(kk[:, None] < K) & cmask[None, :],
                    other=0.0)
        acc += dot(a.to(w.dtype), w, PREC)
    return acc


@triton.jit
def _bias(Bih, Bhh, row0, cols, cmask):
    """b_ih + b_hh for one gate's columns, added in float32, as a (1, BH) row."""
    b = tl.load(Bih + row0 + cols, mask=cmask, other=0.0).to(tl.float32)
    return (b + tl.load(Bhh + row0 + cols, mask=cmask, other=0.0).to(tl.float32))[None, :]


@triton.jit
def _step_fwd_kernel(
    X, Wih, XP, HPrev, H0, Whh, Bih, Bhh, Cx, Cy, Out, Gates,
    n_rows, n_prev, x_row0, hp_row0, out_row0, I, H, P,
    CELL: tl.constexpr, HAS_INPUT: tl.constexpr, HAS_XP: tl.constexpr, HAS_BIAS: tl.constexpr,
    SAVE: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr,
):
    """One time step for rows [0, n_rows) and hidden columns of this program. Pre-activations: XP[x_row0 + row]
    (a precomputed input projection) or X[x_row0 + row] W_ih^T + biases, plus h_prev W_hh^T, where h_prev of row
    b is HPrev[hp_row0 + b] for b < n_prev, else H0[b]. LSTM: c' = f c + i g from Cx into Cy (may alias),
    Out = o tanh(c'); RNN: Out = act(pre). SAVE writes the activated gates (and c') to Gates[x_row0 + row]."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BB + tl.arange(0, BB)
    cols = pid_h * BH + tl.arange(0, BH)
    rmask = rows < n_rows
    cmask = cols < H
    tile = rmask[:, None] & cmask[None, :]
    G: tl.constexpr = 4 if CELL == 0 else 1
    xrows = x_row0 + rows
    acc_i = tl.zeros([BB, BH], tl.float32)
    acc_f = tl.zeros([BB, BH], tl.float32)
    acc_g = tl.zeros([BB, BH], tl.float32)
    acc_o = tl.zeros([BB, BH], tl.float32)
    if HAS_XP:
        xp = XP + xrows[:, None] * (G * H) + cols[None, :]
        acc_i += tl.load(xp, mask=tile, other=0.0).to(tl.float32)
        if CELL == 0:
            acc_f += tl.load(xp + H, mask=tile, other=0.0).to(tl.float32)
            acc_g += tl.load(xp + 2 * H, mask=tile, other=0.0).to(tl.float32)
            acc_o += tl.load(xp + 3 * H, mask=tile, other=0.0).to(tl.float32)
    if HAS_INPUT:
        x_rows = X + xrows * I
        acc_i = _gate_matmul(acc_i, x_rows, rmask, Wih, 0, cols, cmask, I, PREC, BK)
        if CELL == 0:
            acc_f = _gate_matmul(acc_f, x_rows, rmask, Wih, H, cols, cmask, I, PREC, BK)
            acc_g = _gate_matmul(acc_g, x_rows, rmask, Wih, 2 * H, cols, cmask, I, PREC, BK)
            acc_o = _gate_matmul(acc_o, x_rows, rmask, Wih, 3 * H, cols, cmask, I, PREC, BK)
    h_rows = tl.where(rows < n_prev, HPrev + (hp_row0 + rows) * P, H0 + rows * P)  # each row's h_prev
    acc_i = _gate_matmul(acc_i, h_rows, rmask, Whh, 0, cols, cmask, P, PREC, BK)
    if CELL == 0:
        acc_f = _gate_matmul(acc_f, h_rows, rmask, Whh, H, cols, cmask, P, PREC, BK)
        acc_g = _gate_matmul(acc_g, h_rows, rmask, Whh, 2 * H, cols, cmask, P, PREC, BK)
        acc_o = _gate_matmul(acc_o, h_rows, rmask, Whh, 3 * H, cols, cmask, P, PREC, BK)
    if HAS_BIAS:
        acc_i += _bias(Bih, Bhh, 0, cols, cmask)
        if CELL == 0:
            acc_f += _bias(Bih, Bhh, H, cols, cmask)
            acc_g += _bias(Bih, Bhh, 2 * H, cols, cmask)
            acc_o += _bias(Bih, Bhh, 3 * H, cols, cmask)
    out_ptrs = Out + (out_row0 + rows)[:, None] * H + cols[None, :]
    if CELL == 0:
        i = _sigmoid(acc_i)
        f = _sigmoid(acc_f)
        g = _tanh(acc_g)
        o = _sigmoid(acc_o)
        c_ptrs = rows[:, None] * H + cols[None, :]
        c = f * tl.load(Cx + c_ptrs, mask=tile, other=0.0).to(tl.float32) + i * g
        tl.store(Cy + c_ptrs, c.to(Cy.dtype.element_ty), mask=tile)
        tl.store(out_ptrs, (o * _tanh(c)).to(Out.dtype.element_ty), mask=tile)
        if SAVE:
            _save_gates(Gates, xrows, cols, tile, H, i, f, g, o, c)
    else:
        if CELL == 1:
            h = _tanh(acc_i)
        else:
            h = tl.maximum(acc_i, 0.0)
        tl.store(out_ptrs, h.to(Out.dtype.element_ty), mask=tile)


@triton.jit
def _save_gates(Gates, rows, cols, tile, H, i, f, g, o, c):
    """The activated gates and c' of packed rows `rows`, for the backward: (rows, 5H) float32, i f g o c'."""
    gp = Gates + rows[:, None] * (5 * H) + cols[None, :]
    tl.store(gp, i, mask=tile)
    tl.store(gp + H, f, mask=tile)
    tl.store(gp + 2 * H, g, mask=tile)
    tl.store(gp + 3 * H, o, mask=tile)
    tl.store(gp + 4 * H, c, mask=tile)


@triton.jit
def _lstm_gate_grads(Gates, C0, dGates, rows, prev_rows, from_prev, seqs, cols, tile, H, dh, dc):
    """LSTM gate gradients of packed rows `rows` from the saved gates, dh (of o tanh(c')) and dc (of c'); c_prev is
    c' of packed row prev_rows where from_prev, else C0[seqs]. Stores them to dGates (rows, 4H) and returns them,
    with the gradient of c_prev (dc * f, dc including the path through h)."""
    gp = Gates + rows[:, None] * (5 * H) + cols[None, :]
    i = tl.load(gp, mask=tile, other=0.0)
    f = tl.load(gp + H, mask=tile, other=0.0)
    g = tl.load(gp + 2 * H, mask=tile, other=0.0)
    o = tl.load(gp + 3 * H, mask=tile, other=0.0)
    c = tl.load(gp + 4 * H, mask=tile, other=0.0)
    prev = from_prev[:, None] & tile
    c_prev = tl.load(Gates + prev_rows[:, None] * (5 * H) + 4 * H + cols[None, :], mask=prev, other=0.0)
    c_prev += tl.load(C0 + seqs[:, None] * H + cols[None, :], mask=tile & ~prev, other=0.0).to(tl.float32)
    tc = _tanh(c)
    dc = dc + dh * o * (1.0 - tc * tc)
    d_i = dc * g * i * (1.0 - i)
    d_f = dc * c_prev * f * (1.0 - f)
    d_g = dc * i * (1.0 - g * g)
    d_o = dh * tc * o * (1.0 - o)
    dp = dGates + rows[:, None] * (4 * H) + cols[None, :]
    tl.store(dp, d_i, mask=tile)
    tl.store(dp + H, d_f, mask=tile)
    tl.store(dp + 2 * H, d_g, mask=tile)
    tl.store(dp + 3 * H, d_o, mask=tile)
    return d_i, d_f, d_g, d_o, dc * f


@triton.jit
def _rnn_pre_grad(Out, rows, cols, tile, H, dh, CELL: tl.constexpr):
    """RNN: the gradient of the pre-activation from dh and the output h of packed rows `rows`."""
    h = tl.load(Out + rows[:, None] * H + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    if CELL == 1:
        return dh * (1.0 - h * h)
    return tl.where(h > 0.0, dh, 0.0)


@triton.jit
def _step_bwd_kernel(
    dH, dOut, Gates, C0, Out, dC, dGates, dCx,
    n_rows, n_prev, row0, cp_row0, dout_row0, H,
    CELL: tl.constexpr, HAS_DOUT: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr,
):
    """Gate gradients of one step for rows [0, n_rows): dh = dH[row] (+ dOut[dout_row0 + row]); LSTM: from the
    saved gates and c' (Gates[row0 + row]), dC[row] and c_prev (c' of Gates[cp_row0 + row] for row < n_prev, else
    C0[row]); writes dGates[row0 + row] and the cell gradient dC_x[row] = dc * f (dCx may alias dC).
    RNN: from the output h (Out[row0 + row])."""
    pid_b = tl.program_id(0)
    pid_h = tl.program_id(1)
    rows = pid_b * BB + tl.arange(0, BB)
    cols = pid_h * BH + tl.arange(0, BH)
    rmask = rows < n_rows
    tile = rmask[:, None] & (cols[None, :] < H)
    srows = row0 + rows
    dh = tl.load(dH + rows[:, None] * H + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    if HAS_DOUT:
        dh += tl.load(dOut + (dout_row0 + rows)[:, None] * H + cols[None, :], mask=tile, other=0.0).to(tl.float32)
    if CELL == 0:
        dc = tl.load(dC + rows[:, None] * H + cols[None, :], mask=tile, other=0.0).to(tl.float32)
        _, _, _, _, dc_prev = _lstm_gate_grads(Gates, C0, dGates, srows, cp_row0 + rows, rows < n_prev, rows, cols,
                                               tile, H, dh, dc)
        tl.store(dCx + rows[:, None] * H + cols[None, :], dc_prev.to(dCx.dtype.element_ty), mask=tile)
    else:
        dpre = _rnn_pre_grad(Out, srows, cols, tile, H, dh, CELL)
        tl.store(dGates + srows[:, None] * H + cols[None, :], dpre, mask=tile)


@triton.jit
def _load_weights(W, row0, R, K, rstride, BR: tl.constexpr, BK: tl.constexpr):
    """W[row0 + r, k] as a (BK, BR) tile: the transposed weight block x @ W^T needs."""
    r = tl.arange(0, BR)
    k = tl.arange(0, BK)
    return tl.load(W + (row0 + r)[None, :] * rstride + k[:, None], mask=(r[None, :] < R) & (k[:, None] < K), other=0.0)


@triton.jit
def _load_weights_t(W, row0, R, K, rstride, BR: tl.constexpr, BK: tl.constexpr):
    """W[row0 + r, k] as a (BR, BK) tile: the block g @ W needs."""
    r = tl.arange(0, BR)
    k = tl.arange(0, BK)
    return tl.load(W + (row0 + r)[:, None] * rstride + k[None, :], mask=(r[:, None] < R) & (k[None, :] < K), other=0.0)


@triton.jit
def _seq_fwd_kernel(
    XP, H0, C0, Whh, Whr, Out, Hn, Cn, Gates, BatchSizes, Offsets, T, B, H, P,
    CELL: tl.constexpr, HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, SAVE: tl.constexpr,
    RESIDENT: tl.constexpr, PREC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr,
    BK: tl.constexpr,
):
    """The whole recurrence in one launch for sequences [pid * BB, pid * BB + BB): h (BB, P) and c (BB, H) stay in
    registers across steps; with RESIDENT, the recurrent weights are loaded once (the compiler keeps them in shared
    memory) instead of read from memory each step in BK-wide slices. XP holds the input projections (biases
    included) of the packed rows; step t's rows start at Offsets[t] and number BatchSizes[t]."""
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    hc = tl.arange(0, BH)
    pc = tl.arange(0, BP)
    hmask = hc < H
    pmask = pc < P
    G: tl.constexpr = 4 if CELL == 0 else 1
    h = tl.load(H0 + rows[:, None] * P + pc[None, :], mask=(rows[:, None] < B) & pmask[None, :], other=0.0)
    c = tl.zeros([BB, BH], tl.float32)
    if CELL == 0:
        c = tl.load(C0 + rows[:, None] * H + hc[None, :], mask=(rows[:, None] < B) & hmask[None, :], other=0.0)
        c = c.to(tl.float32)
    if RESIDENT:
        w_i = _load_weights(Whh, 0, H, P, P, BH, BP)
        if CELL == 0:
            w_f = _load_weights(Whh, H, H, P, P, BH, BP)
            w_g = _load_weights(Whh, 2 * H, H, P, P, BH, BP)
            w_o = _load_weights(Whh, 3 * H, H, P, P, BH, BP)
    if HAS_PROJ:
        w_r = _load_weights(Whr, 0, P, H, H, BP, BH)  # (H, P) at most 128 x 128: held for the whole sequence
    for step in range(0, T):
        t = step
        if REVERSE:
            t = T - 1 - step
        n = tl.load(BatchSizes + t)
        off = tl.load(Offsets + t)
        active = rows < n
        hm = active[:, None] & hmask[None, :]
        xrows = off + rows
        xp = XP + xrows[:, None] * (G * H) + hc[None, :]
        pre_i = tl.load(xp, mask=hm, other=0.0)
        pre_f = tl.load(xp + H, mask=hm, other=0.0)
        pre_g = tl.load(xp + 2 * H, mask=hm, other=0.0)
        pre_o = tl.load(xp + 3 * H, mask=hm, other=0.0)
        if RESIDENT:
            pre_i += dot(h, w_i, PREC)
            if CELL == 0:
                pre_f += dot(h, w_f, PREC)
                pre_g += dot(h, w_g, PREC)
                pre_o += dot(h, w_o, PREC)
        else:
            # h_prev from memory, in BK-wide slices against the matching slices of W_hh (read from L2 each step):
            # the previous step's output rows, or h0 for a sequence that has not started (reverse direction).
            t_prev = t - 1
            if REVERSE:
                t_prev = t + 1
            has_prev = (t_prev >= 0) & (t_prev < T)
            n_prev = tl.load(BatchSizes + t_prev, mask=has_prev, other=0)
            off_prev = tl.load(Offsets + t_prev, mask=has_prev, other=0)
            h_rows = tl.where(rows < n_prev, Out + (off_prev + rows) * P, H0 + rows * P)
            pre_i = _gate_matmul(pre_i, h_rows, active, Whh, 0, hc, hmask, P, PREC, BK)
            if CELL == 0:
                pre_f = _gate_matmul(pre_f, h_rows, active, Whh, H, hc, hmask, P, PREC, BK)
                pre_g = _gate_matmul(pre_g, h_rows, active, Whh, 2 * H, hc, hmask, P, PREC, BK)
                pre_o = _gate_matmul(pre_o, h_rows, active, Whh, 3 * H, hc, hmask, P, PREC, BK)
        if CELL == 0:
            i = _sigmoid(pre_i)
            f = _sigmoid(pre_f)
            g = _tanh(pre_g)
            o = _sigmoid(pre_o)
            c_new = f * c + i * g
            r = o * _tanh(c_new)
            c = tl.where(active[:, None], c_new, c)
            if SAVE:
                _save_gates(Gates, xrows, hc, hm, H, i, f, g, o, c_new)
        elif CELL == 1:
            r = _tanh(pre_i)
        else:
            r = tl.maximum(pre_i, 0.0)
        if HAS_PROJ:
            h_new = dot(r.to(w_r.dtype), w_r, PREC).to(h.dtype)
        else:
            h_new = r.to(h.dtype)
        tl.store(Out + xrows[:, None] * P + pc[None, :], h_new, mask=active[:, None] & pmask[None, :])
        h = tl.where(active[:, None], h_new, h)
        if not RESIDENT:
            tl.debug_barrier()  # this step's output rows are the next step's h_prev, read by other threads
    inside = rows[:, None] < B
    tl.store(Hn + rows[:, None] * P + pc[None, :], h, mask=inside & pmask[None, :])
    if CELL == 0:
        tl.store(Cn + rows[:, None] * H + hc[None, :], c.to(Cn.dtype.element_ty), mask=inside & hmask[None, :])


@triton.jit
def _seq_bwd_kernel(
    dOut, dHn, dCn, Gates, Out, C0, Whh, Whr, dGates, dHt, dH0, dC0, BatchSizes, Offsets, T, B, H, P,
    CELL: tl.constexpr, HAS_PROJ: tl.constexpr, REVERSE: tl.constexpr, RESIDENT: tl.constexpr,
    PREC: tl.constexpr, BB: tl.constexpr, BH: tl.constexpr, BP: tl.constexpr, BK: tl.constexpr,
):
    """Backward through time in one launch for sequences [pid * BB, pid * BB + BB), steps in the opposite order
    of the forward: dh (BB, P) and dc (BB, H) in registers; writes the gate gradients of every row (dGates) and,
    with a projection, the gradient of each projected output (dHt, for W_hr's gradient)."""
    pid = tl.program_id(0)
    rows = pid * BB + tl.arange(0, BB)
    hc = tl.arange(0, BH)
    pc = tl.arange(0, BP)
    hmask = hc < H
    pmask = pc < P
    inside = rows[:, None] < B
    dh = tl.load(dHn + rows[:, None] * P + pc[None, :], mask=inside & pmask[None, :], other=0.0).to(tl.float32)
    dc = tl.zeros([BB, BH], tl.float32)
    if CELL == 0:
        dc = tl.load(dCn + rows[:, None] * H + hc[None, :], mask=inside & hmask[None, :], other=0.0).to(tl.float32)
    if RESIDENT:
        w_i = _load_weights_t(Whh, 0, H, P, P, BH, BP)
        if CELL == 0:
            w_f = _load_weights_t(Whh, H, H, P, P, BH, BP)
            w_g = _load_weights_t(Whh, 2 * H, H, P, P, BH, BP)
            w_o = _load_weights_t(Whh, 3 * H, H, P, P, BH, BP)
    if HAS_PROJ:
        w_r = _load_weights_t(Whr, 0, P, H, H, BP, BH)
    for step in range(0, T):
        t = T - 1 - step
        t_prev = t - 1
        if REVERSE:
            t = step
            t_prev = t + 1
        n = tl.load(BatchSizes + t)
        off = tl.load(Offsets + t)
        has_prev = (t_prev >= 0) & (t_prev < T)
        n_prev = tl.load(BatchSizes + t_prev, mask=has_prev, other=0)
        off_prev = tl.load(Offsets + t_prev, mask=has_prev, other=0)
        active = rows < n
        hm = active[:, None] & hmask[None, :]
        pm = active[:, None] & pmask[None, :]
        xrows = off + rows
        dht = dh + tl.load(dOut + xrows[:, None] * P + pc[None, :], mask=pm, other=0.0).to(tl.float32)
        if HAS_PROJ:
            tl.store(dHt + xrows[:, None] * P + pc[None, :], dht, mask=pm)
            dr = dot(dht.to(w_r.dtype), w_r, PREC)
        else:
            dr = dht
        if CELL == 0:
            d_i, d_f, d_g, d_o, dc_prev = _lstm_gate_grads(Gates, C0, dGates, xrows, off_prev + rows, rows < n_prev,
                                                           rows, hc, hm, H, dr, dc)
            dc = tl.where(active[:, None], dc_prev, dc)
            if RESIDENT:
                dty = w_i.dtype
                dh_new = dot(d_i.to(dty), w_i, PREC) + dot(d_f.to(dty), w_f, PREC) + dot(d_g.to(dty), w_g, PREC)
                dh_new += dot(d_o.to(dty), w_o, PREC)
            else:
                tl.debug_barrier()  # the gate gradients just stored are read back in slices, by other threads
                dh_new = _rows_matmul(tl.zeros([BB, BP], tl.float32), dGates + xrows * (4 * H), active, Whh, 0, P,
                                      pc, pmask, 4 * H, PREC, BK)
        else:
            d_pre = _rnn_pre_grad(Out, xrows, hc, hm, H, dr, CELL)
            tl.store(dGates + xrows[:, None] * H + hc[None, :], d_pre, mask=hm)
            if RESIDENT:
                dh_new = dot(d_pre.to(w_i.dtype), w_i, PREC)
            else:
                tl.debug_barrier()
                dh_new = _rows_matmul(tl.zeros([BB, BP], tl.float32), dGates + xrows * H, active, Whh, 0, P, pc,
                                      pmask, H, PREC, BK)
        dh = tl.where(active[:, None], dh_new, dh)
    tl.store(dH0 + rows[:, None] * P + pc[None, :], dh.to(dH0.dtype.element_ty), mask=inside & pmask[None, :])
    if CELL == 0:
        tl.store(dC0 + rows[:, None] * H + hc[None, :], dc.to(dC0.dtype.element_ty), mask=inside & hmask[None, :])


# ------------------------------------------------------------------------------------------------------------------
# Launch configurations (seqkernels.triton_report compiles each one the launchers can choose).


@dataclass(frozen=True)
class Config:
    BB: int  # rows (sequences) per program
    BH: int  # hidden columns per program (step kernels)
    BK: int  # reduction block (step kernels)
    num_warps: int


STEP_CONFIG = {False: Config(16, 64, 32, 4), True: Config(16, 32, 16, 4)}  # float32? (3xTF32 needs more registers)
ELEMENTWISE_CONFIG = Config(16, 64, 0, 4)
MATMUL_CONFIG = {False: (64, 64, 32, 4), True: (64, 64, 32, 4)}  # float32? -> (BM, BN, BK, num_warps)
PERSISTENT_BB = 16


@dataclass(frozen=True)
class PersistentConfig:
    resident: bool  # the recurrent weights loaded on chip once, not re-read each step
    num_warps: int
    num_stages: int
    BK: int = 16  # slices of the recurrent matmul when the weights are re-read each step


def persistent_config(kernel: str, gates: int, block_h: int, block_p: int, dtype: torch.dtype,
                      has_proj: bool) -> PersistentConfig:
    """The persistent kernel's ("fwd" or "bwd") variant for a layer. The weights are resident when they take at most
    RESIDENT_BYTES; the loads are then not software-pipelined (their buffers would not fit beside the weights).
    16-bit states wider than 64 take 16 warps, so that each warp holds a 1/16 slice of the gate columns; float32
    takes 8 (3xTF32 holds each operand twice). Each choice compiles without spills for sm_80 and sm_90, also with
    sizes that are not multiples of 16 (seqkernels.triton_report)."""
    size = dtype.itemsize
    weights = (gates * block_h * block_p + (block_h * block_p if has_proj else 0)) * size
    if weights <= RESIDENT_BYTES:
        if size == 4:
            return PersistentConfig(True, 8, 1)
        return PersistentConfig(True, 16 if max(block_h, block_p) > 64 else 4, 1)
    if size == 2:
        return PersistentConfig(False, 8, 3)
    return PersistentConfig(False, 8 if kernel == "fwd" else 16, 1)


def dim_block(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def use_persistent(hidden: int, proj: int, dtype: torch.dtype, has_proj: bool) -> bool:
    """Whether the persistent kernels take this layer. float32 with a projection past a padded hidden size of 64
    (3xTF32 operands of W_hh slices and W_hr at once) spills registers: those layers run step by step."""
    if has_proj and dtype == torch.float32 and dim_block(hidden) > 64:
        return False
    return hidden <= PERSISTENT_MAX and proj <= PERSISTENT_MAX


def supports(input, *rest) -> List[str]:
    return dtype_reasons(input.dtype)


# ------------------------------------------------------------------------------------------------------------------
# Launchers


def matmul(a: Tensor, b: Tensor, out: Tensor, bias: Optional[Tensor] = None, accumulate: bool = False) -> Tensor:
    """out (+)= a @ b (+ bias), strided views welcome."""
    M, K = a.shape
    N = b.shape[1]
    if M == 0 or N == 0:
        return out
    if K == 0:
        if not accumulate:
            out.zero_()
        return out
    BM, BN, BK, warps = MATMUL_CONFIG[b.dtype == torch.float32]
    launch(_matmul_kernel, (triton.cdiv(M, BM), triton.cdiv(N, BN)),
           a, b, out, bias if bias is not None else b, M, N, K, *a.stride(), *b.stride(), *out.stride(),
           HAS_BIAS=bias is not None, ACCUMULATE=accumulate, PREC=precision(b.dtype), BM=BM, BN=BN, BK=BK,
           num_warps=warps)
    return out


def _step_fwd(cell, x, w_ih, xp, h_prev, h0, w_hh, b_ih, b_hh, cx, cy, out, gates, n_rows, n_prev, x_row0, hp_row0,
              out_row0, save):
    H, P = w_hh.shape[0] // (4 if cell == LSTM else 1), w_hh.shape[1]
    I = w_ih.shape[1] if w_ih is not None else 0
    cfg = STEP_CONFIG[w_hh.dtype == torch.float32]
    any_t = w_hh
    launch(_step_fwd_kernel, (triton.cdiv(n_rows, cfg.BB), triton.cdiv(H, cfg.BH)),
           x if x is not None else any_t, w_ih if w_ih is not None else any_t, xp if xp is not None else any_t,
           h_prev, h0, w_hh, b_ih if b_ih is not None else any_t, b_hh if b_hh is not None else any_t,
           cx if cx is not None else any_t, cy if cy is not None else any_t, out,
           gates if gates is not None else any_t, n_rows, n_prev, x_row0, hp_row0, out_row0, I, H, P,
           CELL=cell, HAS_INPUT=x is not None, HAS_XP=xp is not None, HAS_BIAS=b_ih is not None, SAVE=save,
           PREC=precision(w_hh.dtype), BB=cfg.BB, BH=cfg.BH, BK=cfg.BK, num_warps=cfg.num_warps)


def _step_bwd(cell, dh, dout, gates, c0, out, dc, dgates, dcx, n_rows, n_prev, row0, cp_row0, dout_row0, H):
    cfg = ELEMENTWISE_CONFIG
    any_t = dgates
    launch(_step_bwd_kernel, (triton.cdiv(n_rows, cfg.BB), triton.cdiv(H, cfg.BH)),
           dh, dout if dout is not None else any_t, gates if gates is not None else any_t,
           c0 if c0 is not None else any_t, out if out is not None else any_t, dc if dc is not None else any_t, dgates,
           dcx if dcx is not None else any_t, n_rows, n_prev, row0, cp_row0, dout_row0, H,
           CELL=cell, HAS_DOUT=dout is not None, BB=cfg.BB, BH=cfg.BH, num_warps=cfg.num_warps)


def _weight_grads(dgates: Tensor, x: Tensor, h_prev: Tensor, w_ih: Tensor, w_hh: Tensor, with_grad_h: bool = True):
    """(grad input, grad h_prev or None, grad W_ih, grad W_hh, grad bias) from the gate gradients (rows, G*H) of
    rows whose inputs are x and previous states h_prev."""
    d = dgates.to(w_ih.dtype) if w_ih.dtype != torch.float32 else dgates
    grad_x = matmul(d, w_ih, torch.empty_like(x))
    grad_h = matmul(d, w_hh, torch.empty_like(h_prev)) if with_grad_h else None
    grad_w_ih = matmul(d.t(), x, torch.empty_like(w_ih))
    grad_w_hh = matmul(d.t(), h_prev, torch.empty_like(w_hh))
    return grad_x, grad_h, grad_w_ih, grad_w_hh, dgates.sum(0).to(w_ih.dtype)


# Cell steps --------------------------------------------------------------------------------------------------------


@torch.library.custom_op("seqkernels_triton::lstm_cell_fwd", mutates_args=())
def lstm_cell_fwd(input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                  b_hh: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    B, H = hx.shape
    hy, cy = torch.empty_like(hx), torch.empty_like(cx)
    gates = input.new_empty(B, 5 * H, dtype=torch.float32)
    if B:
        _step_fwd(LSTM, input.contiguous(), w_ih.contiguous(), None, hx.contiguous(), hx, w_hh.contiguous(), b_ih,
                  b_hh, cx.contiguous(), cy, hy, gates, B, B, 0, 0, 0, True)
    return hy, cy, gates


@lstm_cell_fwd.register_fake
def _(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return torch.empty_like(hx), torch.empty_like(cx), input.new_empty(hx.shape[0], 5 * hx.shape[1],
                                                                        dtype=torch.float32)


@torch.library.custom_op("seqkernels_triton::lstm_cell_bwd", mutates_args=())
def lstm_cell_bwd(grad_hy: Tensor, grad_cy: Tensor, input: Tensor, hx: Tensor, cx: Tensor, w_ih: Tensor,
                  w_hh: Tensor, cy: Tensor, gates: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, H = hx.shape
    dgates = input.new_empty(B, 4 * H, dtype=torch.float32)
    grad_cx = torch.empty_like(cx)
    if B:
        _step_bwd(LSTM, grad_hy.contiguous(), None, gates, cx.contiguous(), None, grad_cy.contiguous(),
                  dgates, grad_cx, B, 0, 0, 0, 0, H)
    grad_x, grad_hx, grad_w_ih, grad_w_hh, grad_b = _weight_grads(dgates, input, hx, w_ih, w_hh)
    return grad_x, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_b


@lstm_cell_bwd.register_fake
def _(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates):
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(cx), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty(w_ih.shape[0]))


@torch.library.custom_op("seqkernels_triton::rnn_cell_fwd", mutates_args=())
def rnn_cell_fwd(input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                 b_hh: Optional[Tensor], nonlinearity: str) -> Tensor:
    B = hx.shape[0]
    hy = torch.empty_like(hx)
    if B:
        _step_fwd(CELLS[nonlinearity], input.contiguous(), w_ih.contiguous(), None, hx.contiguous(), hx,
                  w_hh.contiguous(), b_ih, b_hh, None, None, hy, None, B, B, 0, 0, 0, False)
    return hy


@rnn_cell_fwd.register_fake
def _(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    return torch.empty_like(hx)


@torch.library.custom_op("seqkernels_triton::rnn_cell_bwd", mutates_args=())
def rnn_cell_bwd(grad_hy: Tensor, input: Tensor, hx: Tensor, w_ih: Tensor, w_hh: Tensor, hy: Tensor,
                 nonlinearity: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    B, H = hx.shape
    dgates = input.new_empty(B, H, dtype=torch.float32)
    if B:
        _step_bwd(CELLS[nonlinearity], grad_hy.contiguous(), None, None, None, hy.contiguous(), None, dgates,
                  None, B, 0, 0, 0, 0, H)
    return _weight_grads(dgates, input, hx, w_ih, w_hh)


@rnn_cell_bwd.register_fake
def _(grad_hy, input, hx, w_ih, w_hh, hy, nonlinearity):
    return (torch.empty_like(input), torch.empty_like(hx), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]))


# Whole sequences ---------------------------------------------------------------------------------------------------


def _layout(batch_sizes: Tensor, device):
    """Host lists of sizes and row offsets per step, and the same as int32 device tensors."""
    sizes = [int(n) for n in batch_sizes.tolist()]
    offsets = [0] * len(sizes)
    for t in range(1, len(sizes)):
        offsets[t] = offsets[t - 1] + sizes[t - 1]
    on_device = torch.tensor([sizes, offsets], dtype=torch.int32).to(device)
    return sizes, offsets, on_device[0], on_device[1]


def _previous(sizes, offsets, t, reverse):
    """(rows available from the previous step, their first row) for step t."""
    tp = t + 1 if reverse else t - 1
    if 0 <= tp < len(sizes):
        return sizes[tp], offsets[tp]
    return 0, 0


def _last_rows(sizes, offsets, B, reverse, device) -> Tensor:
    """For each sequence, the packed row of its last step in this direction (forward: its own last step)."""
    if reverse:
        return torch.arange(B, device=device)
    sizes_t, offsets_t = torch.tensor(sizes), torch.tensor(offsets)
    seqs = torch.arange(B)
    lengths = (sizes_t[None, :] > seqs[:, None]).sum(1)  # sizes are non-increasing: sequence b runs lengths[b] steps
    return (offsets_t[lengths - 1] + seqs).to(device)


def _h_prev_rows(sizes, offsets, N, reverse, device) -> Tensor:
    """For each packed row, the row of [output; h0] holding its h_prev (N + b: sequence b's initial state)."""
    T = len(sizes)
    sizes_t, offsets_t = torch.tensor(sizes), torch.tensor(offsets)
    step = torch.repeat_interleave(torch.arange(T), sizes_t)  # each row's time step
    seq = torch.arange(N) - offsets_t[step]  # each row's sequence
    prev = step + 1 if reverse else step - 1
    has_prev = (prev >= 0) & (prev < T)
    prev = prev.clamp(0, T - 1)
    from_prev = has_prev & (seq < sizes_t[prev])
    return torch.where(from_prev, offsets_t[prev] + seq, N + seq).to(device)


def _seq_fwd(cell, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train):
    N = input.shape[0]
    G = 4 if cell == LSTM else 1
    H = w_hh.shape[0] // G
    P = w_hh.shape[1]
    B = h0.shape[0]
    device = input.device
    out = input.new_empty(N, P)
    h_n = torch.empty_like(h0)
    c_n = torch.empty_like(c0) if cell == LSTM else None
    gates = input.new_empty(N if (train and cell == LSTM) else 0, 5 * H, dtype=torch.float32)
    if N == 0:
        h_n.copy_(h0)
        if c_n is not None:
            c_n.copy_(c0)
        return out, h_n, c_n, gates
    sizes, offsets, sizes_d, offsets_d = _layout(batch_sizes, device)
    bias = (b_ih.float() + b_hh.float()) if b_ih is not None else None
    xp = matmul(input, w_ih.t(), input.new_empty(N, G * H, dtype=torch.float32), bias)
    w_hh = w_hh.contiguous()
    h0, c0 = h0.contiguous(), (c0.contiguous() if c0 is not None else None)
    if use_persistent(H, P, w_hh.dtype, w_hr is not None):
        BH, BP = dim_block(H), dim_block(P)
        cfg = persistent_config("fwd", G, BH, BP, w_hh.dtype, w_hr is not None)
        launch(_seq_fwd_kernel, (triton.cdiv(B, PERSISTENT_BB),),
               xp, h0, c0 if c0 is not None else h0, w_hh, w_hr.contiguous() if w_hr is not None else w_hh, out, h_n,
               c_n if c_n is not None else h_n, gates, sizes_d, offsets_d, len(sizes), B, H, P,
               CELL=cell, HAS_PROJ=w_hr is not None, REVERSE=reverse, SAVE=bool(gates.shape[0]),
               RESIDENT=cfg.resident, PREC=precision(w_hh.dtype), BB=PERSISTENT_BB, BH=BH, BP=BP, BK=cfg.BK,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        return out, h_n, c_n, gates
    c_state = c0.to(torch.float32, copy=True) if cell == LSTM else None
    r = input.new_empty(N, H) if w_hr is not None else out  # o * tanh(c) before the projection
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    for t in steps:
        n, off = sizes[t], offsets[t]
        n_prev, off_prev = _previous(sizes, offsets, t, reverse)
        _step_fwd(cell, None, None, xp, out, h0, w_hh, None, None, c_state, c_state, r, gates if gates.shape[0] else None,
                  n, n_prev, off, off_prev, off, bool(gates.shape[0]))
        if w_hr is not None:
            matmul(r[off:off + n], w_hr.t(), out[off:off + n])
    h_n.copy_(out[_last_rows(sizes, offsets, B, reverse, device)])
    if c_n is not None:
        c_n.copy_(c_state)
    return out, h_n, c_n, gates


def _seq_bwd(cell, grad_out, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, reverse):
    N = input.shape[0]
    G = 4 if cell == LSTM else 1
    H = w_hh.shape[0] // G
    P = w_hh.shape[1]
    B = h0.shape[0]
    device = input.device
    grad_out = grad_out.contiguous()
    dgates = input.new_empty(N, G * H, dtype=torch.float32)
    dht = input.new_empty(N if w_hr is not None else 0, P, dtype=torch.float32)
    grad_h0 = torch.empty_like(h0)
    grad_c0 = torch.empty_like(c0) if cell == LSTM else None
    sizes, offsets, sizes_d, offsets_d = _layout(batch_sizes, device)
    w_hh = w_hh.contiguous()
    c0c = c0.contiguous() if c0 is not None else None
    if N == 0:
        grad_h0.copy_(grad_hn)
        if grad_c0 is not None:
            grad_c0.copy_(grad_cn)
    elif use_persistent(H, P, w_hh.dtype, w_hr is not None):
        BH, BP = dim_block(H), dim_block(P)
        cfg = persistent_config("bwd", G, BH, BP, w_hh.dtype, w_hr is not None)
        launch(_seq_bwd_kernel, (triton.cdiv(B, PERSISTENT_BB),),
               grad_out, grad_hn.contiguous(), grad_cn.contiguous() if grad_cn is not None else grad_hn, gates, out,
               c0c if c0c is not None else h0, w_hh, w_hr.contiguous() if w_hr is not None else w_hh, dgates, dht,
               grad_h0, grad_c0 if grad_c0 is not None else grad_h0, sizes_d, offsets_d, len(sizes), B, H, P,
               CELL=cell, HAS_PROJ=w_hr is not None, REVERSE=reverse,
               RESIDENT=cfg.resident, PREC=precision(w_hh.dtype), BB=PERSISTENT_BB, BH=BH, BP=BP, BK=cfg.BK,
               num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        dh = grad_hn.to(torch.float32, copy=True)
        dc = grad_cn.to(torch.float32, copy=True) if cell == LSTM else None
        w_dh = w_hh if w_hh.dtype == torch.float32 else w_hh.float()
        steps = range(len(sizes)) if reverse else range(len(sizes) - 1, -1, -1)
        for t in steps:
            n, off = sizes[t], offsets[t]
            n_prev, off_prev = _previous(sizes, offsets, t, reverse)
            if w_hr is not None:
                torch.add(dh[:n], grad_out[off:off + n], out=dht[off:off + n])
                dr = matmul(dht[off:off + n], w_hr.float(), dh.new_empty(n, H))
                _step_bwd(cell, dr, None, gates, c0c, out, dc, dgates, dc, n, n_prev, off, off_prev, 0, H)
            else:
                _step_bwd(cell, dh, grad_out, gates, c0c, out, dc, dgates, dc, n, n_prev, off, off_prev, off, H)
            matmul(dgates[off:off + n], w_dh, dh[:n])
        grad_h0.copy_(dh)
        if grad_c0 is not None:
            grad_c0.copy_(dc)
    h_prev = torch.cat([out, h0])[_h_prev_rows(sizes, offsets, N, reverse, device)]
    grad_input, _, grad_w_ih, grad_w_hh, grad_bias = _weight_grads(dgates, input, h_prev, w_ih, w_hh, False)
    grad_w_hr = None
    if w_hr is not None:
        r = (gates[:, 3 * H:4 * H] * torch.tanh(gates[:, 4 * H:])).to(w_hr.dtype)
        d_out = dht.to(w_hr.dtype) if w_hr.dtype != torch.float32 else dht
        grad_w_hr = matmul(d_out.t(), r, torch.empty_like(w_hr))
    return grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr


# The ops of the sequence Functions (function.py), with the C++ ops' signatures.


@torch.library.custom_op("seqkernels_triton::lstm_seq_fwd", mutates_args=())
def lstm_seq_fwd(input: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                 b_ih: Optional[Tensor], b_hh: Optional[Tensor], w_hr: Optional[Tensor], reverse: bool,
                 train: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out, h_n, c_n, gates = _seq_fwd(LSTM, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train)
    return out, h_n, c_n, gates, gates.new_empty(0)  # the gates rows hold c' too: nothing else to save


@lstm_seq_fwd.register_fake
def _(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train):
    N, H, P = input.shape[0], w_hh.shape[0] // 4, w_hh.shape[1]
    gates = input.new_empty(N if train else 0, 5 * H, dtype=torch.float32)
    return input.new_empty(N, P), torch.empty_like(h0), torch.empty_like(c0), gates, gates.new_empty(0)


@torch.library.custom_op("seqkernels_triton::lstm_seq_bwd", mutates_args=())
def lstm_seq_bwd(grad_output: Tensor, grad_hn: Tensor, grad_cn: Tensor, input: Tensor, batch_sizes: Tensor, h0: Tensor,
                 c0: Tensor, w_ih: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], output: Tensor, gates: Tensor,
                 cells: Tensor, reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _seq_bwd(LSTM, grad_output, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output,
                     gates, reverse)
    return (*grads[:6], grads[6] if grads[6] is not None else input.new_empty(0, 0))


@lstm_seq_bwd.register_fake
def _(grad_output, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, reverse):
    return (torch.empty_like(input), torch.empty_like(h0), torch.empty_like(c0), torch.empty_like(w_ih),
            torch.empty_like(w_hh), w_ih.new_empty(w_ih.shape[0]),
            torch.empty_like(w_hr) if w_hr is not None else input.new_empty(0, 0))


@torch.library.custom_op("seqkernels_triton::rnn_seq_fwd", mutates_args=())
def rnn_seq_fwd(input: Tensor, batch_sizes: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                b_hh: Optional[Tensor], nonlinearity: str, reverse: bool) -> Tuple[Tensor, Tensor]:
    out, h_n, _, _ = _seq_fwd(CELLS[nonlinearity], input, batch_sizes, h0, None, w_ih, w_hh, b_ih, b_hh, None,
                              reverse, False)
    return out, h_n


@rnn_seq_fwd.register_fake
def _(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse):
    return input.new_empty(input.shape[0], w_hh.shape[0]), torch.empty_like(h0)


@torch.library.custom_op("seqkernels_triton::rnn_seq_bwd", mutates_args=())
def rnn_seq_bwd(grad_output: Tensor, grad_hn: Tensor, input: Tensor, batch_sizes: Tensor, h0: Tensor, w_ih: Tensor,
                w_hh: Tensor, output: Tensor, nonlinearity: str,
                reverse: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _seq_bwd(CELLS[nonlinearity], grad_output, grad_hn, None, input, batch_sizes, h0, None, w_ih, w_hh, None,
                     output, output.new_empty(0, 5 * w_hh.shape[0], dtype=torch.float32), reverse)
    grad_input, grad_h0, _, grad_w_ih, grad_w_hh, grad_bias, _ = grads
    return grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias


@rnn_seq_bwd.register_fake
def _(grad_output, grad_hn, input, batch_sizes, h0, w_ih, w_hh, output, nonlinearity, reverse):
    return (torch.empty_like(input), torch.empty_like(h0), torch.empty_like(w_ih), torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]))


def report_cases():
    """Launcher calls reaching every configuration the launchers choose (see seqkernels.triton_report): each dtype,
    LSTM (with and without a projection) and RNN, cell steps, and sequences on the persistent kernels (weights
    resident or re-read) and on the step-by-step path, forward and backward."""
    def sequence(kind, dtype, hidden, proj):
        def run():
            G = 4 if kind == "lstm" else 1
            P = proj or hidden
            batch_sizes = torch.tensor([3, 2])
            x = torch.zeros(5, 32, dtype=dtype)
            h0, c0 = torch.zeros(3, P, dtype=dtype), torch.zeros(3, hidden, dtype=dtype)
            w_ih, w_hh = torch.zeros(G * hidden, 32, dtype=dtype), torch.zeros(G * hidden, P, dtype=dtype)
            b = torch.zeros(G * hidden, dtype=dtype)
            w_hr = torch.zeros(proj, hidden, dtype=dtype) if proj else None
            if kind == "lstm":
                out, h_n, c_n, gates, cells = lstm_seq_fwd(x, batch_sizes, h0, c0, w_ih, w_hh, b, b, w_hr, False, True)
                lstm_seq_bwd(out, h_n, c_n, x, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, False)
                hy, cy, cell_gates = lstm_cell_fwd(x[:3], h0, c0, w_ih, w_hh, b, b) if not proj else (None,) * 3
                if hy is not None:
                    lstm_cell_bwd(hy, cy, x[:3], h0, c0, w_ih, w_hh, cy, cell_gates)
            else:
                out, h_n = rnn_seq_fwd(x, batch_sizes, h0, w_ih, w_hh, b, b, kind, False)
                rnn_seq_bwd(out, h_n, x, batch_sizes, h0, w_ih, w_hh, out, kind, False)
                hy = rnn_cell_fwd(x[:3], h0, w_ih, w_hh, b, b, kind)
                rnn_cell_bwd(hy, x[:3], h0, w_ih, w_hh, hy, kind)
        return run

    for dtype in DTYPES:
        for hidden, proj in ((32, None), (64, None), (128, None), (100, 64), (128, 128), (256, None), (256, 128)):
            yield sequence("lstm", dtype, hidden, proj)
        for hidden in (64, 128, 256):
            yield sequence("tanh", dtype, hidden, None)
