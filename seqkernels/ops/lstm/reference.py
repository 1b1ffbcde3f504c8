"""Plain-PyTorch LSTM and RNN recurrences: the oracles every kernel is checked against.

Written for clarity, not speed: one step at a time, differentiable by autograd, any device and floating dtype
(float64 included). Gate order i, f, g, o and all conventions as ``torch.nn.LSTM`` / ``torch.nn.RNN``.

Layer functions take time-major input ``(T, B, input_size)`` and optional per-sequence ``lengths`` (``(B,)``
int64, each in ``[1, T]``): sequence b takes part in steps ``t < lengths[b]`` only; its outputs past its length
are zero and its final state is the state at its own length. ``reverse=True`` runs each sequence backwards from
its own last step (the second direction of a bidirectional layer).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def _linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    return torch.nn.functional.linear(x, w, b)


def lstm_cell(
    input: Tensor,
    hx: Tensor,
    cx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor]:
    """One LSTM step: returns ``(h', c')``; ``w_hr`` projects h' to ``proj_size`` features."""
    gates = _linear(input, w_ih, b_ih) + _linear(hx, w_hh, b_hh)
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if w_hr is not None:
        h = _linear(h, w_hr, None)
    return h, c


def rnn_cell(
    input: Tensor,
    hx: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One Elman RNN step: ``act(x W_ih^T + b_ih + h W_hh^T + b_hh)`` with act ``tanh`` or ``relu``."""
    pre = _linear(input, w_ih, b_ih) + _linear(hx, w_hh, b_hh)
    if nonlinearity == "tanh":
        return torch.tanh(pre)
    if nonlinearity == "relu":
        return torch.relu(pre)
    raise ValueError(f"rnn_cell: expected nonlinearity 'tanh' or 'relu', got {nonlinearity!r}")


def _steps(T: int, reverse: bool):
    return range(T - 1, -1, -1) if reverse else range(T)


def _active(lengths: Optional[Tensor], t: int, like: Tensor) -> Optional[Tensor]:
    """(B, 1) boolean: which sequences take part in step t (None: all)."""
    if lengths is None:
        return None
    return (t < lengths).to(like.device).unsqueeze(1)


def lstm_layer(
    input: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    w_hr: Optional[Tensor] = None,
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction: returns ``(output (T, B, P), h_n (B, P), c_n (B, H))``."""
    h, c = h0, c0
    outputs = [None] * input.shape[0]
    for t in _steps(input.shape[0], reverse):
        h_new, c_new = lstm_cell(input[t], h, c, w_ih, w_hh, b_ih, b_hh, w_hr)
        active = _active(lengths, t, h_new)
        if active is None:
            h, c, outputs[t] = h_new, c_new, h_new
        else:
            h = torch.where(active, h_new, h)
            c = torch.where(active, c_new, c)
            outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h, c


def rnn_layer(
    input: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    nonlinearity: str = "tanh",
    lengths: Optional[Tensor] = None,
    reverse: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One RNN layer, one direction: returns ``(output (T, B, H), h_n (B, H))``."""
    h = h0
    outputs = [None] * input.shape[0]
    for t in _steps(input.shape[0], reverse):
        h_new = rnn_cell(input[t], h, w_ih, w_hh, b_ih, b_hh, nonlinearity)
        active = _active(lengths, t, h_new)
        if active is None:
            h, outputs[t] = h_new, h_new
        else:
            h = torch.where(active, h_new, h)
            outputs[t] = torch.where(active, h_new, torch.zeros_like(h_new))
    return torch.stack(outputs), h
