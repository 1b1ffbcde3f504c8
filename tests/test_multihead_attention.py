"""seqkernels.nn.MultiheadAttention against torch.nn.MultiheadAttention: outputs, attention weights and every
gradient (inputs and parameters), for every constructor flag and forward option."""
from __future__ import annotations

import itertools

import pytest
import torch

import seqkernels

E, H, L, S, B = 16, 4, 6, 9, 3
CONFIGS = [
    dict(bias=b, add_bias_kv=kv, add_zero_attn=z, batch_first=bf, kdim=kd, vdim=vd)
    for b, kv, z, bf, (kd, vd) in itertools.product([True, False], [False, True], [False, True], [False, True],
                                                     [(None, None), (5, 7)])
]


def inputs(cfg, batched, dtype):
    kd, vd = cfg["kdim"] or E, cfg["vdim"] or E
    shape = (lambda n, d: (B, n, d) if cfg["batch_first"] else (n, B, d)) if batched else (lambda n, d: (n, d))
    return [torch.randn(*shape(n, d), dtype=dtype, requires_grad=True) for n, d in ((L, E), (S, kd), (S, vd))]


def masks(kind, batched, dtype):
    kpm, am = None, None
    if "kpm" in kind:
        kpm = torch.rand(B, S) > 0.7 if batched else torch.rand(S) > 0.7
        kpm[..., 0] = False  # every row keeps a key
        if "float" in kind:
            kpm = torch.zeros(kpm.shape, dtype=dtype).masked_fill(kpm, float("-inf"))
    if "attn2d" in kind:
        am = torch.randn(L, S, dtype=dtype)
    if "attn3d" in kind:
        am = torch.rand(B * H if batched else H, L, S) > 0.6
        am[..., 0] = False
    return kpm, am


def run(module, args, kw, upstream):
    out, weights = module(*args, **kw)
    outs = [out] + ([weights] if weights is not None else [])
    grads = torch.autograd.grad(outs, list(args) + list(module.parameters()), [u[: o.numel()].view_as(o).to(o.dtype) for u, o in zip(upstream, outs)])
    return outs, grads


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("need_weights, average", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batched", [True, False])
def test_matches_torch(cfg, need_weights, average, batched):
    dtype = torch.float64
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, dtype=dtype, **cfg)
    ours = seqkernels.nn.MultiheadAttention.from_torch(ref)
    for kind in ("none", "kpm-bool", "kpm-float+attn2d", "attn3d"):
        args = inputs(cfg, batched, dtype)
        kpm, am = masks(kind, batched, dtype)
        kw = dict(key_padding_mask=kpm, attn_mask=am, need_weights=need_weights, average_attn_weights=average)
        upstream = [torch.randn(10_000, dtype=torch.float64) for _ in range(2)]
        (o_r, g_r), (o_o, g_o) = run(ref, args, kw, upstream), run(ours, args, kw, upstream)
        assert len(o_r) == len(o_o)
        for a, b in zip(o_o + list(g_o), o_r + list(g_r)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("need_weights", [False, True])
def test_causal_hint_float32(need_weights):
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, batch_first=True)
    ours = seqkernels.nn.MultiheadAttention.from_torch(ref)
    x = torch.randn(B, L, E)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(L)
    a = ref(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    b = ours(x, x, x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="is_causal needs attn_mask"):
        ours(x, x, x, is_causal=True)


def test_dropout_in_training_is_seeded_and_off_in_eval():
    m = seqkernels.nn.MultiheadAttention(E, H, dropout=0.5)
    x = torch.randn(L, B, E)
    torch.manual_seed(1)
    a = m(x, x, x, need_weights=False)[0]
    torch.manual_seed(1)
    assert torch.equal(a, m(x, x, x, need_weights=False)[0])
    m.eval()
    ref = torch.nn.MultiheadAttention(E, H, dropout=0.5).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x, x, x)[0], ref(x, x, x)[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, m(x, x, x, need_weights=False)[0])


def test_bad_input_reads_as_torch():
    m = seqkernels.nn.MultiheadAttention(E, H)
    x = torch.randn(L, B, E)
    with pytest.raises(ValueError, match=r"expected key to have query's batch size \(3\), got 4"):
        m(x, torch.randn(S, B + 1, E), torch.randn(S, B + 1, E))
    with pytest.raises(RuntimeError, match=r"The shape of the 2D attn_mask is .* but should be \(6, 6\)"):
        m(x, x, x, attn_mask=torch.zeros(5, 6))
