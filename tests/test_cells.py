"""The LSTM/RNN cell step: reference vs torch, C++ kernel vs reference and torch, gradcheck, opcheck, errors."""
from __future__ import annotations

import pytest
import torch

import seqkernels
from seqkernels.ops.lstm import reference

from conftest import assert_close64, assert_error_rule, grads

# (batch, input_size, hidden_size): size 1, odd sizes, an empty batch, batches large enough that the fused pass
# is split across threads, and float32 batches <= 4 with hidden_size % 16 == 0, which take the whole step per
# block of 16 units (input_size 20 and 130 leave partial vectors; 8 blocks of 16 units split across threads).
SHAPES = [(1, 1, 1), (3, 5, 7), (4, 16, 33), (0, 4, 5), (64, 24, 96), (2, 130, 257), (1, 20, 32), (3, 130, 128)]


def _tensor(shape, dtype, noncontiguous=False):
    if noncontiguous and len(shape) == 2:
        return torch.randn(shape[1], shape[0], dtype=torch.float64).to(dtype).t()  # transposed view
    if noncontiguous:
        return torch.randn(*shape, 2, dtype=torch.float64).to(dtype)[..., 0]  # strided view
    return torch.randn(*shape, dtype=torch.float64).to(dtype)


def make_cell(gates, B, I, H, dtype, bias=True, noncontiguous=False):
    """input, states, w_ih, w_hh, b_ih, b_hh as leaf tensors requiring grad."""
    n_states = 2 if gates == 4 else 1
    ts = [_tensor((B, I), dtype, noncontiguous)]
    ts += [_tensor((B, H), dtype, noncontiguous) for _ in range(n_states)]
    ts += [_tensor((gates * H, I), dtype, noncontiguous) * 0.5, _tensor((gates * H, H), dtype, noncontiguous) * 0.5]
    ts += [_tensor((gates * H,), dtype, noncontiguous), _tensor((gates * H,), dtype, noncontiguous)] if bias else [None, None]
    return [t.requires_grad_() if t is not None else None for t in ts]


def lstm_torch(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)


def lstm_ours(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return seqkernels.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)


def rnn_torch(nl):
    fn = torch.rnn_tanh_cell if nl == "tanh" else torch.rnn_relu_cell
    return lambda x, h, w_ih, w_hh, b_ih, b_hh: (fn(x, h, w_ih, w_hh, b_ih, b_hh),)


def rnn_ours(nl):
    return lambda x, h, w_ih, w_hh, b_ih, b_hh: (seqkernels.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, nl),)


def run(fn, args, upstream):
    """Outputs and gradients of all tensor arguments for the given upstream gradients."""
    outs = fn(*args)
    leaves = [a for a in args if a is not None]
    return outs, grads(outs, leaves, upstream) if outs[0].numel() else [torch.zeros_like(a) for a in leaves]


def cases(gates):
    nls = ["lstm"] if gates == 4 else ["tanh", "relu"]
    return [(nl, shape, bias) for nl in nls for shape in SHAPES for bias in (True, False)]


