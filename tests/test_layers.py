"""Whole-sequence layer ops (one layer, one direction, packed rows): the C++ kernels against the reference,
the reference against torch.nn, gradcheck, opcheck, reproducibility and bad input."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import seqkernels
from seqkernels.ops.lstm import lstm_layer, reference, rnn_layer

from conftest import assert_close64, assert_error_rule, num_threads

# (lengths, input_size, hidden_size, proj_size): length-1 sequences, batch 1, the issue's [7, 5, 5, 2, 1, 1],
# hidden sizes that split across threads with a partial vector at the end (40 = 32 + 8), projections whose
# columns are split too, a step too small to thread, and ragged sequences of 199 rows: the forward computes its
# input projection in chunks of 128 rows, so this one takes two chunks of different steps in each direction.
# Sequences of one length in a batch of 17 split the batch between threads instead (row groups of 8 and 9 rows
# with two threads, each over all 40 units), whose input projections take 16 and 14 steps a chunk: two chunks in
# each direction over 20 steps.
CASES = [
    ([1], 3, 5, 0),
    ([4, 4, 4], 3, 5, 2),
    ([7, 5, 5, 2, 1, 1], 6, 40, 0),
    ([7, 5, 5, 2, 1, 1], 6, 40, 24),
    ([9], 8, 64, 0),
    ([12, 12, 12, 12, 12, 12, 12, 12], 16, 48, 0),
    ([6, 3, 3, 1], 5, 33, 17),
    ([60, 50, 50, 31, 7, 1], 6, 40, 0),
    ([60, 50, 50, 31, 7, 1], 6, 40, 24),
    ([20] * 17, 6, 40, 0),
]


def batch_sizes_of(lengths):
    T = max(lengths)
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(T)], dtype=torch.int64)


def make_layer(kind, lengths, I, H, P, dtype, bias=True, noncontiguous=False):
    """(args for the layer op minus batch_sizes and flags, batch_sizes)"""
    bs = batch_sizes_of(lengths)
    N, B = int(bs.sum()), len(lengths)
    gates = 4 if kind == "lstm" else 1
    Pout = P or H

    def t(*shape, scale=1.0):
        if noncontiguous and len(shape) == 2:
            x = torch.randn(shape[1], shape[0], dtype=torch.float64).t()
        else:
            x = torch.randn(*shape, dtype=torch.float64)
        return (x * scale).to(dtype).requires_grad_()

    # Weights scaled like torch's initialization (~ 1 / sqrt(fan_in)): larger ones make the recurrence chaotic,
    # where rounding is amplified without bound and no float32 result is meaningfully closer than another.
    args = [t(N, I), t(B, Pout)] + ([t(B, H)] if kind == "lstm" else [])
    args += [t(gates * H, I, scale=I**-0.5), t(gates * H, Pout, scale=Pout**-0.5)]
    args += [t(gates * H, scale=0.5), t(gates * H, scale=0.5)] if bias else [None, None]
    if kind == "lstm":
        args.append(t(P, H, scale=H**-0.5) if P else None)
    return args, bs


def call(kind, args, bs, reverse, nonlinearity="tanh"):
    if kind == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
        return lstm_layer(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    x, h0, w_ih, w_hh, b_ih, b_hh = args
    return rnn_layer(x, bs, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)


def outputs_and_grads(kind, args, bs, reverse, backend, upstream, nonlinearity="tanh"):
    with seqkernels.use_backend(backend):
        outs = call(kind, args, bs, reverse, nonlinearity)
    leaves = [a for a in args if a is not None]
    gs = torch.autograd.grad(outs, leaves, [u.to(o.dtype) for u, o in zip(upstream, outs)])
    return outs, gs


KINDS = [("lstm", "tanh"), ("rnn", "tanh"), ("rnn", "relu")]
# Projections exist for the LSTM only.
LAYER_CASES = [(k, nl, *case) for k, nl in KINDS for case in CASES if k == "lstm" or not case[3]]


@pytest.mark.parametrize("kind, nonlinearity, lengths, I, H, P", LAYER_CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_cpu_layer_matches_reference(kind, nonlinearity, lengths, I, H, P, reverse, dtype):
    compare_layer(kind, nonlinearity, lengths, I, H, P, reverse, dtype, "cpu")


def compare_layer(kind, nonlinearity, lengths, I, H, P, reverse, dtype, backend):
    """A backend's layer against the float64 reference: to 1e-9 in float64, else by the error rule against the
    reference's torch ops in the same dtype; outputs and every gradient."""
    args, bs = make_layer(kind, lengths, I, H, P, dtype, noncontiguous=(H % 2 == 1))
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    N, B, Pout = int(bs.sum()), len(lengths), P or H
    upstream = [torch.randn(N, Pout, dtype=torch.float64), torch.randn(B, Pout, dtype=torch.float64)]
    if kind == "lstm":
        upstream.append(torch.randn(B, H, dtype=torch.float64))
    ours = outputs_and_grads(kind, args, bs, reverse, backend, upstream, nonlinearity)
    exact = outputs_and_grads(kind, args64, bs, reverse, "reference", upstream, nonlinearity)
    assert len(ours[0] + ours[1]) == len(exact[0] + exact[1])
    if dtype == torch.float64:
        for i, (a, b) in enumerate(zip(ours[0] + ours[1], exact[0] + exact[1])):
            assert_close64(f"result {i}", a, b, tol=1e-9)
        return
    plain = outputs_and_grads(kind, args, bs, reverse, "reference", upstream, nonlinearity)  # torch ops, same dtype
    for i, (a, b, c) in enumerate(zip(ours[0] + ours[1], plain[0] + plain[1], exact[0] + exact[1])):
        assert a.dtype == dtype
        assert_error_rule(f"result {i}", a, b, c)


