"""The C++ CPU kernels of the LSTM/RNN (``torch.ops.seqkernels``, built from ``csrc/cpu/lstm.cpp``).

Holds their fake kernels, which give ``torch.compile`` / ``torch.export`` output shapes without running anything,
and the ops themselves as module attributes (``lstm_cell_fwd``, ...); what they take is ``seqkernels.ops.cpp``.
The autograd Functions that call them are in ``function.py``.
"""
from __future__ import annotations

import torch

from ... import _ext
from ..cpp import bind_ops, compute_dtype


def _register_fakes() -> None:
    @torch.library.register_fake("seqkernels::lstm_cell_fwd")
    def _lstm_cell_fwd(input, hx, cx, w_ih, w_hh, b_ih, b_hh):
        B, H = input.shape[0], w_hh.shape[1]
        return (
            input.new_empty(B, H),
            input.new_empty(B, H),
            input.new_empty(B, 4 * H, dtype=compute_dtype(input.dtype)),
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
        B, ct = h0.shape[0], compute_dtype(input.dtype)
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


# The ops themselves (argument order as declared in csrc/registration.cpp), bound once the extension has loaded.
bind_ops(globals(), ("lstm_cell_fwd", "lstm_cell_bwd", "rnn_cell_fwd", "rnn_cell_bwd",
                     "lstm_seq_fwd", "lstm_seq_bwd", "rnn_seq_fwd", "rnn_seq_bwd"))


def _bind_steps() -> None:
    """The direct bindings of the inference cell step (csrc/python.cpp): ``lstm_cell_step(input, hx, cx, w_ih,
    w_hh, b_ih, b_hh) -> (hy, cy)`` and ``rnn_cell_step(input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity) -> hy``,
    the kernels of lstm_cell_fwd and rnn_cell_fwd without the dispatcher's per-call cost. They record no autograd
    graph: only for calls where none is needed."""
    from ... import _C

    globals()["lstm_cell_step"] = _C.lstm_cell_step
    globals()["rnn_cell_step"] = _C.rnn_cell_step


_ext.on_load(_bind_steps)
