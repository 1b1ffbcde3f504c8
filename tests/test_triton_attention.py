"""The Triton attention kernels, run by Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1):
output and every gradient against the float64 reference and torch's own function in the same dtype, on shapes that
reach every code path (partial tiles, L or S = 1, the causal diagonal both ways, each mask shape, fully masked rows,
GQA, head dims 8 to 256 including 40 and 72, value dim != query dim), and dropout against the reference given the
kernels' own keep mask."""
from __future__ import annotations

import math

import pytest
import torch

import seqkernels
from seqkernels.ops.attention import reference

from conftest import assert_error_rule
import test_attention
from test_attention import make, masks

import triton  # noqa: E402,F401  (a listed dependency: a missing triton fails these tests, never skips them)

# (query batch, key/value batch, L, S, E, Ev, enable_gqa). The kernels' tiles are 16 to 128 rows: lengths like 70,
# 130 and 1 leave partial tiles; head dims pad to powers of two.
SHAPES = [
    ((1, 2), (1, 2), 130, 70, 24, 40, False),
    ((2, 1), (2, 1), 70, 130, 64, 64, False),
    ((1, 2), (1, 2), 1, 33, 8, 8, False),
    ((1, 1), (1, 1), 33, 1, 72, 16, False),
    ((1, 1, 2), (1, 1, 2), 20, 37, 128, 128, False),
    ((1, 4), (1, 2), 40, 50, 40, 40, True),
    ((2, 6), (2, 1), 9, 17, 16, 8, True),
    ((1, 3), (1, 1), 12, 20, 8, 8, False),
    ((1, 1), (1, 1), 20, 24, 256, 200, False),
    ((1, 2), (1, 1), 37, 45, 256, 24, True),
]
WIDE = SHAPES[-1]  # head dim 256 with a narrow value head: float32 reads q k^T and dO v^T in head-dim chunks
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def triton_sdpa(q, k, v, **kw):
    with seqkernels.use_backend("triton"):
        return seqkernels.scaled_dot_product_attention(q, k, v, **kw)


def compare(qb, kb, L, S, E, Ev, gqa, dtype, mask_name=None, causal=False):
    def rule(name, ours, theirs, exact, inputs):
        if name == "grad key" and S == 1:
            # One key: its probability is 1 whatever the scores, so dK = scale * sum_i (dP_i - delta_i) q_i is zero
            # exactly, and what remains is the rounding of dP - delta (two sums of Ev products dO * V): bound it
            # by a few units of rounding of those sums, times |q| and the number of rows.
            q, _, v, upstream = inputs
            terms = Ev * upstream.abs().max() * v.detach().double().abs().max() * q.detach().double().abs().max()
            bound = 8 * torch.finfo(dtype).eps * terms.item() * L / math.sqrt(E)
            assert ours.double().abs().max().item() <= bound, f"grad key with S = 1: {ours.abs().max()} > {bound}"
            return
        assert_error_rule(name, ours, theirs, exact)

    test_attention.compare(qb, kb, L, S, E, Ev, gqa, dtype, mask_name, causal, fn=triton_sdpa, rule=rule)


@pytest.mark.parametrize("qb, kb, L, S, E, Ev, gqa", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_against_reference_and_torch(qb, kb, L, S, E, Ev, gqa, causal, dtype):
    compare(qb, kb, L, S, E, Ev, gqa, dtype, causal=causal)


@pytest.mark.parametrize("mask_name", ["bool-LS", "bool-keypad", "bool-BHLS", "float-LS", "float-B1LS", "float-B11S"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5], WIDE])
def test_masks(mask_name, dtype, shape):
    compare(*shape, dtype, mask_name=mask_name)


