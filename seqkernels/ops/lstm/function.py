"""Autograd Functions over the LSTM/RNN kernels, argument validation, and the dispatched entry points.

A backend with kernels (``cpu`` here) provides a module of forward/backward launchers; the Functions below take
that module, run its forward, save what its backward needs, and call the same module's backward. The
``reference`` backend needs no Function: autograd differentiates it directly.
"""
from __future__ import annotations

from types import ModuleType
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ... import backends
from .. import cpp
from . import cpu, reference


def _needs_grad(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_compiling = torch.compiler.is_compiling  # torch.compile traces the dispatched ops, not the direct step bindings
_cpu_ready: Optional[bool] = None  # backends.backend_status("cpu")[0], fixed for the process once asked
_CPU_DTYPES = frozenset(cpp.DTYPES)


def _plain_cpu_call(input) -> bool:
    """A call the cpu backend takes whatever its other arguments (checked by the C++ op itself): CPU tensors of a
    supported dtype, no forced backend. Cell steps run in Python loops, so these skip the per-call selection
    (each test here is a few tens of nanoseconds; a step at batch 1 takes a few microseconds); the layer ops too,
    where the selection's Python runs cold right after the previous kernel (tens of microseconds)."""
    global _cpu_ready
    if backends._forced or backends._env_backend is not None or not isinstance(input, Tensor):
        return False
    if not (input.is_cpu and input.dtype in _CPU_DTYPES and input.layout == torch.strided):
        return False
    if _cpu_ready is None:
        _cpu_ready = backends.backend_status("cpu")[0]
    return _cpu_ready


# ------------------------------------------------------------------------------------------------------------------
# Validation: runs before any backend, so every backend reports bad input the same way.


def _check_tensor(op: str, name: str, t, like: Tensor, shape: Sequence[int], layout: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.dtype != like.dtype:
        raise ValueError(f"{op}: expected {name} to have the dtype of input ({like.dtype}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{op}: expected {name} on the device of input ({like.device}), got {t.device}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{op}: expected {name} of shape {tuple(shape)} {layout}, got {tuple(t.shape)}")


def check_cell_args(
    op: str,
    input: Tensor,
    states: Sequence[Tuple[str, Tensor]],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor],
    b_hh: Optional[Tensor],
    gates: int,
) -> int:
    """Validate a cell step's arguments (input (B, I), states (B, H), weights (gates*H, ...)); return H."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{op}: expected input to be a Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise ValueError(f"{op}: expected input to have a floating dtype, got {input.dtype}")
    if input.dim() != 2:
        raise ValueError(f"{op}: expected input to be 2-D (batch, input_size), got shape {tuple(input.shape)}")
    if not isinstance(w_ih, Tensor) or w_ih.dim() != 2 or w_ih.shape[0] == 0 or w_ih.shape[0] % gates:
        shape = tuple(w_ih.shape) if isinstance(w_ih, Tensor) else type(w_ih).__name__
        raise ValueError(
            f"{op}: expected w_ih to be 2-D ({gates} * hidden_size, input_size) with hidden_size > 0, got {shape}"
        )
    B, I = input.shape
    H = w_ih.shape[0] // gates
    g = f"{gates} * hidden_size" if gates > 1 else "hidden_size"
    if w_ih.shape[1] != I:
        raise ValueError(
            f"{op}: expected input.size(1) to equal w_ih.size(1) (input_size = {w_ih.shape[1]}), got {I}"
        )
    _check_tensor(op, "w_ih", w_ih, input, (gates * H, I), f"({g}, input_size)")
    _check_tensor(op, "w_hh", w_hh, input, (gates * H, H), f"({g}, hidden_size)")
    for name, state in states:
        _check_tensor(op, name, state, input, (B, H), "(batch, hidden_size)")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{op}: expected b_ih and b_hh to be both tensors or both None")
    if b_ih is not None:
        _check_tensor(op, "b_ih", b_ih, input, (gates * H,), f"({g},)")
        _check_tensor(op, "b_hh", b_hh, input, (gates * H,), f"({g},)")
    return H


# ------------------------------------------------------------------------------------------------------------------
# Autograd Functions


class LSTMCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: ModuleType, input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        hy, cy, gates = kernels.lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        ctx.kernels = kernels
        ctx.has_bias = b_ih is not None
        ctx.save_for_backward(input, hx, cx, w_ih, w_hh, cy, gates)
        return hy, cy

    @staticmethod
    def backward(ctx, grad_hy, grad_cy):
        input, hx, cx, w_ih, w_hh, cy, gates = ctx.saved_tensors
        grads = ctx.kernels.lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates)
        grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias = grads
        if not ctx.has_bias:
            grad_bias = None
        return None, grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_bias


class RNNCellFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: ModuleType, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity: str):
        hy = kernels.rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        ctx.kernels = kernels
        ctx.has_bias = b_ih is not None
        ctx.nonlinearity = nonlinearity
        ctx.save_for_backward(input, hx, w_ih, w_hh, hy)
        return hy

    @staticmethod
    def backward(ctx, grad_hy):
        input, hx, w_ih, w_hh, hy = ctx.saved_tensors
        grads = ctx.kernels.rnn_cell_bwd(grad_hy, input, hx, w_ih, w_hh, hy, ctx.nonlinearity)
        grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias = grads
        if not ctx.has_bias:
            grad_bias = None
        return None, grad_input, grad_hx, grad_w_ih, grad_w_hh, grad_bias, grad_bias, None


class LSTMLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: ModuleType, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse: bool):
        out, h_n, c_n, gates, cells = kernels.lstm_seq_fwd(
            input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, True
        )
        ctx.kernels, ctx.reverse, ctx.has_bias = kernels, reverse, b_ih is not None
        ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn):
        input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells = ctx.saved_tensors
        grads = ctx.kernels.lstm_seq_bwd(
            grad_out, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, out, gates, cells, ctx.reverse
        )
        grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr = grads
        grad_bias = grad_bias if ctx.has_bias else None
        grad_w_hr = grad_w_hr if w_hr is not None else None
        return None, grad_input, None, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_bias, grad_w_hr, None


class RNNLayerFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kernels: ModuleType, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str,
                reverse: bool):
        out, h_n = kernels.rnn_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)
        ctx.kernels, ctx.reverse, ctx.has_bias, ctx.nonlinearity = kernels, reverse, b_ih is not None, nonlinearity
        ctx.save_for_backward(input, batch_sizes, h0, w_ih, w_hh, out)
        return out, h_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn):
        input, batch_sizes, h0, w_ih, w_hh, out = ctx.saved_tensors
        grads = ctx.kernels.rnn_seq_bwd(
            grad_out, grad_hn, input, batch_sizes, h0, w_ih, w_hh, out, ctx.nonlinearity, ctx.reverse
        )
        grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias = grads
        grad_bias = grad_bias if ctx.has_bias else None
        return None, grad_input, None, grad_h0, grad_w_ih, grad_w_hh, grad_bias, grad_bias, None, None


# ------------------------------------------------------------------------------------------------------------------
# Backend implementations of the dispatched ops

backends.register("lstm_cell", "reference")(reference.lstm_cell)
backends.register("rnn_cell", "reference")(reference.rnn_cell)
backends.register("lstm_layer", "reference")(reference.lstm_layer)
backends.register("rnn_layer", "reference")(reference.rnn_layer)


@backends.register("lstm_cell", "cpu", supports=cpp.supports)
def _lstm_cell_cpu(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    if _needs_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        return LSTMCellFunction.apply(cpu, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    if _compiling():
        hy, cy, _ = cpu.lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
        return hy, cy
    return cpu.lstm_cell_step(input, hx, cx, w_ih, w_hh, b_ih, b_hh)  # the no-grad step, called directly


@backends.register("rnn_cell", "cpu", supports=lambda input, hx, w_ih, w_hh, b_ih, b_hh, nl: cpp.supports(input))
def _rnn_cell_cpu(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    if _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh):
        return RNNCellFunction.apply(cpu, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    if _compiling():
        return cpu.rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return cpu.rnn_cell_step(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)  # the no-grad step, called directly


@backends.register("lstm_layer", "cpu", supports=lambda input, *rest: cpp.supports(input))
def _lstm_layer_cpu(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False):
    if _needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return LSTMLayerFunction.apply(cpu, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    out, h_n, c_n, _, _ = cpu.lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, False)
    return out, h_n, c_n


@backends.register("rnn_layer", "cpu", supports=lambda input, *rest: cpp.supports(input))
def _rnn_layer_cpu(input, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", reverse=False):
    if _needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh):
        return RNNLayerFunction.apply(cpu, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)
    return cpu.rnn_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)


def _triton_kernels() -> ModuleType:
    from . import triton as kernels  # imports triton: only once the triton backend is chosen or asked

    return kernels


def _triton_supports(input, *rest) -> List[str]:
    return _triton_kernels().supports(input)


@backends.register("lstm_cell", "triton", supports=_triton_supports)
def _lstm_cell_triton(input, hx, cx, w_ih, w_hh, b_ih=None, b_hh=None):
    kernels = _triton_kernels()
    if _needs_grad(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        return LSTMCellFunction.apply(kernels, input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    hy, cy, _ = kernels.lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh)
    return hy, cy


@backends.register("rnn_cell", "triton", supports=_triton_supports)
def _rnn_cell_triton(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh"):
    kernels = _triton_kernels()
    if _needs_grad(input, hx, w_ih, w_hh, b_ih, b_hh):
        return RNNCellFunction.apply(kernels, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return kernels.rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)


@backends.register("lstm_layer", "triton", supports=_triton_supports)
def _lstm_layer_triton(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, w_hr=None, reverse=False):
    kernels = _triton_kernels()
    if _needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return LSTMLayerFunction.apply(kernels, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    out, h_n, c_n, _, _ = kernels.lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, False)
    return out, h_n, c_n


@backends.register("rnn_layer", "triton", supports=_triton_supports)
def _rnn_layer_triton(input, batch_sizes, h0, w_ih, w_hh, b_ih=None, b_hh=None, nonlinearity="tanh", reverse=False):
    kernels = _triton_kernels()
    if _needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh):
        return RNNLayerFunction.apply(kernels, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)
    return kernels.rnn_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)


# ------------------------------------------------------------------------------------------------------------------
# Public entry points


def lstm_cell(
    input: Tensor,
    hx: Tuple[Tensor, Tensor],
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One LSTM step, as ``torch.lstm_cell``: ``hx = (h, c)``, returns ``(h', c')``.

    Shapes: input (B, I), h and c (B, H), w_ih (4H, I), w_hh (4H, H), b_ih and b_hh (4H,); gate order i, f, g, o.
    On CPU tensors (float32, float64, bfloat16) this runs the fused C++ kernel, forward and backward.
    """
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"lstm_cell: expected hx to be a tuple (h, c) of two tensors, got {type(hx).__name__}")
    h, c = hx
    if _plain_cpu_call(input):
        try:
            return _lstm_cell_cpu(input, h, c, w_ih, w_hh, b_ih, b_hh)
        except (RuntimeError, TypeError):
            # The C++ op rejected an argument: report it as every backend does, naming the argument.
            check_cell_args("lstm_cell", input, (("hx[0]", h), ("hx[1]", c)), w_ih, w_hh, b_ih, b_hh, gates=4)
            raise
    check_cell_args("lstm_cell", input, (("hx[0]", h), ("hx[1]", c)), w_ih, w_hh, b_ih, b_hh, gates=4)
    impl = backends.select("lstm_cell", input.device, input, h, c, w_ih, w_hh, b_ih, b_hh)
    return impl.fn(input, h, c, w_ih, w_hh, b_ih, b_hh)