def _fns(kind):
    if kind == "lstm":
        return 4, lstm_torch, lstm_ours, lambda *a: reference.lstm_cell(*a)
    return 1, rnn_torch(kind), rnn_ours(kind), lambda x, h, *w: (reference.rnn_cell(x, h, *w, nonlinearity=kind),)


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_matches_torch(kind, shape, bias):
    gates, torch_fn, _, ref_fn = _fns(kind)
    args = make_cell(gates, *shape, torch.float64, bias)
    outs_t = torch_fn(*args)
    outs_r = ref_fn(*args)
    upstream = [torch.randn_like(o) for o in outs_t]
    g_t = grads(outs_t, [a for a in args if a is not None], upstream) if shape[0] else []
    g_r = grads(outs_r, [a for a in args if a is not None], upstream) if shape[0] else []
    for i, (a, b) in enumerate(zip(outs_r, outs_t)):
        assert_close64(f"output {i}", a, b)
    for i, (a, b) in enumerate(zip(g_r, g_t)):
        assert_close64(f"grad {i}", a, b)


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("noncontiguous", [False, True])
def test_cpu_kernel(kind, shape, bias, dtype, noncontiguous):
    """C++ cell vs torch in the same dtype and vs a float64 evaluation, outputs and every gradient."""
    gates, torch_fn, ours_fn, _ = _fns(kind)
    args = make_cell(gates, *shape, dtype, bias, noncontiguous)
    args64 = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    upstream = [torch.randn(shape[0], shape[2], dtype=torch.float64) for _ in range(2 if gates == 4 else 1)]
    with seqkernels.use_backend("cpu"):
        outs, g = run(ours_fn, args, [u.to(dtype) for u in upstream])
    outs_t, g_t = run(torch_fn, args, [u.to(dtype) for u in upstream])
    outs_x, g_x = run(torch_fn, args64, upstream)
    names = ["input", "hx", "cx", "w_ih", "w_hh", "b_ih", "b_hh"] if gates == 4 else ["input", "hx", "w_ih", "w_hh", "b_ih", "b_hh"]
    names = [n for n, a in zip(names, args) if a is not None]
    for i, (o, ot, ox) in enumerate(zip(outs, outs_t, outs_x)):
        assert o.dtype == dtype
        if dtype == torch.float64:
            assert_close64(f"output {i}", o, ox)
        else:
            assert_error_rule(f"output {i}", o, ot, ox)
    for name, a, at, ax in zip(names, g, g_t, g_x):
        assert a.dtype == dtype and a.shape == ax.shape, name
        if dtype == torch.float64:
            assert_close64(f"grad {name}", a, ax)
        else:
            assert_error_rule(f"grad {name}", a, at, ax)


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_no_grad_step(kind, shape, dtype):
    """Without autograd, the cell runs through the direct step binding (cpu.lstm_cell_step / rnn_cell_step): the
    same values as the dispatched op, bit for bit, and as accurate as torch."""
    from seqkernels.ops.lstm import cpu

    gates, torch_fn, ours_fn, _ = _fns(kind)
    args = [a.detach() if a is not None else None for a in make_cell(gates, *shape, dtype)]
    args64 = [a.double() for a in args]
    nl = [] if kind == "lstm" else [kind]
    with torch.no_grad():
        outs = ours_fn(*args)
        step = cpu.lstm_cell_step(*args) if kind == "lstm" else (cpu.rnn_cell_step(*args, *nl),)
        op = cpu.lstm_cell_fwd(*args)[:2] if kind == "lstm" else (cpu.rnn_cell_fwd(*args, *nl),)
        outs_t, outs_x = torch_fn(*args), torch_fn(*args64)
    for i, (o, s, p, ot, ox) in enumerate(zip(outs, step, op, outs_t, outs_x)):
        assert o.dtype == dtype and torch.equal(o, s) and torch.equal(s, p), f"output {i}"
        if dtype == torch.float64:
            assert_close64(f"output {i}", o, ox)
        else:
            assert_error_rule(f"output {i}", o, ot, ox)


@pytest.mark.parametrize("kind", ["lstm", "tanh", "relu"])
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_kernel_gradcheck(kind, bias):
    gates, _, ours_fn, _ = _fns(kind)
    args = make_cell(gates, 3, 4, 5, torch.float64, bias)
    if kind == "relu":  # keep pre-activations away from the kink at 0, where the derivative is undefined
        with torch.no_grad():
            args[0].abs_()
            args[2].abs_()
            args[3].abs_()
    leaves = [a for a in args if a is not None]

    def fn(*leaves):
        full = list(leaves) + [None] * (len(args) - len(leaves))
        return ours_fn(*full)

    with seqkernels.use_backend("cpu"):
        assert torch.autograd.gradcheck(fn, leaves)


def _op_args(kind, bias):
    gates = 4 if kind == "lstm" else 1
    args = [a.detach() if a is not None else None for a in make_cell(gates, 3, 4, 5, torch.float32, bias)]
    nl = [] if kind == "lstm" else [kind]
    return args, nl


@pytest.mark.parametrize("kind", ["lstm", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(kind, bias):
    seqkernels.available_backends()  # loads the extension and registers the fake kernels
    ops = torch.ops.seqkernels
    args, nl = _op_args(kind, bias)
    if kind == "lstm":
        x, h, c, w_ih, w_hh, b_ih, b_hh = args
        torch.library.opcheck(ops.lstm_cell_fwd.default, (x, h, c, w_ih, w_hh, b_ih, b_hh))
        hy, cy, gates = ops.lstm_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh)
        torch.library.opcheck(
            ops.lstm_cell_bwd.default, (torch.randn_like(hy), torch.randn_like(cy), x, h, c, w_ih, w_hh, cy, gates)
        )
    else:
        x, h, w_ih, w_hh, b_ih, b_hh = args
        torch.library.opcheck(ops.rnn_cell_fwd.default, (x, h, w_ih, w_hh, b_ih, b_hh, *nl))
        hy = ops.rnn_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, *nl)
        torch.library.opcheck(ops.rnn_cell_bwd.default, (torch.randn_like(hy), x, h, w_ih, w_hh, hy, *nl))


