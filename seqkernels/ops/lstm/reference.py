"""Plain-PyTorch LSTM and RNN recurrences: the oracles every kernel is checked against.

Written for clarity, not speed: one step at a time, differentiable by autograd, any device and floating dtype
(float64 included). Gate order i, f, g, o and all conventions as ``torch.nn.LSTM`` / ``torch.nn.RNN``.

Layer functions take the packed-rows layout of ``torch.nn.utils.rnn.PackedSequence``: ``input`` is
``(N, input_size)``, the rows of all time steps one after the other, and ``batch_sizes`` (``(T,)`` int64,
non-increasing) says how many sequences take part in each step; the rows of step t belong to sequences
``0 .. batch_sizes[t] - 1``. A batch of equal lengths is ``batch_sizes[t] = B``. A sequence's outputs exist only
for its own steps, and its final state is its state after its last step. ``reverse=True`` runs each sequence
backwards from its own last step (the second direction of a bidirectional layer).
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


def _offsets(batch_sizes: Tensor):
    sizes = [int(n) for n in batch_sizes.tolist()]
    offsets = [0]
    for n in sizes[:-1]:
        offsets.append(offsets[-1] + n)
    return sizes, offsets


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
    """One LSTM layer, one direction: returns ``(output (N, P), h_n (B, P), c_n (B, H))``."""
    sizes, offsets = _offsets(batch_sizes)
    h, c = h0, c0
    outputs = [None] * len(sizes)
    for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
        n, o = sizes[t], offsets[t]
        h_new, c_new = lstm_cell(input[o : o + n], h[:n], c[:n], w_ih, w_hh, b_ih, b_hh, w_hr)
        outputs[t] = h_new
        # Rows past n have finished (forward) or not started yet (reverse): their state is kept as is.
        h, c = torch.cat([h_new, h[n:]]), torch.cat([c_new, c[n:]])
    return torch.cat(outputs), h, c


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
    """One RNN layer, one direction: returns ``(output (N, H), h_n (B, H))``."""
    sizes, offsets = _offsets(batch_sizes)
    h = h0
    outputs = [None] * len(sizes)
    for t in reversed(range(len(sizes))) if reverse else range(len(sizes)):
        n, o = sizes[t], offsets[t]
        h_new = rnn_cell(input[o : o + n], h[:n], w_ih, w_hh, b_ih, b_hh, nonlinearity)
        outputs[t] = h_new
        h = torch.cat([h_new, h[n:]])
    return torch.cat(outputs), h
