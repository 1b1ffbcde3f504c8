"""Scaled-dot-product attention: the C++ kernel against the reference and torch, outputs and every gradient
(query, key, value, float mask), on shapes that reach every code path."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import seqkernels
from seqkernels import _ext
from seqkernels.ops.attention import cpu, function, reference

from conftest import assert_close64, assert_error_rule, num_threads

# (query batch shape, key/value batch shape, L, S, E, Ev, enable_gqa): partial tiles (48 queries by 96 keys in the
# float32 forward and 144 in its backward, by 48 and 72 in float64) of 1, 2 and 3 vectors of queries, L or S = 1,
# L != S both ways, head dims 8, 24, 80, 128 and Ev != E, 3-D / 4-D / 5-D inputs, grouped-query attention, and
# heads broadcast without enable_gqa.
SHAPES = [
    ((2, 3), (2, 3), 100, 70, 24, 40, False),
    ((1, 2), (1, 2), 130, 130, 64, 64, False),
    ((2,), (2,), 1, 65, 8, 8, False),
    ((1, 1), (1, 1), 77, 1, 80, 16, False),
    ((2, 2, 2), (2, 2, 2), 33, 47, 128, 128, False),
    ((1, 4), (1, 2), 70, 90, 24, 24, True),
    ((2, 6), (2, 1), 20, 30, 16, 8, True),
    ((2, 3), (2, 1), 40, 50, 8, 8, False),
    ((1, 2), (1, 2), 60, 200, 32, 32, False),
    ((2, 2), (2, 2), 150, 300, 16, 48, False),
]


def make(qb, kb, L, S, E, Ev, dtype):
    q = torch.randn(*qb, L, E, dtype=torch.float64)
    k = torch.randn(*kb, S, E, dtype=torch.float64)
    v = torch.randn(*kb, S, Ev, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def masks(qb, L, S, dtype):
    """Every mask shape: (L, S), (1, S) key padding, (B, 1, L, S), (B, H, L, S), (B, 1, 1, S), bool and float,
    with a fully masked row in the bool ones."""
    heads = qb[-1]
    batch = qb[:-1]
    out = {}
    b = torch.rand(L, S) > 0.3
    b[min(1, L - 1)] = False  # a row that sees no key
    out["bool-LS"] = b
    out["bool-keypad"] = torch.rand(1, S) > 0.2
    out["bool-BHLS"] = torch.rand(*batch, heads, L, S) > 0.5
    out["float-LS"] = torch.randn(L, S, dtype=torch.float64).to(dtype)
    out["float-B1LS"] = torch.randn(*batch, 1, L, S, dtype=torch.float64).to(dtype)
    out["float-B11S"] = torch.randn(*batch, 1, 1, S, dtype=torch.float64).to(dtype)
    return out


def run(fn, q, k, v, mask, causal, gqa, upstream):
    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    out = fn(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    return [out] + list(torch.autograd.grad(out, leaves, upstream.to(out.dtype)))


def ours(q, k, v, **kw):
    with seqkernels.use_backend("cpu"):
        return seqkernels.scaled_dot_product_attention(q, k, v, **kw)


def error_rule(name, ours, theirs, exact, inputs):
    assert_error_rule(name, ours, theirs, exact)


def compare(qb, kb, L, S, E, Ev, gqa, dtype, mask_name=None, causal=False, fn=ours, rule=error_rule,
            theirs_fn=F.scaled_dot_product_attention):
    """fn (a backend's attention) against the float64 reference and torch (theirs_fn) in the same dtype: every
    result by ``rule(name, ours, torch's, exact, (q, k, v, upstream))``, or to 1e-12 in float64."""
    q, k, v = make(qb, kb, L, S, E, Ev, dtype)
    mask = masks(qb, L, S, dtype)[mask_name] if mask_name else None
    if mask is not None and mask.is_floating_point():
        mask.requires_grad_()
    upstream = torch.randn(*qb, L, Ev, dtype=torch.float64)
    q64, k64, v64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    m64 = None if mask is None else (mask.detach().double().requires_grad_() if mask.is_floating_point() else mask)
    got = run(fn, q, k, v, mask, causal, gqa, upstream)
    exact = run(reference.scaled_dot_product_attention, q64, k64, v64, m64, causal, gqa, upstream)
    names = ["out", "grad query", "grad key", "grad value", "grad mask"]
    assert len(got) == len(exact)
    for a, b in zip(got, exact):
        assert not torch.isnan(a).any()
    if dtype == torch.float64:
        for n, a, b in zip(names, got, exact):
            assert_close64(n, a, b, tol=1e-12)
        return
    theirs = run(theirs_fn, q, k, v, mask, causal, gqa, upstream)  # torch, same dtype
    for n, a, b, c in zip(names, got, theirs, exact):
        assert a.dtype == dtype
        rule(n, a, b, c, (q, k, v, upstream))


@pytest.mark.parametrize("qb, kb, L, S, E, Ev, gqa", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_against_reference_and_torch(qb, kb, L, S, E, Ev, gqa, causal, dtype):
    compare(qb, kb, L, S, E, Ev, gqa, dtype, causal=causal)


@pytest.mark.parametrize("mask_name", ["bool-LS", "bool-keypad", "bool-BHLS", "float-LS", "float-B1LS", "float-B11S"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[4], SHAPES[5]])
def test_masks(mask_name, dtype, shape):
    compare(*shape, dtype, mask_name=mask_name)


def kernel_with_causal_and_mask(q, k, v, attn_mask, is_causal, enable_gqa):
    """The CPU kernel given a mask and is_causal together (MultiheadAttention may pass both; the public function
    refuses them, as torch's)."""
    assert _ext.load(), _ext.error()
    return function._run_kernels(cpu, q, k, v, attn_mask, 0.0, is_causal, None, enable_gqa)


def torch_with_causal_folded_into_the_mask(q, k, v, attn_mask, is_causal, enable_gqa):
    keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    mask = attn_mask & keep if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~keep, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


@pytest.mark.parametrize("mask_name", ["bool-LS", "bool-keypad", "bool-BHLS", "float-LS", "float-B1LS", "float-B11S"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[5]])
def test_masks_with_causal(mask_name, dtype, shape):
    compare(*shape, dtype, mask_name=mask_name, causal=True, fn=kernel_with_causal_and_mask,
            theirs_fn=torch_with_causal_folded_into_the_mask)


def check_fully_masked_rows(fn):
    """A row that a bool mask or a -inf float mask hides completely gives 0 output and 0 gradient, never NaN."""
    q, k, v = make((1, 2), (1, 2), 10, 12, 8, 8, torch.float32)
    mask = torch.ones(10, 12, dtype=torch.bool)
    mask[3] = False
    fmask = torch.zeros(10, 12)
    fmask[5] = float("-inf")
    for m, row in ((mask, 3), (fmask, 5)):
        out = fn(q, k, v, attn_mask=m)
        assert torch.equal(out[..., row, :], torch.zeros_like(out[..., row, :]))
        g, = torch.autograd.grad(out.sum(), q)
        assert not torch.isnan(g).any() and torch.equal(g[..., row, :], torch.zeros_like(g[..., row, :]))


def test_fully_masked_rows_give_zero_output_and_gradient():
    check_fully_masked_rows(ours)


@pytest.mark.parametrize("Ev", [8, 64, 100, 130])
def test_single_key_gives_exactly_zero_query_and_key_gradients(Ev):
    """With one key every probability is exactly 1, so dS = P * (dP - rowsum(dO * O)) must be exactly 0: the
    backward's rowsum has to be summed in the order of dP's matmul (value head dims across panels of 64)."""
    q, k, v = make((2, 3), (2, 3), 40, 1, 24, Ev, torch.float32)
    out = ours(q, k, v)
    gq, gk = torch.autograd.grad(out, (q, k), torch.randn_like(out))
    assert torch.equal(gq, torch.zeros_like(gq)) and torch.equal(gk, torch.zeros_like(gk))


@pytest.mark.parametrize("causal, mask", [(False, None), (True, None), (False, "float")])
def test_gradcheck(causal, mask):
    q, k, v = make((1, 2), (1, 2), 5, 7, 3, 4, torch.float64)
    leaves = [q, k, v]
    if mask:
        leaves.append(torch.randn(5, 7, dtype=torch.float64, requires_grad=True))

    def fn(q, k, v, *m):
        return ours(q, k, v, attn_mask=m[0] if m else None, is_causal=causal)

    assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck():
    seqkernels.available_backends()
    q, k, v = [t.detach() for t in make((2, 3), (2, 3), 9, 11, 8, 6, torch.float32)]
    mask = torch.randn(1, 1, 9, 11).expand(2, 3, 9, 11)
    ops = torch.ops.seqkernels
    for m in (None, mask):
        torch.library.opcheck(ops.sdpa_fwd.default, (q, k, v, m, False, 0.3, 0.0, 0))
    torch.library.opcheck(ops.sdpa_fwd.default, (q, k, v, None, True, 0.3, 0.2, 7))
    out, lse = ops.sdpa_fwd(q, k, v, mask, False, 0.3, 0.2, 7)
    torch.library.opcheck(ops.sdpa_bwd.default,
                          (torch.randn_like(out), q, k, v, mask, out, lse, False, 0.3, 0.2, 7, True))
    torch.library.opcheck(ops.sdpa_bwd.default,
                          (torch.randn_like(out), q, k, v, None, out, lse, True, 0.3, 0.0, 0, False))


def test_compiles_without_graph_breaks():
    q, k, v = [t.detach() for t in make((2, 3), (2, 3), 9, 11, 8, 6, torch.float32)]

    def fn(q, k, v):
        return seqkernels.scaled_dot_product_attention(q, k, v, is_causal=True).relu()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


def test_scale_and_results_are_deterministic():
    q, k, v = [t.detach() for t in make((2, 3), (2, 3), 70, 90, 16, 16, torch.float32)]
    a = ours(q, k, v, scale=0.7)
    b = ours(q, k, v, scale=0.7)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, F.scaled_dot_product_attention(q, k, v, scale=0.7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape, causal, mask_name", [
    (SHAPES[0], False, None), (SHAPES[1], True, None), (SHAPES[5], False, "float-B1LS"), (SHAPES[4], False, "bool-LS"),
])
def test_dropout_matches_the_reference_with_the_same_seed(dtype, shape, causal, mask_name):
    """Kernel and reference draw the same dropout for the same torch seed: outputs and gradients compared."""
    qb, kb, L, S, E, Ev, gqa = shape
    q, k, v = make(qb, kb, L, S, E, Ev, dtype)
    mask = masks(qb, L, S, dtype)[mask_name] if mask_name else None
    upstream = torch.randn(*qb, L, Ev, dtype=torch.float64)
    results = []
    for backend in ("cpu", "reference"):
        torch.manual_seed(11)
        with seqkernels.use_backend(backend):
            out = seqkernels.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.25, is_causal=causal,
                                                          enable_gqa=gqa)
        results.append([out] + list(torch.autograd.grad(out, (q, k, v), upstream.to(dtype))))
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_dropout_gradcheck():
    q, k, v = make((1, 2), (1, 2), 6, 9, 3, 4, torch.float64)

    def fn(q, k, v):
        torch.manual_seed(3)  # the same dropout in every evaluation
        return ours(q, k, v, dropout_p=0.4)

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_dropout_is_seeded_unbiased_and_keeps_1_minus_p():
    q, k, v = [t.detach() for t in make((2, 4), (2, 4), 64, 96, 16, 16, torch.float64)]
    torch.manual_seed(5)
    a = ours(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(a, ours(q, k, v, dropout_p=0.3))  # torch.manual_seed reproduces it
    assert not torch.equal(a, ours(q, k, v, dropout_p=0.3))  # a new draw otherwise
    keep = reference.dropout_keep(123, (2, 4, 64, 96), 0.3)
    assert abs(keep.double().mean().item() - 0.7) < 0.01
    plain = ours(q, k, v)
    mean = sum(ours(q, k, v, dropout_p=0.3) for _ in range(200)) / 200
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()  # unbiased: the mean approaches no dropout


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(attn_mask=torch.ones(4, 5, dtype=torch.bool), is_causal=True), r"attn_mask to be None when is_causal"),
        (dict(dropout_p=1.0), r"dropout_p in \[0, 1\), got 1.0"),
        (dict(dropout_p=-0.1), r"dropout_p in \[0, 1\), got -0.1"),
        (dict(attn_mask=torch.ones(3, 5, dtype=torch.bool)), r"attn_mask to broadcast to \(2, 3, 4, 5\)"),
        (dict(attn_mask=torch.ones(4, 5, dtype=torch.int32)), r"attn_mask to be bool or of query's dtype"),
        (dict(attn_mask=torch.ones(4, 5, dtype=torch.float64)), r"attn_mask to be bool or of query's dtype"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 6)
    with pytest.raises(ValueError, match=match):
        seqkernels.scaled_dot_product_attention(q, k, v, **kwargs)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 3, 4, 8), (2, 3, 5, 7), (2, 3, 5, 6)), r"key's last dim to equal query's \(E = 8\), got 7"),
        (((2, 3, 4, 8), (2, 3, 5, 8), (2, 3, 6, 6)), r"value to have key's sequence length \(S = 5\), got 6"),
        (((2, 3, 4, 8), (2, 2, 5, 8), (2, 2, 5, 6)), r"heads \(3, 2, 2\) do not broadcast"),
        (((2, 3, 4, 8), (3, 3, 5, 8), (3, 3, 5, 6)), r"batch dims of query \(2,\), key \(3,\)"),
    ],
)
def test_bad_shapes(shapes, match):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        seqkernels.scaled_dot_product_attention(q, k, v)


def test_bad_gqa_and_dtypes():
    q, k, v = torch.randn(2, 6, 4, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    with pytest.raises(ValueError, match=r"enable_gqa, expected key and value heads to be equal and to divide"):
        seqkernels.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with pytest.raises(ValueError, match=r"expected key to have the dtype of query"):
        seqkernels.scaled_dot_product_attention(q, k.double(), v)


@pytest.mark.parametrize("threads", [1, 8])
def test_both_backward_schedules(threads):
    """The backward runs one task per key/value head when there are at least 2 per thread, else two passes over
    tiles; 4 heads with 1 thread take the first, with 8 threads the second."""
    with num_threads(threads):
        compare((2, 2), (2, 2), 70, 100, 16, 24, False, torch.float64, mask_name="float-B1LS")
        compare((1, 4), (1, 4), 70, 100, 16, 24, False, torch.float64, causal=True)