# The float forward's batch-in-lanes path: sequences of one length, a batch that fills its 16-lane vectors to at
# least 7/8, and a thread's slices of W_ih and W_hh larger than its L2 cache, so input sizes are large enough
# (3.5 MiB or more per thread with two threads) to exceed a 2 MiB L2. Batches of one vector (16), two with idle
# lanes (30) and three (48, a two-vector and a one-vector tile); projection chunks of 4, 2 and 8 steps, so every
# case takes several; hidden sizes that split into tiles of 3 LSTM units with 1-unit remainders, of 12, 4 and 1
# RNN units (203: 91 = 7 * 12 + 4 + 3 * 1 with two threads), and (200, 203) into thread slices that are not whole
# 16 x 16 transposes; an odd hidden size also makes the inputs non-contiguous.
LANES_CASES = [
    ("lstm", "tanh", [9] * 30, 1800, 256),
    ("lstm", "tanh", [3] * 48, 2200, 200),
    ("lstm", "tanh", [17] * 16, 1800, 256),
    ("rnn", "tanh", [9] * 30, 8000, 256),
    ("rnn", "relu", [3] * 48, 8200, 203),
]


@pytest.mark.parametrize("kind, nonlinearity, lengths, I, H", LANES_CASES)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("threads", [None, 1])
def test_cpu_layer_batch_in_lanes(kind, nonlinearity, lengths, I, H, reverse, dtype, threads):
    with num_threads(threads):
        compare_layer(kind, nonlinearity, lengths, I, H, 0, reverse, dtype, "cpu")


@pytest.mark.parametrize("kind, nonlinearity, P", [("lstm", "tanh", 0), ("lstm", "tanh", 3), ("rnn", "tanh", 0), ("rnn", "relu", 0)])
@pytest.mark.parametrize("reverse", [False, True])
def test_cpu_layer_gradcheck(kind, nonlinearity, reverse, P):
    args, bs = make_layer(kind, [4, 3, 3, 1], 3, 5, P, torch.float64)
    if nonlinearity == "relu":
        with torch.no_grad():
            for a in args:
                a.abs_()  # pre-activations positive: away from relu's kink
    mask = [a is not None for a in args]
    leaves = [a for a in args if a is not None]

    def fn(*leaves):
        it = iter(leaves)
        full = [next(it) if m else None for m in mask]
        with seqkernels.use_backend("cpu"):
            return call(kind, full, bs, reverse, nonlinearity)

    assert torch.autograd.gradcheck(fn, leaves)


