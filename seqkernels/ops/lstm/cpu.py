"""The C++ CPU kernels of the LSTM/RNN (``torch.ops.seqkernels``, built from ``csrc/cpu/lstm.cpp``).

Holds what the dispatcher needs to know about them (``supports``) and their fake kernels, which give
``torch.compile`` / ``torch.export`` output shapes without running anything. The autograd Functions that call
them are in ``function.py``.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from ... import _ext

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def supports(*tensors: Optional[Tensor]) -> List[str]:
    """Why the C++ kernels cannot take these (already validated) arguments; empty if they can."""
    why = []
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in DTYPES:
            why.append(f"the cpu kernels take float32, float64 and bfloat16, got {t.dtype}")
            break
        if t.layout != torch.strided:
            why.append(f"the cpu kernels take dense tensors, got layout {t.layout}")
            break
    return why


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _register_fakes() -> None:
    @torch.library.register_fake("seqkernels::lstm_cell_fwd")
    def _lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        B, H = input.shape[0], w_hh.shape[1]
        return (
            input.new_empty(B, H),
            input.new_empty(B, H),
            input.new_empty(B, 4 * H, dtype=_compute_dtype(input.dtype)),
        )

    @torch.library.register_fake("seqkernels::lstm_cell_bwd")
    def _lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates):
        return (
            torch.empty_like(input),
            torch.empty_like(hx),
            torch.empty_like(cx),
            torch.empty_like(w_ih),
            torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]),
        )

    @torch.library.register_fake("seqkernels::rnn_cell_fwd")
    def _rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
        return input.new_empty(input.shape[0], w_hh.shape[1])

    @torch.library.register_fake("seqkernels::rnn_cell_bwd")
    def _rnn_cell_bwd(grad_hy, input, hx, w_ih, w_hh, hy, nonlinearity):
        return (
            torch.empty_like(input),
            torch.empty_like(hx),
            torch.empty_like(w_ih),
            torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]),
        )


    @torch.library.register_fake("seqkernels::lstm_seq_fwd")
    def _lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train):
        N, H = input.shape[0], w_hh.shape[0] // 4
        P = w_hr.shape[0] if w_hr is not None else H
        B, ct = h0.shape[0], _compute_dtype(input.dtype)
        saved = N if train else 0
        return (
            input.new_empty(N, P),
            input.new_empty(B, P),
            input.new_empty(B, H),
            input.new_empty(saved, 4 * H, dtype=ct),
            input.new_empty(saved, H, dtype=ct),
        )

    @torch.library.register_fake("seqkernels::lstm_seq_bwd")
    def _lstm_seq_bwd(grad_output, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output,
                      gates, cells, reverse):
        return (
            torch.empty_like(input),
            torch.empty_like(h0),
            torch.empty_like(c0),
            torch.empty_like(w_ih),
            torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]),
            torch.empty_like(w_hr) if w_hr is not None else input.new_empty(0, 0),
        )

    @torch.library.register_fake("seqkernels::rnn_seq_fwd")
    def _rnn_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse):
        return input.new_empty(input.shape[0], w_hh.shape[0]), torch.empty_like(h0)

    @torch.library.register_fake("seqkernels::rnn_seq_bwd")
    def _rnn_seq_bwd(grad_output, grad_hn, input, batch_sizes, h0, w_ih, w_hh, output, nonlinearity, reverse):
        return (
            torch.empty_like(input),
            torch.empty_like(h0),
            torch.empty_like(w_ih),
            torch.empty_like(w_hh),
            w_ih.new_empty(w_ih.shape[0]),
        )


_ext.on_load(_register_fakes)


# Handles to the ops, bound once the extension has loaded: looking them up on torch.ops costs about half a
# microsecond per call, which shows in cell-step loops.
_ops = {}


def _bind_ops() -> None:
    for name in ("lstm_cell_fwd", "lstm_cell_bwd", "rnn_cell_fwd", "rnn_cell_bwd", "lstm_seq_fwd", "lstm_seq_bwd",
                 "rnn_seq_fwd", "rnn_seq_bwd"):
        _ops[name] = getattr(torch.ops.seqkernels, name).default


_ext.on_load(_bind_ops)


def lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return _ops["lstm_cell_fwd"](input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates):
    return _ops["lstm_cell_bwd"](grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates)


def rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    return _ops["rnn_cell_fwd"](input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def rnn_cell_bwd(grad_hy, input, hx, w_ih, w_hh, hy, nonlinearity):
    return _ops["rnn_cell_bwd"](grad_hy, input, hx, w_ih, w_hh, hy, nonlinearity)


def lstm_seq_fwd(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train):
    return _ops["lstm_seq_fwd"](input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, train)


def lstm_seq_bwd(grad_output, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells,
                 reverse):
    return _ops["lstm_seq_bwd"](
        grad_output, grad_hn, grad_cn, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells, reverse
    )


def rnn_seq_fwd(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse):
    return _ops["rnn_seq_fwd"](input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)


def rnn_seq_bwd(grad_output, grad_hn, input, batch_sizes, h0, w_ih, w_hh, output, nonlinearity, reverse):
    return _ops["rnn_seq_bwd"](grad_output, grad_hn, input, batch_sizes, h0, w_ih, w_hh, output, nonlinearity, reverse)
