"""The Triton LSTM/RNN kernels, run by Triton's interpreter on CPU tensors (conftest sets TRITON_INTERPRET=1):
cell steps and whole-sequence layers against the float64 reference with the error rule, on every path (the
persistent kernel with the recurrent weights resident or re-read each step, the step-by-step kernels for hidden
sizes past PERSISTENT_MAX, projections, both directions, packed lengths like [7, 5, 5, 2, 1, 1], length 1,
batch 1), and the modules against torch.nn."""
from __future__ import annotations

import pytest
import torch

import seqkernels

from conftest import assert_error_rule
from test_layers import call, compare_layer, make_layer
from test_modules import build, flatten_outputs, make_inputs

import triton  # noqa: E402,F401  (a listed dependency: a missing triton fails these tests, never skips them)

# (lengths, input_size, hidden_size, proj_size). Recurrent weights up to 128 KiB are resident (float32 LSTM: a
# padded hidden size of 64; 40 pads to 64, 100 to 128); 130 runs step by step. test_cases_reach_every_path checks
# which case takes which path.
CASES = [
    ([1], 3, 5, 0),
    ([7, 5, 5, 2, 1, 1], 6, 20, 0),
    ([7, 5, 5, 2, 1, 1], 6, 40, 0),
    ([4, 4, 3], 5, 40, 24),
    ([5, 3, 3, 1], 6, 100, 0),
    ([4, 2, 1], 5, 130, 0),
    ([3, 3, 1], 5, 130, 70),
]
KINDS = [("lstm", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
LAYER_CASES = [(k, nl, *case) for k, nl in KINDS for case in CASES if k == "lstm" or not case[3]]


@pytest.mark.parametrize("kind, nonlinearity, lengths, I, H, P", LAYER_CASES)
@pytest.mark.parametrize("reverse", [False, True])
def test_layer_float32(kind, nonlinearity, lengths, I, H, P, reverse):
    compare_layer(kind, nonlinearity, lengths, I, H, P, reverse, torch.float32, "triton")


# 16-bit weights: hidden 100 alone (128 KiB) is resident; with a projection to 70 (160 KiB) they are re-read.
HALF_CASES = [LAYER_CASES[i] for i in (1, 3, 4, 5, 6)] + [("lstm", "tanh", [4, 2, 1], 5, 100, 70),
                                                          ("rnn", "tanh", [7, 5, 5, 2, 1, 1], 6, 20, 0)]


def path(kind, H, P, dtype):
    """Which recurrence path the Triton sequence launchers take for a layer."""
    from seqkernels.ops.lstm import triton as kernels

    width = P or H
    if not kernels.use_persistent(H, width, dtype, bool(P)):
        return "step by step"
    cfg = kernels.persistent_config("fwd", 4 if kind == "lstm" else 1, kernels.dim_block(H), kernels.dim_block(width),
                                    dtype, bool(P))
    return "persistent, resident" if cfg.resident else "persistent, re-read"


def test_cases_reach_every_path():
    every = {"step by step", "persistent, resident", "persistent, re-read"}
    assert {path(k, H, P, torch.float32) for k, _, _, _, H, P in LAYER_CASES} == every
    for dtype in (torch.bfloat16, torch.float16):
        assert {path(k, H, P, dtype) for k, _, _, _, H, P in HALF_CASES} == every


@pytest.mark.parametrize("kind, nonlinearity, lengths, I, H, P", HALF_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_layer_half_types(kind, nonlinearity, lengths, I, H, P, dtype):
    compare_layer(kind, nonlinearity, lengths, I, H, P, True, dtype, "triton")


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("B, I, H", [(1, 3, 5), (5, 20, 40), (3, 6, 70)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cell_step(kind, B, I, H, bias, dtype):
    G = 4 if kind == "lstm" else 1
    x64 = [torch.randn(B, I), torch.randn(B, H), torch.randn(B, H), torch.randn(G * H, I) * I**-0.5,
           torch.randn(G * H, H) * H**-0.5, torch.randn(G * H) * 0.5, torch.randn(G * H) * 0.5]
    x64 = [t.double() for t in x64]
    if kind != "lstm":
        del x64[2]
    if not bias:
        x64 = x64[:-2]

    def run(tensors, backend):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        args = leaves + [None] * (2 - (len(leaves) - (5 if kind == "lstm" else 4)))
        with seqkernels.use_backend(backend):
            if kind == "lstm":
                x, h, c, w_ih, w_hh, b_ih, b_hh = args
                outs = list(seqkernels.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh))
            else:
                x, h, w_ih, w_hh, b_ih, b_hh = args
                outs = [seqkernels.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, kind)]
        torch.manual_seed(3)
        ups = [torch.randn(o.shape, dtype=torch.float64).to(o.dtype) for o in outs]
        return outs + list(torch.autograd.grad(outs, leaves, ups))

    inputs = [t.to(dtype) for t in x64]
    ours = run(inputs, "triton")
    plain = run(inputs, "reference")
    exact = run([t.double() for t in inputs], "reference")  # the same (rounded) inputs, evaluated in float64
    for i, (a, b, c) in enumerate(zip(ours, plain, exact)):
        assert a.dtype == dtype
        assert_error_rule(f"result {i}", a, b, c)


@pytest.mark.parametrize("kind, flags", [
    ("LSTM", (2, True, False, True, 3)),
    ("LSTM", (1, False, True, False, 0)),
    ("RNN", (2, True, True, True, "relu")),
])
@pytest.mark.parametrize("mode", ["batched", "packed"])
def test_modules_match_torch(kind, flags, mode):
    ref, ours = build(kind, flags, torch.float32)
    args, leaves = make_inputs(ref, mode, True, torch.float32)
    outs_r = flatten_outputs(ref(*args))
    with seqkernels.use_backend("triton"):
        outs_o = flatten_outputs(ours(*args))
    upstream = [torch.randn_like(o) for o in outs_r]
    g_r = torch.autograd.grad(outs_r, leaves + list(ref.parameters()), upstream, retain_graph=True)
    g_o = torch.autograd.grad(outs_o, leaves + list(ours.parameters()), upstream)
    for a, b in zip(outs_o + list(g_o), outs_r + list(g_r)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layer_compiles_without_graph_breaks():
    args, bs = make_layer("lstm", [4, 3, 1], 3, 8, 0, torch.float32)
    args = [a.detach() if a is not None else None for a in args]

    def fn(*args):
        return call("lstm", args, bs, False)[0].relu()

    with seqkernels.use_backend("triton"):
        expected = fn(*args)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(*args), expected)


def test_opcheck():
    from seqkernels.ops.lstm import triton as kernels

    args, bs = make_layer("lstm", [3, 2, 1], 4, 6, 0, torch.float32)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, _ = [a.detach() for a in args[:7]] + [None]
    torch.library.opcheck(kernels.lstm_seq_fwd, (x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True))
    out, h_n, c_n, gates, cells = kernels.lstm_seq_fwd(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True)
    torch.library.opcheck(kernels.lstm_seq_bwd,
                          (torch.randn_like(out), h_n, c_n, x, bs, h0, c0, w_ih, w_hh, None, out, gates, cells, False))
    torch.library.opcheck(kernels.lstm_cell_fwd, (x[:3], h0, c0, w_ih, w_hh, b_ih, b_hh))


def test_float64_is_refused_with_a_reason():
    args, bs = make_layer("lstm", [2], 3, 4, 0, torch.float64)
    with pytest.raises(seqkernels.BackendError, match=r"float16, bfloat16 and float32, got torch.float64"):
        with seqkernels.use_backend("triton"):
            call("lstm", args, bs, False)