def test_reference_layer_matches_torch_lstm_on_packed_sequences():
    """The oracle itself: a single-layer bidirectional torch.nn.LSTM with projection on a PackedSequence."""
    lengths = [7, 5, 5, 2, 1, 1]
    m = torch.nn.LSTM(4, 6, bidirectional=True, proj_size=3, dtype=torch.float64)
    x = torch.randn(7, len(lengths), 4, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths))
    out, (h_n, c_n) = m(packed)
    bs = packed.batch_sizes
    h0 = torch.zeros(len(lengths), 3, dtype=torch.float64)
    c0 = torch.zeros(len(lengths), 6, dtype=torch.float64)
    for d, sfx in enumerate(["", "_reverse"]):
        w = [getattr(m, f"{n}_l0{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")]
        o, h, c = reference.lstm_layer(packed.data, bs, h0, c0, *w, reverse=bool(d))
        assert_close64("output", o, out.data[:, 3 * d : 3 * d + 3])
        assert_close64("h_n", h, h_n[d])
        assert_close64("c_n", c, c_n[d])


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("batch", [8, 17])  # 17: row groups (see CASES)
def test_results_are_reproducible_and_thread_count_independent(kind, batch):
    args, bs = make_layer(kind, [30] * batch, 32, 64, 0, torch.float32)
    args = [a.detach() if a is not None else None for a in args]
    with torch.no_grad(), seqkernels.use_backend("cpu"):
        first = call(kind, args, bs, False)
        again = call(kind, args, bs, False)
        with num_threads(1):
            single = call(kind, args, bs, False)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b)  # bitwise, run to run
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)  # any thread count: same up to rounding


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
@pytest.mark.parametrize("threads", [None, 1])
def test_batch_in_lanes_is_bitwise_reproducible(kind, threads):
    """Run to run, at each thread count (across thread counts, test_cpu_layer_batch_in_lanes holds both to the
    float64 reference)."""
    args, bs = make_layer(kind, [5] * 30, 8000, 256, 0, torch.float32)  # a LANES_CASES shape
    args = [a.detach() if a is not None else None for a in args]
    with torch.no_grad(), seqkernels.use_backend("cpu"), num_threads(threads):
        first = call(kind, args, bs, False)
        again = call(kind, args, bs, False)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kind, P", [("lstm", 0), ("lstm", 3), ("rnn", 0)])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_reads_output_gradient_with_its_strides(kind, P, reverse, dtype):
    """The backward ops read grad_output in place, whatever its strides: a broadcast (the gradient of a sum), a
    transposed view, every other column, a slice of wider rows. Each gives bitwise the results of its contiguous
    copy."""
    seqkernels.available_backends()
    args, bs = make_layer(kind, [7, 5, 5, 2, 1, 1], 6, 40, P, dtype)
    args = [a.detach() if a is not None else None for a in args]
    ops = torch.ops.seqkernels
    N, Pout = int(bs.sum()), P or 40
    if kind == "lstm":
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = args
        out, h_n, c_n, gates, cells = ops.lstm_seq_fwd(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, True)
        rest = (torch.randn_like(h_n), torch.randn_like(c_n), x, bs, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, reverse)
        backward = ops.lstm_seq_bwd
    else:
        x, h0, w_ih, w_hh, b_ih, b_hh = args
        out, h_n = ops.rnn_seq_fwd(x, bs, h0, w_ih, w_hh, b_ih, b_hh, "tanh", reverse)
        rest = (torch.randn_like(h_n), x, bs, h0, w_ih, w_hh, out, "tanh", reverse)
        backward = ops.rnn_seq_bwd
    layouts = {
        "broadcast": torch.tensor(0.7, dtype=dtype).expand(N, Pout),
        "transposed": torch.randn(Pout, N, dtype=dtype).t(),
        "every other column": torch.randn(N, 2 * Pout, dtype=dtype)[:, ::2],
        "wider rows": torch.randn(N, Pout + 3, dtype=dtype)[:, :Pout],
    }
    for name, grad in layouts.items():
        strided = backward(grad, *rest)
        contiguous = backward(grad.contiguous(), *rest)
        for i, (a, b) in enumerate(zip(strided, contiguous)):
            assert torch.equal(a, b), f"{name}: result {i} differs from the contiguous gradient's"