def test_fully_masked_rows_give_zero_output_and_gradient():
    test_attention.check_fully_masked_rows(triton_sdpa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape, causal, mask_name", [
    (SHAPES[0], False, None), (SHAPES[1], True, None), (SHAPES[5], False, "float-B1LS"), (SHAPES[4], False, "bool-LS"),
    (WIDE, True, None), (WIDE, False, "float-B1LS"),
])
def test_dropout_against_the_reference_with_the_kernels_mask(dtype, shape, causal, mask_name):
    """The kernels' Philox keep mask, written out by their own generator, given to the reference: output and
    gradients (the backward regenerates the forward's mask)."""
    from seqkernels.ops.attention import triton as kernels

    qb, kb, L, S, E, Ev, gqa = shape
    q, k, v = make(qb, kb, L, S, E, Ev, dtype)
    mask = masks(qb, L, S, dtype)[mask_name] if mask_name else None
    upstream = torch.randn(*qb, L, Ev, dtype=torch.float64)
    p = 0.25
    torch.manual_seed(11)
    out = triton_sdpa(q, k, v, attn_mask=mask, dropout_p=p, is_causal=causal, enable_gqa=gqa)
    got = [out] + list(torch.autograd.grad(out, (q, k, v), upstream.to(dtype)))
    torch.manual_seed(11)
    seed = reference.draw_dropout_seed()
    Z, H = math.prod(qb[:-1]), qb[-1]
    keep = kernels.dropout_keep(seed, (Z, H, L, S), p, q.device).reshape(*qb, L, S)
    assert 0.6 < keep.double().mean().item() < 0.9
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = reference.scaled_dot_product_attention(q64, k64, v64, mask, p, causal, None, gqa, dropout_keep_mask=keep)
    exact = [ref] + list(torch.autograd.grad(ref, (q64, k64, v64), upstream))
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, a, b in zip(["out", "grad query", "grad key", "grad value"], got, exact):
        scale = max(1.0, b.abs().max().item())
        assert (a.double() - b).abs().max().item() <= tol * scale, name


def test_dropout_is_seeded_and_unbiased():
    q, k, v = [t.detach() for t in make((1, 2), (1, 2), 32, 48, 16, 16, torch.float32)]
    torch.manual_seed(5)
    a = triton_sdpa(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(a, triton_sdpa(q, k, v, dropout_p=0.3))  # torch.manual_seed reproduces it
    assert not torch.equal(a, triton_sdpa(q, k, v, dropout_p=0.3))  # a new draw otherwise
    plain = triton_sdpa(q, k, v)
    mean = sum(triton_sdpa(q, k, v, dropout_p=0.3) for _ in range(100)) / 100
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()  # unbiased: the mean approaches no dropout


def test_unsupported_calls_are_refused_with_reasons():
    q = torch.randn(1, 1, 4, 8, dtype=torch.float64)
    with pytest.raises(seqkernels.BackendError, match=r"float16, bfloat16 and float32, got torch.float64"):
        triton_sdpa(q, q, q)
    q = torch.randn(1, 1, 4, 272, dtype=torch.float16)
    with pytest.raises(seqkernels.BackendError, match=r"head dims up to 256, got 272 and 272"):
        triton_sdpa(q, q, q)
    q, v = torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 300)
    with pytest.raises(seqkernels.BackendError, match=r"head dims up to 256, got 8 and 300"):
        triton_sdpa(q, q, v)


def test_compiles_without_graph_breaks():
    q, k, v = [t.detach() for t in make((1, 2), (1, 2), 9, 11, 8, 6, torch.float32)]

    def fn(q, k, v):
        return seqkernels.scaled_dot_product_attention(q, k, v, is_causal=True).relu()

    with seqkernels.use_backend("triton"):
        expected = fn(q, k, v)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(q, k, v), expected)


def test_opcheck():
    from seqkernels.ops.attention import triton as kernels

    q, k, v = [t.detach() for t in make((2, 3), (2, 3), 9, 11, 8, 6, torch.float32)]
    mask = torch.randn(1, 1, 9, 11).expand(2, 3, 9, 11)
    torch.library.opcheck(kernels.sdpa_fwd, (q, k, v, mask, False, 0.3, 0.2, 7))
    out, lse = kernels.sdpa_fwd(q, k, v, mask, False, 0.3, 0.2, 7)
    torch.library.opcheck(kernels.sdpa_bwd, (torch.randn_like(out), q, k, v, mask, out, lse, False, 0.3, 0.2, 7, True))
