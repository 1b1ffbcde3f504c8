"""Flash attention in Triton (FlashAttention-2): kernels, launch configurations, launchers as custom ops.

Forward: one program per (query tile, batch x head) walks the key tiles with an online softmax in base 2 and
saves the log-sum-exp. Backward, without atomics (deterministic): a pass for delta = rowsum(dO * O), a pass with
one program per (key tile, batch x key/value head) that accumulates dK and dV over every query tile of every query
head of its group, and a pass with one program per (query tile, batch x head) that accumulates dQ and, for a float
mask that needs it, writes the mask gradient.

Everything ``seqkernels.scaled_dot_product_attention`` promises: top-left causal (key tiles above the diagonal are
not visited), bool and float masks read through their broadcast strides, grouped-query attention (query head h
reads key/value head h // group), dropout from Triton's Philox generator keyed by (seed, flat index in
(Z, H, L, S)) and regenerated in backward, any L and S (edges masked), head dims up to 256 (padded to a power of
two, masked), float16 / bfloat16 / float32 with float32 accumulation. float32 matmuls use 3xTF32, which keeps
float32 accuracy on tensor cores; as it holds each operand twice, float32 past a head dim of 128 reads the first
operand of q k^T and dO v^T from memory a few columns at a time (``_chunked_dot``) instead of keeping whole tiles
in registers.

Tensors are canonical (``function._canonical``): query (Z, H, L, E), key (Z, Hkv, S, E), value (Z, Hkv, S, Ev),
contiguous; the mask is any (Z, H, L, S) view.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..triton_common import DTYPES, dot, dtype_reasons, launch, precision

MAX_HEAD_DIM = 256

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


# ------------------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _scores(qk, offs_m, offs_n, L, S, mask_ptrs, qk_scale, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """Scores in base 2 (q k^T * scale * log2 e, plus the float mask * log2 e) for a (BM, BN) tile from the
    product q k^T: -inf where a key is out of range, above the causal diagonal, or masked out."""
    s = qk * qk_scale
    valid = (offs_n[None, :] < S) & (offs_m[:, None] < L)
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    if MASK_KIND == 1:
        valid = valid & (tl.load(mask_ptrs, mask=valid, other=0) != 0)
    if MASK_KIND == 2:
        s += tl.load(mask_ptrs, mask=valid, other=0.0).to(tl.float32) * 1.4426950408889634
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _chunked_dot(A, offs_a, sa, NA, B, offs_b, sb, NB, D,
                 BA: tl.constexpr, BB: tl.constexpr, BD: tl.constexpr, DK: tl.constexpr, PREC: tl.constexpr):
    """sum over d < D of A[a, d] * B[b, d] for rows offs_a of A and offs_b of B (row strides sa, sb; rows past NA,
    NB read as 0), loading DK columns at a time. Used where the whole (rows x head dim) first operand would not
    fit in registers (float32 past a head dim of 128: 3xTF32 holds each operand twice, and a tensor-core first
    operand is replicated in every warp)."""
    acc = tl.zeros([BA, BB], tl.float32)
    for c in range(0, BD, DK):
        offs_d = c + tl.arange(0, DK)
        a = tl.load(A + offs_a[:, None] * sa + offs_d[None, :], mask=(offs_a[:, None] < NA) & (offs_d[None, :] < D),
                    other=0.0)
        b = tl.load(B + offs_b[None, :] * sb + offs_d[:, None], mask=(offs_b[None, :] < NB) & (offs_d[:, None] < D),
                    other=0.0)
        acc += dot(a, b, PREC)
    return acc


@triton.jit
def _keep(seed, zh, query, key, p_drop):
    """Dropout's keep decision for a tile, from broadcastable 2-D query and key indices: a Philox uniform keyed by
    the seed, with the counter (key, query, batch x head, 0) - 32-bit words, which no length overflows."""
    bits, _, _, _ = tl.philox(seed, key + query * 0, query + key * 0, zh, 0)
    return tl.uint_to_uniform_float(bits) >= p_drop


@triton.jit
def _sdpa_fwd_kernel(
    Q, K, V, Mask, Out, Lse,
    sqz, sqh, sql, skz, skh, sks, svz, svh, svs, soz, soh, sol,
    smz, smh, sml, sms,
    H, L, S, E, EV, GROUP, qk_scale, p_drop, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DK: tl.constexpr,
):
    """Output and log-sum-exp of one query tile. DK = 0 keeps the query tile in registers; DK > 0 reads q and k
    DK head-dim columns at a time for q k^T (``_chunked_dot``)."""
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row = zh.to(tl.int64) * L + offs_m  # flat (z, h, i) index: dropout counters and the log-sum-exp
    q_base = Q + z * sqz + h * sqh
    if DK == 0:
        q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & (offs_d[None, :] < E), other=0.0)
    k_base = K + z * skz + hk * skh
    v_base = V + z * svz + hk * svh
    m_base = Mask + z * smz + h * smh + offs_m[:, None] * sml

    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BM)  # key tiles wholly above the diagonal are never visited
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        if DK == 0:
            k = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None],
                        mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
            qk = dot(q, k, PREC)
        else:
            qk = _chunked_dot(q_base, offs_m, sql, L, k_base, offs_n, sks, S, E, BM, BN, BD, DK, PREC)
        s = _scores(qk, offs_m, offs_n, L, S, m_base + offs_n[None, :] * sms, qk_scale, IS_CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(_keep(seed, zh, offs_m[:, None], offs_n[None, :], p_drop), p, 0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PREC)
        m_i = m_new

    seen = l_i > 0.0  # rows that see no key give 0, and an infinite log-sum-exp makes their backward 0
    inv = tl.where(seen, 1.0 / tl.where(seen, l_i, 1.0), 0.0)
    if DROPOUT:
        inv = inv / (1.0 - p_drop)
    out = acc * inv[:, None]
    tl.store(Out + z * soz + h * soh + offs_m[:, None] * sol + offs_dv[None, :], out.to(Out.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_dv[None, :] < EV))
    lse2 = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(Lse + row, lse2 * 0.6931471805599453, mask=offs_m < L)


@triton.jit
def _sdpa_bwd_delta_kernel(Out, dOut, Delta, soz, soh, sol, L, H, EV, BM: tl.constexpr, BDV: tl.constexpr):
    """delta = rowsum(dO * O) per query row, in float32."""
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_dv = tl.arange(0, BDV)
    inside = (offs_m[:, None] < L) & (offs_dv[None, :] < EV)
    ptrs = z * soz + h * soh + offs_m[:, None] * sol + offs_dv[None, :]
    o = tl.load(Out + ptrs, mask=inside, other=0.0).to(tl.float32)
    do = tl.load(dOut + ptrs, mask=inside, other=0.0).to(tl.float32)
    tl.store(Delta + zh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _sdpa_bwd_dkdv_kernel(
    Q, K, V, Mask, dOut, Lse, Delta, dK, dV,
    sqz, sqh, sql, skz, skh, sks, svz, svh, svs, soz, soh, sol,
    smz, smh, sml, sms,
    H, HKV, L, S, E, EV, GROUP, qk_scale, scale, p_drop, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DK: tl.constexpr, DKV: tl.constexpr,
):
    """dK and dV of one key tile, over every query tile of every query head that reads this key/value head.
    Works on transposed tiles (keys x queries) so that P^T and dS^T come out of the matmuls directly. DK = 0 keeps
    the k and v tiles in registers; DK > 0 reads k and q (v and dO: DKV) a few head-dim columns at a time for
    k q^T and v dO^T."""
    pid_n = tl.program_id(0)
    zhk = tl.program_id(1)
    z = zhk // HKV
    hk = zhk % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    k_base = K + z * skz + hk * skh
    v_base = V + z * svz + hk * svh
    if DK == 0:
        k = tl.load(k_base + offs_n[:, None] * sks + offs_d[None, :],
                    mask=(offs_n[:, None] < S) & (offs_d[None, :] < E), other=0.0)
        v = tl.load(v_base + offs_n[:, None] * svs + offs_dv[None, :],
                    mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV), other=0.0)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    lo = 0
    if IS_CAUSAL:
        lo = (pid_n * BN // BM) * BM  # query tiles wholly above the diagonal see none of these keys
    for g in range(0, GROUP):
        h = hk * GROUP + g
        zh = z * H + h
        q_base = Q + z * sqz + h * sqh
        o_base = dOut + z * soz + h * soh
        m_base = Mask + z * smz + h * smh + offs_n[:, None] * sms
        for start_m in range(lo, L, BM):
            offs_m = start_m + tl.arange(0, BM)
            row = zh.to(tl.int64) * L + offs_m
            qT = tl.load(q_base + offs_m[None, :] * sql + offs_d[:, None],
                         mask=(offs_m[None, :] < L) & (offs_d[:, None] < E), other=0.0)
            doT = tl.load(o_base + offs_m[None, :] * sol + offs_dv[:, None],
                          mask=(offs_m[None, :] < L) & (offs_dv[:, None] < EV), other=0.0)
            lse2 = tl.load(Lse + row, mask=offs_m < L, other=float("inf")) * 1.4426950408889634
            delta = tl.load(Delta + row, mask=offs_m < L, other=0.0)
            if DK == 0:
                kq = dot(k, qT, PREC)
            else:
                kq = _chunked_dot(k_base, offs_n, sks, S, q_base, offs_m, sql, L, E, BN, BM, BD, DK, PREC)
            # s^T (keys x queries): the same masking as _scores, transposed.
            sT = kq * qk_scale
            valid = (offs_n[:, None] < S) & (offs_m[None, :] < L)
            if IS_CAUSAL:
                valid = valid & (offs_n[:, None] <= offs_m[None, :])
            if MASK_KIND == 1:
                valid = valid & (tl.load(m_base + offs_m[None, :] * sml, mask=valid, other=0) != 0)
            if MASK_KIND == 2:
                sT += tl.load(m_base + offs_m[None, :] * sml, mask=valid, other=0.0).to(tl.float32) * 1.4426950408889634
            pT = tl.where(valid, tl.math.exp2(sT - lse2[None, :]), 0.0)
            if DK == 0:
                dpT = dot(v, doT, PREC)
            else:
                dpT = _chunked_dot(v_base, offs_n, svs, S, o_base, offs_m, sol, L, EV, BN, BM, BDV, DKV, PREC)
            if DROPOUT:
                keepT = _keep(seed, zh, offs_m[None, :], offs_n[:, None], p_drop)
                inv_keep = 1.0 / (1.0 - p_drop)
                pdT = tl.where(keepT, pT * inv_keep, 0.0)
                dpT = tl.where(keepT, dpT * inv_keep, 0.0)
            else:
                pdT = pT
            dv += dot(pdT.to(doT.dtype), tl.trans(doT), PREC)
            dsT = pT * (dpT - delta[None, :])
            dk += dot(dsT.to(qT.dtype), tl.trans(qT), PREC)
    tl.store(dK + z * skz + hk * skh + offs_n[:, None] * sks + offs_d[None, :], (dk * scale).to(dK.dtype.element_ty),
             mask=(offs_n[:, None] < S) & (offs_d[None, :] < E))
    tl.store(dV + z * svz + hk * svh + offs_n[:, None] * svs + offs_dv[None, :], dv.to(dV.dtype.element_ty),
             mask=(offs_n[:, None] < S) & (offs_dv[None, :] < EV))


@triton.jit
def _sdpa_bwd_dq_kernel(
    Q, K, V, Mask, dOut, Lse, Delta, dQ, dMask,
    sqz, sqh, sql, skz, skh, sks, svz, svh, svs, soz, soh, sol,
    smz, smh, sml, sms,
    H, L, S, E, EV, GROUP, qk_scale, scale, p_drop, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, MASK_GRAD: tl.constexpr,
    PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, DK: tl.constexpr,
    DKV: tl.constexpr,
):
    """dQ of one query tile over its key tiles; with MASK_GRAD, the float mask's gradient dS, written to a
    contiguous (Z, H, L, S) float32 tensor (tiles above the causal diagonal stay as allocated: zero). DK = 0 keeps
    the q and dO tiles in registers; DK > 0 reads them a few head-dim columns at a time (as the dK/dV pass)."""
    pid_m = tl.program_id(0)
    zh = tl.program_id(1)
    z = zh // H
    h = zh % H
    hk = h // GROUP
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row = zh.to(tl.int64) * L + offs_m
    q_base = Q + z * sqz + h * sqh
    o_base = dOut + z * soz + h * soh
    if DK == 0:
        q = tl.load(q_base + offs_m[:, None] * sql + offs_d[None, :],
                    mask=(offs_m[:, None] < L) & (offs_d[None, :] < E), other=0.0)
        do = tl.load(o_base + offs_m[:, None] * sol + offs_dv[None, :],
                     mask=(offs_m[:, None] < L) & (offs_dv[None, :] < EV), other=0.0)
    lse2 = tl.load(Lse + row, mask=offs_m < L, other=float("inf")) * 1.4426950408889634
    delta = tl.load(Delta + row, mask=offs_m < L, other=0.0)
    k_base = K + z * skz + hk * skh
    v_base = V + z * svz + hk * svh
    m_base = Mask + z * smz + h * smh + offs_m[:, None] * sml
    dq = tl.zeros([BM, BD], tl.float32)
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BM)
    for start_n in range(0, hi, BN):
        offs_n = start_n + tl.arange(0, BN)
        kT = tl.load(k_base + offs_n[None, :] * sks + offs_d[:, None],
                     mask=(offs_n[None, :] < S) & (offs_d[:, None] < E), other=0.0)
        if DK == 0:
            vT = tl.load(v_base + offs_n[None, :] * svs + offs_dv[:, None],
                         mask=(offs_n[None, :] < S) & (offs_dv[:, None] < EV), other=0.0)
            qk = dot(q, kT, PREC)
        else:
            qk = _chunked_dot(q_base, offs_m, sql, L, k_base, offs_n, sks, S, E, BM, BN, BD, DK, PREC)
        s = _scores(qk, offs_m, offs_n, L, S, m_base + offs_n[None, :] * sms, qk_scale, IS_CAUSAL, MASK_KIND)
        p = tl.math.exp2(s - lse2[:, None])
        if DK == 0:
            dp = dot(do, vT, PREC)
        else:
            dp = _chunked_dot(o_base, offs_m, sol, L, v_base, offs_n, svs, S, EV, BM, BN, BDV, DKV, PREC)
        if DROPOUT:
            dp = tl.where(_keep(seed, zh, offs_m[:, None], offs_n[None, :], p_drop), dp / (1.0 - p_drop), 0.0)
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(kT.dtype), tl.trans(kT), PREC)
        if MASK_GRAD:
            tl.store(dMask + row[:, None] * S + offs_n[None, :], ds,
                     mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))
    tl.store(dQ + z * sqz + h * sqh + offs_m[:, None] * sql + offs_d[None, :], (dq * scale).to(dQ.dtype.element_ty),
             mask=(offs_m[:, None] < L) & (offs_d[None, :] < E))


@triton.jit
def _dropout_keep_kernel(Keep, L, S, seed, p_drop, BM: tl.constexpr, BN: tl.constexpr):
    """The keep mask the attention kernels draw, written out (for tests and for reference comparisons)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    zh = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    row = zh.to(tl.int64) * L + offs_m
    keep = _keep(seed, zh, offs_m[:, None], offs_n[None, :], p_drop)
    tl.store(Keep + row[:, None] * S + offs_n[None, :], keep.to(tl.int8),
             mask=(offs_m[:, None] < L) & (offs_n[None, :] < S))