def gate_preactivations(n):
    """n float32 gate inputs spanning the activations' whole range: a dense grid around 0, magnitudes from 1e-30
    to 120 (where sigmoid and tanh saturate and e^x leaves float's range) in both signs, zeros and subnormals."""
    mags = torch.logspace(-30, 2.08, n // 4, dtype=torch.float64)
    special = torch.tensor([0.0, -0.0, 1e-40, -1e-40, 0.625, -0.625, 87.3, -87.4, 88.7, -88.7, 103.9, -104.5, 200.0,
                            -200.0], dtype=torch.float64)
    grid = torch.linspace(-24, 24, n - 2 * (n // 4) - special.numel(), dtype=torch.float64)
    return torch.cat([grid, mags, -mags, special]).float()


def assert_activations_accurate(name, gates, pre, H):
    """The activated gates (rows of i, f, g, o blocks of H) against float64 sigmoid and tanh of `pre`: within
    3 ulp where the result is a normal float, within 1e-38 below that."""
    exact = pre.double().sigmoid()
    exact[:, 2 * H:3 * H] = pre[:, 2 * H:3 * H].double().tanh()
    err = (gates.double() - exact).abs()
    normal = exact.abs() >= torch.finfo(torch.float32).tiny
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact.float())[1].to(torch.int32) - 24)
    worst = (err[normal] / ulp[normal]).max().item()
    assert worst <= 3.0, f"{name}: {worst:.2f} ulp"
    assert err[~normal].max().item() <= 1e-38, f"{name}: {err[~normal].max().item():.3g} below float's normal range"


# The fused float activations of each forward path: the 8-row path (40 units: a full 32-unit block and a partial
# one in the split across threads), batch-in-lanes (weights larger than L2, 16 equal lengths) and the cell op
# (hidden size 40: the activations over arrays; 48, a multiple of 16: the small-batch step's register blocks).
# With W_ih = identity and W_hh = 0, the gate pre-activations are the input exactly, so the saved gates are the
# activation functions of known values.
@pytest.mark.parametrize("path, lengths, H", [("rows", [7, 5, 5, 2, 1, 1], 40), ("lanes", [2] * 16, 512),
                                              ("cell", [1] * 3, 40), ("cell", [1] * 3, 48)])
def test_gate_activations_accurate_over_float_range(path, lengths, H):
    seqkernels.available_backends()
    bs = batch_sizes_of(lengths)
    N, B = int(bs.sum()), len(lengths)
    pre = gate_preactivations(N * 4 * H)[torch.randperm(N * 4 * H, generator=torch.Generator().manual_seed(0))]
    pre = pre.view(N, 4 * H)
    w_ih, w_hh = torch.eye(4 * H), torch.zeros(4 * H, H)
    h0, c0 = torch.zeros(B, H), torch.zeros(B, H)
    ops = torch.ops.seqkernels
    if path == "cell":
        _, _, gates = ops.lstm_cell_fwd(pre, h0, c0, w_ih, w_hh, None, None)
    else:
        gates = ops.lstm_seq_fwd(pre, bs, h0, c0, w_ih, w_hh, None, None, None, False, True)[3]
    assert_activations_accurate(path, gates, pre, H)


def test_empty_batch():
    args, _ = make_layer("lstm", [1], 3, 5, 0, torch.float32)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = [a.detach() if a is not None else None for a in args]
    bs = torch.zeros(4, dtype=torch.int64)
    with seqkernels.use_backend("cpu"):
        out, h, c = lstm_layer(x[:0], bs, h0[:0], c0[:0], w_ih, w_hh, b_ih, b_hh)
    assert out.shape == (0, 5) and h.shape == (0, 5) and c.shape == (0, 5)


@pytest.mark.parametrize("P", [0, 3])
def test_opcheck_lstm_layer_ops(P):
    seqkernels.available_backends()
    args, bs = make_layer("lstm", [4, 3, 1], 3, 5, P, torch.float32)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = [a.detach() if a is not None else None for a in args]
    ops = torch.ops.seqkernels
    for train in (False, True):
        torch.library.opcheck(ops.lstm_seq_fwd.default, (x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, True, train))
    out, h_n, c_n, gates, cells = ops.lstm_seq_fwd(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, False, True)
    torch.library.opcheck(
        ops.lstm_seq_bwd.default,
        (torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n), x, bs, h0, c0, w_ih, w_hh, w_hr, out,
         gates, cells, False),
    )


def test_opcheck_rnn_layer_ops():
    seqkernels.available_backends()
    args, bs = make_layer("rnn", [4, 3, 1], 3, 5, 0, torch.float32)
    x, h0, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in args]
    ops = torch.ops.seqkernels
    torch.library.opcheck(ops.rnn_seq_fwd.default, (x, bs, h0, w_ih, w_hh, b_ih, b_hh, "relu", True))
    out, h_n = ops.rnn_seq_fwd(x, bs, h0, w_ih, w_hh, b_ih, b_hh, "tanh", False)
    torch.library.opcheck(
        ops.rnn_seq_bwd.default, (torch.randn_like(out), torch.randn_like(h_n), x, bs, h0, w_ih, w_hh, out, "tanh", False)
    )


@pytest.mark.parametrize("kind", ["lstm", "rnn"])
def test_layer_ops_compile_without_graph_breaks(kind):
    args, bs = make_layer(kind, [5, 3, 3], 4, 8, 0, torch.float32)
    args = [a.detach() if a is not None else None for a in args]

    def fn(*args):
        return call(kind, args, bs, True)[0].sin()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fn(*args))


