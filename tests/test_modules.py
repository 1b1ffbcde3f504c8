"""seqkernels.nn modules against their torch.nn twins: same state_dict, outputs and every gradient."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import seqkernels

from conftest import assert_close64, assert_error_rule

LSTM_FLAGS = list(itertools.product([1, 2], [True, False], [False, True], [False, True], [0, 3]))
RNN_FLAGS = list(itertools.product([1, 2], [True, False], [False, True], [False, True], ["tanh", "relu"]))
INPUT_SIZE, HIDDEN, T, B = 5, 6, 7, 4
LENGTHS = [7, 5, 5, 2]  # unsorted order is exercised by shuffling below


def build(kind, flags, dtype):
    layers, bias, batch_first, bidir, extra = flags
    kwargs = dict(num_layers=layers, bias=bias, batch_first=batch_first, bidirectional=bidir, dtype=dtype)
    if kind == "LSTM":
        kwargs["proj_size"] = extra
    else:
        kwargs["nonlinearity"] = extra
    ref = getattr(torch.nn, kind)(INPUT_SIZE, HIDDEN, **kwargs)
    ours = getattr(seqkernels.nn, kind)(INPUT_SIZE, HIDDEN, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def make_inputs(module, mode, with_hx, dtype):
    """(forward args, leaves needing grad). mode: batched | unbatched | packed."""
    num_dir = 2 if module.bidirectional else 1
    proj = getattr(module, "proj_size", 0)
    batch = () if mode == "unbatched" else (B,)
    if mode == "unbatched":
        x = torch.randn(T, INPUT_SIZE, dtype=dtype)
    else:
        x = torch.randn(B, T, INPUT_SIZE, dtype=dtype) if module.batch_first else torch.randn(T, B, INPUT_SIZE, dtype=dtype)
    x.requires_grad_()
    leaves = [x]
    hx = None
    if with_hx:
        h = torch.randn(module.num_layers * num_dir, *batch, proj or HIDDEN, dtype=dtype, requires_grad=True)
        leaves.append(h)
        hx = h
        if isinstance(module, torch.nn.LSTM):
            c = torch.randn(module.num_layers * num_dir, *batch, HIDDEN, dtype=dtype, requires_grad=True)
            leaves.append(c)
            hx = (h, c)
    if mode == "packed":
        lengths = torch.tensor([5, 7, 2, 5])  # unsorted: exercises sorted_indices / unsorted_indices
        x_in = pack_padded_sequence(x, lengths, batch_first=module.batch_first, enforce_sorted=False)
        return (x_in, hx), leaves
    return (x, hx), leaves


def flatten_outputs(out):
    output, hidden = out
    if isinstance(output, torch.nn.utils.rnn.PackedSequence):
        output = output.data
    hidden = list(hidden) if isinstance(hidden, tuple) else [hidden]
    return [output] + hidden


def outputs_and_grads(module, args, leaves, upstream=None):
    outs = flatten_outputs(module(*args))
    if upstream is None:
        upstream = [torch.randn_like(o, dtype=torch.float64) for o in outs]
    params = list(module.parameters())
    gs = torch.autograd.grad(outs, leaves + params, [u.to(o.dtype) for u, o in zip(upstream, outs)], allow_unused=True,
                             retain_graph=True)
    return outs, gs, upstream


def compare(kind, flags, mode, with_hx, dtype):
    ref, ours = build(kind, flags, dtype)
    args, leaves = make_inputs(ref, mode, with_hx, dtype)
    outs_r, g_r, upstream = outputs_and_grads(ref, args, leaves)
    outs_o, g_o, _ = outputs_and_grads(ours, args, leaves, upstream)
    names = ["output", "h_n", "c_n"]
    pnames = [n for n, _ in ref.named_parameters()]
    gnames = ["input", "h_0", "c_0"][: len(leaves)] + pnames
    if dtype == torch.float64:
        for n, a, b in zip(names, outs_o, outs_r):
            assert_close64(n, a, b)
        for n, a, b in zip(gnames, g_o, g_r):
            assert (a is None) == (b is None), n
            if a is not None:
                assert_close64(f"grad {n}", a, b)
        return
    # float32: torch's float32 result vs a float64 evaluation of the same module
    ref64, _ = build(kind, flags, torch.float64)
    ref64.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    args64, leaves64 = make_inputs(ref64, mode, with_hx, torch.float64)
    with torch.no_grad():
        for a, b in zip(leaves64, leaves):
            a.copy_(b)
    outs_x, g_x, _ = outputs_and_grads(ref64, args64, leaves64, upstream)
    for n, a, b, c in zip(names, outs_o, outs_r, outs_x):
        assert_error_rule(n, a, b, c)
    for n, a, b, c in zip(gnames, g_o, g_r, g_x):
        assert (a is None) == (b is None), n
        if a is not None:
            assert_error_rule(f"grad {n}", a, b, c)


@pytest.mark.parametrize("flags", LSTM_FLAGS, ids=lambda f: "L{}-bias{}-bf{}-bi{}-proj{}".format(*f))
@pytest.mark.parametrize("mode", ["batched", "unbatched", "packed"])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lstm_matches_torch(flags, mode, with_hx, dtype):
    compare("LSTM", flags, mode, with_hx, dtype)


@pytest.mark.parametrize("flags", RNN_FLAGS, ids=lambda f: "L{}-bias{}-bf{}-bi{}-{}".format(*f))
@pytest.mark.parametrize("mode", ["batched", "unbatched", "packed"])
@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rnn_matches_torch(flags, mode, with_hx, dtype):
    compare("RNN", flags, mode, with_hx, dtype)


@pytest.mark.parametrize("kind", ["LSTMCell", "RNNCell"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("with_hx", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cells_match_torch(kind, bias, batched, with_hx, dtype):
    ref = getattr(torch.nn, kind)(INPUT_SIZE, HIDDEN, bias=bias, dtype=dtype)
    ours = getattr(seqkernels.nn, kind).from_torch(ref)
    batch = (B,) if batched else ()
    x = torch.randn(*batch, INPUT_SIZE, dtype=dtype, requires_grad=True)
    leaves = [x]
    hx = None
    if with_hx:
        leaves += [torch.randn(*batch, HIDDEN, dtype=dtype, requires_grad=True) for _ in range(2 if kind == "LSTMCell" else 1)]
        hx = tuple(leaves[1:]) if kind == "LSTMCell" else leaves[1]
    outs = []
    for m in (ref, ours):
        out = m(x, hx)
        out = list(out) if isinstance(out, tuple) else [out]
        torch.manual_seed(0)
        up = [torch.randn_like(o) for o in out]
        outs.append((out, torch.autograd.grad(out, leaves + list(m.parameters()), up)))
    (o_r, g_r), (o_o, g_o) = outs
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, b in zip(o_o + list(g_o), o_r + list(g_r)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("kind", ["LSTMCell", "RNNCell"])
@pytest.mark.parametrize("grad", [True, False])
def test_cells_with_parametrized_weights(kind, grad):
    """Weights under torch.nn.utils.parametrize are properties, not parameter-dict entries: the cell reads them as
    attributes, with and without autograd."""
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    ref = getattr(torch.nn, kind)(INPUT_SIZE, HIDDEN)
    ours = getattr(seqkernels.nn, kind).from_torch(ref)
    for m in (ref, ours):
        parametrize.register_parametrization(m, "weight_hh", Double())
    x = torch.randn(B, INPUT_SIZE)
    hx = (torch.randn(B, HIDDEN), torch.randn(B, HIDDEN)) if kind == "LSTMCell" else torch.randn(B, HIDDEN)
    with torch.set_grad_enabled(grad):
        expected, got = ref(x, hx), ours(x, hx)
    for a, b in zip(got if kind == "LSTMCell" else [got], expected if kind == "LSTMCell" else [expected]):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_dropout_between_layers_matches_torch(kind):
    """Dropout draws the same masks as torch under the same seed (one mask per layer output, as torch)."""
    ref = getattr(torch.nn, kind)(INPUT_SIZE, HIDDEN, num_layers=3, dropout=0.4, bidirectional=True)
    ours = getattr(seqkernels.nn, kind).from_torch(ref)
    assert ours.training
    x = torch.randn(T, B, INPUT_SIZE, requires_grad=True)
    torch.manual_seed(7)
    out_r = flatten_outputs(ref(x))
    torch.manual_seed(7)
    out_o = flatten_outputs(ours(x))
    for a, b in zip(out_o, out_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g_r = torch.autograd.grad(out_r[0].sum(), [x] + list(ref.parameters()))
    g_o = torch.autograd.grad(out_o[0].sum(), [x] + list(ours.parameters()))
    for a, b in zip(g_o, g_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # and is off in eval mode
    ref.eval(), ours.eval()
    for a, b in zip(flatten_outputs(ours(x)), flatten_outputs(ref(x))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_dropout_packed_is_seeded_and_active():
    m = seqkernels.nn.LSTM(INPUT_SIZE, HIDDEN, num_layers=2, dropout=0.5)
    x = pack_padded_sequence(torch.randn(T, B, INPUT_SIZE), torch.tensor(LENGTHS))
    torch.manual_seed(3)
    a = m(x)[0].data
    torch.manual_seed(3)
    b = m(x)[0].data
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    m.eval()
    assert not torch.allclose(a, m(x)[0].data)


@pytest.mark.parametrize("kind", ["LSTM", "RNN", "LSTMCell", "RNNCell"])
def test_state_dict_round_trip_and_from_torch(kind):
    cell = kind.endswith("Cell")
    kwargs = {} if cell else dict(num_layers=2, bidirectional=True)
    ours = getattr(seqkernels.nn, kind)(3, 4, **kwargs)
    ref = getattr(torch.nn, kind)(3, 4, **kwargs)
    ref.load_state_dict(ours.state_dict())  # ours -> torch
    converted = getattr(seqkernels.nn, kind).from_torch(ref)  # torch -> ours
    assert isinstance(converted, getattr(torch.nn, kind))
    assert list(converted.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v)
    assert repr(converted) == repr(ref)
    with pytest.raises(TypeError, match="from_torch: expected a torch.nn"):
        getattr(seqkernels.nn, kind).from_torch(torch.nn.Linear(3, 4))


def test_packed_output_round_trips_like_torch():
    ref = torch.nn.LSTM(INPUT_SIZE, HIDDEN, batch_first=True)
    ours = seqkernels.nn.LSTM.from_torch(ref)
    x = torch.randn(B, T, INPUT_SIZE)
    packed = pack_padded_sequence(x, torch.tensor([3, 7, 1, 4]), batch_first=True, enforce_sorted=False)
    out_o, (h_o, _) = ours(packed)
    out_r, (h_r, _) = ref(packed)
    torch.testing.assert_close(out_o.batch_sizes, out_r.batch_sizes)
    torch.testing.assert_close(out_o.sorted_indices, out_r.sorted_indices)
    padded_o, len_o = pad_packed_sequence(out_o, batch_first=True)
    padded_r, len_r = pad_packed_sequence(out_r, batch_first=True)
    torch.testing.assert_close(padded_o, padded_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_o, h_r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["LSTM", "RNN"])
def test_training_after_an_inference_mode_call(kind):
    # A padded batch's batch_sizes is made once per shape and reused: made first under inference_mode, it must
    # still be a tensor that autograd can save in a later training call of that shape.
    ref = getattr(torch.nn, kind)(INPUT_SIZE, HIDDEN)
    ours = getattr(seqkernels.nn, kind).from_torch(ref)
    x = torch.randn(T, B, INPUT_SIZE)
    seqkernels.nn.rnn._cached_uniform_steps.cache_clear()  # so the inference_mode call below makes the tensor
    with torch.inference_mode():
        ours(x)
    for module in (ours, ref):
        out, _ = module(x)
        out.sum().backward()
    for p_o, p_r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p_o.grad, p_r.grad, rtol=1e-4, atol=1e-5)


def test_empty_batch_gives_empty_outputs_like_torch():
    ref = torch.nn.LSTM(INPUT_SIZE, HIDDEN, num_layers=2)
    ours = seqkernels.nn.LSTM.from_torch(ref)
    x = torch.randn(T, 0, INPUT_SIZE)
    out_o, (h_o, c_o) = ours(x)
    out_r, (h_r, c_r) = ref(x)
    assert out_o.shape == out_r.shape and h_o.shape == h_r.shape and c_o.shape == c_r.shape
    cell = seqkernels.nn.LSTMCell(INPUT_SIZE, HIDDEN)
    assert cell(torch.randn(0, INPUT_SIZE))[0].shape == (0, HIDDEN)


# ------------------------------------------------------------------------------------------------------------------
# Bad input: errors name the argument, as torch's do


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda m: m(torch.randn(2, 3, 4, 5)), ValueError, r"Expected input to be 2D or 3D, got 4D"),
        (lambda m: m(torch.randn(T, B, 3)), RuntimeError, r"input.size\(-1\) must be equal to input_size. Expected 5, got 3"),
        (lambda m: m(torch.randn(0, B, INPUT_SIZE)), ValueError, r"sequence length larger than 0"),
        (lambda m: m(torch.randn(T, B, INPUT_SIZE).double()), ValueError, r"input dtype \(torch.float64\) does not match weight dtype"),
        (lambda m: m(torch.randn(T, B, INPUT_SIZE), (torch.randn(1, 3, HIDDEN), torch.randn(1, B, HIDDEN))), RuntimeError, r"Expected hidden\[0\] size \(1, 4, 6\), got \[1, 3, 6\]"),
        (lambda m: m(torch.randn(T, B, INPUT_SIZE), (torch.randn(1, B, HIDDEN), torch.randn(1, B, 2))), RuntimeError, r"Expected hidden\[1\] size \(1, 4, 6\), got \[1, 4, 2\]"),
        (lambda m: m(torch.randn(T, B, INPUT_SIZE), (torch.randn(B, HIDDEN), torch.randn(B, HIDDEN))), RuntimeError, r"hx should also be 3-D but got \(2-D, 2-D\)"),
        (lambda m: m(torch.randn(T, INPUT_SIZE), (torch.randn(1, B, HIDDEN), torch.randn(1, B, HIDDEN))), RuntimeError, r"hx should also be 2-D"),
        (lambda m: m(torch.randn(T, B, INPUT_SIZE), (torch.randn(1, B, HIDDEN).double(), torch.randn(1, B, HIDDEN))), ValueError, r"expected hx\[0\] \(h_0\) to have the dtype of input \(torch.float32\), got torch.float64"),
        (lambda m: m(torch.randn(T, B, INPUT_SIZE), (torch.randn(1, B, HIDDEN),)), ValueError, r"hx to be a tuple \(h_0, c_0\)"),
        (lambda m: m([1, 2, 3]), TypeError, r"input to be a Tensor or PackedSequence"),
    ],
)
def test_lstm_bad_input(call, exc, match):
    m = seqkernels.nn.LSTM(INPUT_SIZE, HIDDEN)
    with pytest.raises(exc, match=match):
        call(m)


@pytest.mark.parametrize(
    "kind, call, exc, match",
    [
        ("LSTMCell", lambda m: m(torch.randn(2, 3, INPUT_SIZE)), ValueError, r"LSTMCell: Expected input to be 1D or 2D, got 3D"),
        ("LSTMCell", lambda m: m(torch.randn(2, 3)), ValueError, r"input.size\(1\) to equal w_ih.size\(1\) \(input_size = 5\), got 3"),
        ("LSTMCell", lambda m: m(torch.randn(2, INPUT_SIZE), (torch.randn(3, HIDDEN), torch.randn(2, HIDDEN))), ValueError, r"hx\[0\] of shape \(2, 6\)"),
        ("LSTMCell", lambda m: m(torch.randn(2, INPUT_SIZE), (torch.randn(2, HIDDEN), torch.randn(2, HIDDEN, 1))), ValueError, r"Expected hx\[1\] to be 1D or 2D, got 3D"),
        ("LSTMCell", lambda m: m(torch.randn(2, INPUT_SIZE), torch.randn(2, HIDDEN)), TypeError, r"hx to be a tuple \(h_0, c_0\)"),
        ("RNNCell", lambda m: m(torch.randn(2, INPUT_SIZE), torch.randn(2, HIDDEN).double()), ValueError, r"hx to have the dtype of input"),
        ("RNNCell", lambda m: m(torch.randn(2, INPUT_SIZE).double()), ValueError, r"w_ih to have the dtype of input"),
    ],
)
def test_cell_bad_input(kind, call, exc, match):
    m = getattr(seqkernels.nn, kind)(INPUT_SIZE, HIDDEN)
    with pytest.raises(exc, match=match):
        call(m)
