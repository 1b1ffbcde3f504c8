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


_ext.on_load(_register_fakes)


def lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
    return torch.ops.seqkernels.lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh)


def lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates):
    return torch.ops.seqkernels.lstm_cell_bwd(grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, cy, gates)


def rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity):
    return torch.ops.seqkernels.rnn_cell_fwd(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity)


def rnn_cell_bwd(grad_hy, input, hx, w_ih, w_hh, hy, nonlinearity):
    return torch.ops.seqkernels.rnn_cell_bwd(grad_hy, input, hx, w_ih, w_hh, hy, nonlinearity)