def test_first_call_inside_compile():
    """The extension's first load happening while Dynamo traces (a fresh process, nothing called before)."""
    script = """
import torch, seqkernels
from seqkernels.ops.lstm import lstm_layer
bs = torch.tensor([3, 3, 2])
args = (torch.randn(8, 4), bs, torch.zeros(3, 5), torch.zeros(3, 5), torch.randn(20, 4), torch.randn(20, 5))
fn = lambda *a: lstm_layer(*a, None, None, None, False)[0].sin()
with seqkernels.use_backend("cpu"):
    out = torch.compile(fn, fullgraph=True, backend="aot_eager")(*args)
    torch.testing.assert_close(out, fn(*args))
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_lstm_module_compiles_without_graph_breaks():
    # Dynamo declines every nn.RNNBase subclass (torch.nn.LSTM itself included) unless allow_rnn is set.
    m = seqkernels.nn.LSTM(4, 8, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, 4, requires_grad=True)
    with torch._dynamo.config.patch(allow_rnn=True):
        compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
        out_c = compiled(x)[0]
    out = m(x)[0]
    torch.testing.assert_close(out_c, out)
    g_c, = torch.autograd.grad(out_c.sum(), x)
    g, = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(g_c, g)


@pytest.mark.parametrize(
    "bs, match",
    [
        ([3, 4, 1], r"batch_sizes to be non-increasing .* got 4 after 3 at step 1"),
        ([3, 2, 1], r"sum\(batch_sizes\) = 6 rows, got 8"),
        ([2, 2, 2, 2], r"batch_sizes\[0\] to equal the batch size of h0 \(3\), got 2"),
        ([3, 3, 2, 0], r"batch_sizes\[3\] >= 1, got 0"),
    ],
)
def test_cpp_layer_rejects_bad_schedules(bs, match):
    seqkernels.available_backends()
    args, _ = make_layer("lstm", [3, 3, 2], 3, 5, 0, torch.float32)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = [a.detach() if a is not None else None for a in args]
    with pytest.raises(RuntimeError, match=match):
        torch.ops.seqkernels.lstm_seq_fwd(x, torch.tensor(bs), h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, False)


def test_cpp_layer_rejects_bad_shapes_and_types():
    seqkernels.available_backends()
    args, bs = make_layer("lstm", [3, 3, 2], 3, 5, 0, torch.float32)
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = [a.detach() if a is not None else None for a in args]
    ops = torch.ops.seqkernels
    with pytest.raises(RuntimeError, match=r"batch_sizes to be a 1-D int64 CPU tensor"):
        ops.lstm_seq_fwd(x, bs.int(), h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, False)
    with pytest.raises(RuntimeError, match=r"c0 of shape \[3, 5\]"):
        ops.lstm_seq_fwd(x, bs, h0, c0[:, :4], w_ih, w_hh, b_ih, b_hh, None, False, False)
    with pytest.raises(RuntimeError, match=r"w_hr of shape \[2, 5\] \(proj_size, hidden_size\), got \[2, 4\]"):
        ops.lstm_seq_fwd(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, torch.randn(2, 4), False, False)
    with pytest.raises(RuntimeError, match=r"gates \(saved by lstm_seq_fwd with train=True\) to have dtype"):
        out, h_n, c_n, gates, cells = ops.lstm_seq_fwd(x, bs, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True)
        ops.lstm_seq_bwd(out, h_n, c_n, x, bs, h0, c0, w_ih, w_hh, None, out, gates.double(), cells, False)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_reference_layer_matches_torch_rnn_on_packed_sequences(nonlinearity):
    lengths = [7, 5, 5, 2, 1, 1]
    m = torch.nn.RNN(4, 6, bidirectional=True, nonlinearity=nonlinearity, dtype=torch.float64)
    x = torch.randn(7, len(lengths), 4, dtype=torch.float64)
    h0 = torch.randn(2, len(lengths), 6, dtype=torch.float64)
    packed = pack_padded_sequence(x, torch.tensor(lengths))
    out, h_n = m(packed, h0)
    for d, sfx in enumerate(["", "_reverse"]):
        w = [getattr(m, f"{n}_l0{sfx}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        o, h = reference.rnn_layer(packed.data, packed.batch_sizes, h0[d], *w, nonlinearity, reverse=bool(d))
        assert_close64("output", o, out.data[:, 6 * d : 6 * d + 6])
        assert_close64("h_n", h, h_n[d])