# ------------------------------------------------------------------------------------------------------------------
# Launch configurations: chosen from the padded head dim and the element size, nothing else, so that the compile
# report (seqkernels.triton_report) can build every configuration the launchers can pick.


@dataclass(frozen=True)
class Config:
    BM: int
    BN: int
    num_warps: int
    num_stages: int
    chunk: int = 0  # > 0: q k^T and dO v^T read the head dim this many columns at a time (_chunked_dot)

    def chunks(self, block_d: int, block_dv: int) -> dict:
        """The kernels' DK and DKV for these padded head dims (0: whole tiles in registers)."""
        return dict(DK=min(self.chunk, block_d), DKV=min(self.chunk, block_dv))


# Per kernel: (padded head dim, float32?, with mask or dropout?) -> configuration. Chosen, largest tiles first,
# as the first that compiles without spilling registers for both sm_80 and sm_90, both for the launches of the
# report cases and with every integer argument generic (sizes and strides that are not multiples of 16 make
# loads scalar, which costs registers); seqkernels.triton_report checks every entry both ways. Masks and dropout
# hold more per-element state, so they get their own entries.
CONFIGS: Dict[str, Dict[Tuple[int, bool, bool], Config]] = {
    "fwd": {
        (64, False, False): Config(128, 64, 8, 3),
        (64, False, True): Config(64, 32, 8, 2),
        (128, False, False): Config(128, 64, 8, 2),
        (128, False, True): Config(64, 32, 8, 2),
        (256, False, False): Config(64, 64, 8, 2),
        (256, False, True): Config(32, 64, 8, 2),
        (64, True, False): Config(64, 32, 8, 2),
        (64, True, True): Config(64, 16, 8, 2),
        (128, True, False): Config(32, 32, 4, 2),
        (128, True, True): Config(16, 32, 8, 1),
        (256, True, False): Config(32, 32, 8, 1, chunk=32),
        (256, True, True): Config(32, 32, 8, 1, chunk=32),
    },
    # dkdv: BN is the program's own key tile, BM the query tiles it walks.
    "dkdv": {
        (64, False, False): Config(64, 32, 8, 2),
        (64, False, True): Config(64, 16, 4, 2),
        (128, False, False): Config(64, 32, 8, 2),
        (128, False, True): Config(64, 16, 8, 2),
        (256, False, False): Config(64, 16, 8, 2),
        (256, False, True): Config(16, 16, 8, 1),
        (64, True, False): Config(32, 16, 8, 1),
        (64, True, True): Config(32, 16, 8, 1),
        (128, True, False): Config(16, 16, 8, 1),
        (128, True, True): Config(32, 16, 8, 1, chunk=32),
        (256, True, False): Config(16, 32, 8, 1, chunk=32),
        (256, True, True): Config(16, 16, 8, 1, chunk=32),
    },
    # dq: BM is the program's own query tile, BN the key tiles it walks.
    "dq": {
        (64, False, False): Config(32, 64, 8, 2),
        (64, False, True): Config(32, 64, 8, 2),
        (128, False, False): Config(32, 64, 8, 2),
        (128, False, True): Config(32, 64, 8, 2),
        (256, False, False): Config(16, 64, 8, 2),
        (256, False, True): Config(32, 16, 8, 1),
        (64, True, False): Config(32, 32, 4, 1),
        (64, True, True): Config(32, 32, 8, 1),
        (128, True, False): Config(16, 16, 4, 1),
        (128, True, True): Config(16, 16, 8, 2),
        (256, True, False): Config(32, 16, 8, 1, chunk=32),
        (256, True, True): Config(32, 16, 8, 1, chunk=32),
    },
}
DELTA_BLOCK_M = 16  # rows per program of the delta pass (32 spills at head dim 256 with generic strides)