def rnn_cell(
    input: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One Elman RNN step, as ``torch.rnn_tanh_cell`` / ``torch.rnn_relu_cell``; returns h'.

    Shapes: input (B, I), hx (B, H), w_ih (H, I), w_hh (H, H), b_ih and b_hh (H,).
    """
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"rnn_cell: expected nonlinearity 'tanh' or 'relu', got {nonlinearity!r}")
    if _plain_cpu_call(input):
        try:
            return _rnn_cell_cpu(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        except (RuntimeError, TypeError):
            check_cell_args("rnn_cell", input, (("hx", hx),), w_ih, w_hh, b_ih, b_hh, gates=1)
            raise
    check_cell_args("rnn_cell", input, (("hx", hx),), w_ih, w_hh, b_ih, b_hh, gates=1)
    impl = backends.select("rnn_cell", input.device, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)
    return impl.fn(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def lstm_layer(
    input: Tensor,
    batch_sizes: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer and direction over packed rows (layout in ``reference``): ``(output, h_n, c_n)``.

    Shapes: input (N, I), batch_sizes (T,) int64 CPU, h0 (B, P), c0 (B, H), w_ih (4H, I), w_hh (4H, P),
    w_hr (P, H) or None (then P = H).
    """
    if _plain_cpu_call(input):  # the cpu backend's own test (its `supports` looks at the input only)
        return _lstm_layer_cpu(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    impl = backends.select("lstm_layer", input.device, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)
    return impl.fn(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)


def rnn_layer(
    input: Tensor,
    batch_sizes: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    nonlinearity: str = "tanh",
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One RNN layer and direction over packed rows (layout in ``reference``): ``(output, h_n)``."""
    if _plain_cpu_call(input):
        return _rnn_layer_cpu(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)
    impl = backends.select("rnn_layer", input.device, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)
    return impl.fn(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)