def test_torch_compile_fullgraph():
    x, h, c, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in make_cell(4, 2, 3, 4, torch.float32)]

    def step(x, h, c):
        h, c = seqkernels.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)
        return h * 2, c

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, h, c), step(x, h, c)):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------------------------
# Bad input


def _lstm_args():
    return [a.detach() if a is not None else None for a in make_cell(4, 3, 4, 5, torch.float32)]


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, r"input to be 2-D"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), ValueError, r"input.size\(1\) to equal w_ih.size\(1\)"),
        (lambda a: a.__setitem__(1, a[1][:2]), ValueError, r"hx\[0\] of shape \(3, 5\)"),
        (lambda a: a.__setitem__(2, a[2].double()), ValueError, r"hx\[1\] to have the dtype of input"),
        (lambda a: a.__setitem__(3, a[3][:19]), ValueError, r"w_ih to be 2-D \(4 \* hidden_size"),
        (lambda a: a.__setitem__(4, a[4][:, :4]), ValueError, r"w_hh of shape \(20, 5\)"),
        (lambda a: a.__setitem__(5, a[5][:4]), ValueError, r"b_ih of shape \(20,\)"),
        (lambda a: a.__setitem__(6, None), ValueError, r"b_ih and b_hh to be both"),
        (lambda a: a.__setitem__(0, a[0].long()), ValueError, r"floating dtype"),
    ],
)
def test_lstm_cell_bad_input(mutate, exc, match):
    args = _lstm_args()
    mutate(args)
    x, h, c, *w = args
    for backend in ("cpu", "reference"):
        with seqkernels.use_backend(backend), pytest.raises(exc, match=match):
            seqkernels.lstm_cell(x, (h, c), *w)


def test_lstm_cell_hx_must_be_pair():
    x, h, c, *w = _lstm_args()
    with pytest.raises(TypeError, match=r"hx to be a tuple \(h, c\)"):
        seqkernels.lstm_cell(x, h, *w)


def test_rnn_cell_bad_nonlinearity():
    x, h, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in make_cell(1, 3, 4, 5, torch.float32)]
    with pytest.raises(ValueError, match=r"nonlinearity 'tanh' or 'relu', got 'gelu'"):
        seqkernels.rnn_cell(x, h, w_ih, w_hh, b_ih, b_hh, "gelu")


# Bad arguments for the C++ entry points, as (argument index, value, message): each is checked before any kernel
# touches memory.
_BAD_CPP_ARGS = [
    (1, torch.randn(2, 5), r"hx of shape \[3, 5\]"),
    (3, torch.randn(19, 4), r"w_ih.size\(0\) to be a positive multiple of 4"),
    (4, torch.randn(20, 5, dtype=torch.float64), r"w_hh to have the dtype of input"),
    (0, torch.randn(3, 4, dtype=torch.float16), r"input to have dtype float32, float64 or bfloat16"),
    (5, torch.randn(7), r"b_ih of shape \[20\]"),
    (6, None, r"b_ih and b_hh to be both tensors or both None"),
]


@pytest.mark.parametrize("entry", ["op", "step binding"])
@pytest.mark.parametrize("index, value, match", _BAD_CPP_ARGS)
def test_cpp_entry_points_check_before_touching_memory(entry, index, value, match):
    """The C++ entry points validate their own arguments: called directly, bad input is an error, not a crash.
    The direct step binding (cpu.lstm_cell_step) checks as the dispatched op does."""
    from seqkernels.ops.lstm import cpu

    seqkernels.available_backends()
    args = _lstm_args()
    args[index] = value
    with pytest.raises(RuntimeError, match=match):
        (torch.ops.seqkernels.lstm_cell_fwd if entry == "op" else cpu.lstm_cell_step)(*args)


@pytest.mark.parametrize("entry", ["op", "step binding"])
def test_cpp_rnn_entry_points_reject_bad_nonlinearity(entry):
    from seqkernels.ops.lstm import cpu

    seqkernels.available_backends()
    x, h, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in make_cell(1, 3, 4, 5, torch.float32)]
    fn = torch.ops.seqkernels.rnn_cell_fwd if entry == "op" else cpu.rnn_cell_step
    with pytest.raises(RuntimeError, match=r"nonlinearity to be 'tanh' or 'relu', got 'sigmoid'"):
        fn(x, h, w_ih, w_hh, b_ih, b_hh, "sigmoid")