def head_block(dim: int) -> int:
    """Head dims are padded to a power of two of at least 16 (tl.dot's smallest), masked on load and store."""
    return max(16, triton.next_power_of_2(dim))


def config(kernel: str, block_d: int, dtype: torch.dtype, heavy: bool) -> Config:
    """The launch configuration of ``kernel`` ("fwd", "dkdv", "dq") for a padded head dim (the larger of query's
    and value's), a dtype, and whether a mask or dropout is applied."""
    return CONFIGS[kernel][(max(64, block_d), dtype == torch.float32, heavy)]


def supports(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> List[str]:
    why = dtype_reasons(query.dtype)
    if query.shape[-1] > MAX_HEAD_DIM or value.shape[-1] > MAX_HEAD_DIM:
        why.append(f"the triton kernels take head dims up to {MAX_HEAD_DIM}, got {query.shape[-1]} and "
                   f"{value.shape[-1]}")
    return why


# ------------------------------------------------------------------------------------------------------------------
# Launchers, registered as custom ops so torch.compile traces through them (fake kernels below).


def _mask_args(mask: Optional[Tensor], like: Tensor):
    if mask is None:
        return like, MASK_NONE, (0, 0, 0, 0)
    return mask, (MASK_BOOL if mask.dtype == torch.bool else MASK_FLOAT), tuple(mask.stride())


def _shared_args(q, k, v, out, mask):
    mask_t, kind, mstrides = _mask_args(mask, q)
    strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *mstrides)
    return mask_t, kind, strides


@torch.library.custom_op("seqkernels_triton::sdpa_fwd", mutates_args=())
def sdpa_fwd(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], is_causal: bool, scale: float,
             dropout_p: float, seed: int) -> Tuple[Tensor, Tensor]:
    Z, H, L, E = query.shape
    HKV, S, EV = key.shape[1], key.shape[2], value.shape[3]
    out = query.new_empty(Z, H, L, EV)
    lse = query.new_empty(Z, H, L, dtype=torch.float32)
    if out.numel() == 0:
        return out.zero_(), lse.fill_(math.inf)
    BD, BDV = head_block(E), head_block(EV)
    mask_t, kind, strides = _shared_args(query, key, value, out, attn_mask)
    cfg = config("fwd", max(BD, BDV), query.dtype, kind != MASK_NONE or dropout_p > 0.0)
    grid = (triton.cdiv(L, cfg.BM), Z * H)
    launch(_sdpa_fwd_kernel, grid,
        query, key, value, mask_t, out, lse, *strides,
        H, L, S, E, EV, H // HKV, scale * LOG2E, dropout_p, seed,
        IS_CAUSAL=is_causal, MASK_KIND=kind, DROPOUT=dropout_p > 0.0, PREC=precision(query.dtype),
        BM=cfg.BM, BN=cfg.BN, BD=BD, BDV=BDV, DK=cfg.chunks(BD, BDV)["DK"], num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, lse


@sdpa_fwd.register_fake
def _(query, key, value, attn_mask, is_causal, scale, dropout_p, seed):
    Z, H, L, _ = query.shape
    return query.new_empty(Z, H, L, value.shape[-1]), query.new_empty(Z, H, L, dtype=torch.float32)


@torch.library.custom_op("seqkernels_triton::sdpa_bwd", mutates_args=())
def sdpa_bwd(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], out: Tensor,
             lse: Tensor, is_causal: bool, scale: float, dropout_p: float, seed: int,
             mask_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    Z, H, L, E = query.shape
    HKV, S, EV = key.shape[1], key.shape[2], value.shape[3]
    grad_out = grad_out.contiguous()
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    dmask = query.new_zeros((Z, H, L, S) if mask_grad else (0,), dtype=torch.float32)
    if query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    BD, BDV = head_block(E), head_block(EV)
    mask_t, kind, strides = _shared_args(query, key, value, grad_out, attn_mask)
    heavy = kind != MASK_NONE or dropout_p > 0.0
    flags = dict(IS_CAUSAL=is_causal, MASK_KIND=kind, DROPOUT=dropout_p > 0.0, PREC=precision(query.dtype), BD=BD,
                 BDV=BDV)
    delta = torch.empty(Z, H, L, dtype=torch.float32, device=query.device)
    launch(_sdpa_bwd_delta_kernel, (triton.cdiv(L, DELTA_BLOCK_M), Z * H),
        out.contiguous(), grad_out, delta, *grad_out.stride()[:3], L, H, EV, BM=DELTA_BLOCK_M, BDV=BDV,
    )
    cfg = config("dkdv", max(BD, BDV), query.dtype, heavy)
    launch(_sdpa_bwd_dkdv_kernel, (triton.cdiv(S, cfg.BN), Z * HKV),
        query, key, value, mask_t, grad_out, lse, delta, dk, dv, *strides,
        H, HKV, L, S, E, EV, H // HKV, scale * LOG2E, scale, dropout_p, seed, **flags,
        BM=cfg.BM, BN=cfg.BN, **cfg.chunks(BD, BDV), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    cfg = config("dq", max(BD, BDV), query.dtype, heavy)
    launch(_sdpa_bwd_dq_kernel, (triton.cdiv(L, cfg.BM), Z * H),
        query, key, value, mask_t, grad_out, lse, delta, dq, dmask, *strides,
        H, L, S, E, EV, H // HKV, scale * LOG2E, scale, dropout_p, seed, MASK_GRAD=mask_grad, **flags,
        BM=cfg.BM, BN=cfg.BN, **cfg.chunks(BD, BDV), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return dq, dk, dv, dmask


@sdpa_bwd.register_fake
def _(grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, dropout_p, seed, mask_grad):
    Z, H, L, _ = query.shape
    dmask = query.new_empty((Z, H, L, key.shape[2]) if mask_grad else (0,), dtype=torch.float32)
    return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dmask


def dropout_keep(seed: int, shape: Tuple[int, int, int, int], p: float, device) -> Tensor:
    """Which entries of the (Z, H, L, S) probabilities the Triton kernels keep for this seed (bool tensor)."""
    Z, H, L, S = shape
    keep = torch.empty(Z, H, L, S, dtype=torch.int8, device=device)
    if keep.numel():
        launch(_dropout_keep_kernel, (triton.cdiv(L, 64), triton.cdiv(S, 64), Z * H), keep, L, S, seed, p, BM=64, BN=64)
    return keep.bool()


def report_cases():
    """Launcher calls reaching every configuration the launchers choose (see seqkernels.triton_report): each
    padded head dim and dtype, plain and with every feature at once (causal, float mask with its gradient,
    dropout), plus a bool mask."""
    def case(dtype, dim, causal, mask_kind, dropout_p):
        def run():
            q = torch.zeros(1, 2, 40, dim, dtype=dtype)
            kv = torch.zeros(1, 1, 48, dim, dtype=dtype)
            mask = None
            if mask_kind == MASK_FLOAT:
                mask = torch.zeros(1, 1, 40, 48, dtype=dtype).expand(1, 2, 40, 48)
            elif mask_kind == MASK_BOOL:
                mask = torch.ones(40, 48, dtype=torch.bool).expand(1, 2, 40, 48)
            out, lse = sdpa_fwd(q, kv, kv, mask, causal, 0.125, dropout_p, 1)
            sdpa_bwd(out, q, kv, kv, mask, out, lse, causal, 0.125, dropout_p, 1, mask_kind == MASK_FLOAT)
        return run

    for dtype in DTYPES:
        for dim in (64, 128, 256):
            yield case(dtype, dim, False, MASK_NONE, 0.0)
            yield case(dtype, dim, True, MASK_FLOAT, 0.1)
            yield case(dtype, dim, False, MASK_BOOL, 0.0)
