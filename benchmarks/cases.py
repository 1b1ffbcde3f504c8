"""Benchmark cases: seqkernels against what a user would run instead, on the same inputs and weights.

Each case builds both sides once and returns two zero-argument callables (torch first, seqkernels second), the
floating-point work of one call (matmul FLOPs only), and the target ratio torch time / seqkernels time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import seqkernels


@dataclass
class Case:
    name: str
    group: str
    description: str
    build: Callable[[], Tuple[Callable[[], object], Callable[[], object], float]]
    target: Optional[float] = None  # minimum torch time / seqkernels time


def _recurrent_flops(kind: str, rows: int, I: int, H: int, train: bool) -> float:
    """Matmul FLOPs of a one-layer LSTM/RNN over `rows` (batch x step) rows: 2 * rows * gates*H * (I + H)."""
    gates = 4 if kind == "LSTM" else 1
    fwd = 2.0 * rows * gates * H * (I + H)
    return 3.0 * fwd if train else fwd  # backward: input/state gradients and weight gradients, twice the forward


def _modules(kind: str, I: int, H: int):
    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(I, H)
    return ref, getattr(seqkernels.nn, kind).from_torch(ref)


def sequence_case(kind: str, B: int, T: int, I: int, H: int, train: bool, target: Optional[float]) -> Case:
    def build():
        ref, ours = _modules(kind, I, H)
        x = torch.randn(T, B, I, requires_grad=train)

        def run(m):
            if train:
                out, _ = m(x)
                out.sum().backward()
            else:
                with torch.no_grad():
                    m(x)

        return (lambda: run(ref)), (lambda: run(ours)), _recurrent_flops(kind, T * B, I, H, train)

    mode = "training step" if train else "inference"
    return Case(f"{kind.lower()}-{'train' if train else 'infer'}-B{B}-T{T}-{I}x{H}", kind,
                f"{mode}, B={B}, T={T}, input {I}, hidden {H}", build, target)


def packed_case(kind: str, B: int, T: int, I: int, H: int, train: bool, target: Optional[float]) -> Case:
    def build():
        ref, ours = _modules(kind, I, H)
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(T // 4, T + 1, (B,), generator=gen)
        # The PackedSequence is built once, as the other cases build their input once: both sides are timed on
        # the same PackedSequence, and pack_padded_sequence (torch's, the same for both) is not part of either.
        packed = pack_padded_sequence(torch.randn(T, B, I), lengths, enforce_sorted=False)
        if train:
            data = packed.data.clone().requires_grad_()
            packed = PackedSequence(data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices)

        def run(m):
            if train:
                out, _ = m(packed)
                out.data.sum().backward()
            else:
                with torch.no_grad():
                    m(packed)

        return (lambda: run(ref)), (lambda: run(ours)), _recurrent_flops(kind, int(lengths.sum()), I, H, train)

    mode = "packed training step" if train else "packed inference"
    return Case(f"{kind.lower()}-packed-{'train' if train else 'infer'}-B{B}-T{T}-{I}x{H}", kind,
                f"{mode}, B={B}, T={T}, {I}/{H}, lengths uniform in [T/4, T]", build, target)


def cell_loop_case(kind: str, B: int, I: int, H: int, steps: int, target: Optional[float]) -> Case:
    cell_kind = kind + "Cell"

    def build():
        torch.manual_seed(0)
        ref = getattr(torch.nn, cell_kind)(I, H)
        ours = getattr(seqkernels.nn, cell_kind).from_torch(ref)
        xs = torch.randn(steps, B, I)

        def run(cell):
            with torch.no_grad():
                h = torch.zeros(B, H)
                state = (h, torch.zeros(B, H)) if kind == "LSTM" else h
                for t in range(steps):
                    state = cell(xs[t], state)

        return (lambda: run(ref)), (lambda: run(ours)), _recurrent_flops(kind, steps * B, I, H, False)

    return Case(f"{cell_kind.lower()}-loop-B{B}-{I}x{H}-{steps}steps", kind,
                f"{cell_kind} step loop in Python, B={B}, {I}/{H}, {steps} steps (inference)", build, target)


def recurrent_cases() -> List[Case]:
    """The grid of the recurrence issue, for the LSTM (with its targets) and the RNN (tanh, reported)."""
    cases = []
    for kind in ("LSTM", "RNN"):
        t = (lambda v: v) if kind == "LSTM" else (lambda v: None)
        cases += [
            sequence_case(kind, 1, 512, 128, 128, False, t(1.5)),
            sequence_case(kind, 32, 128, 256, 256, False, t(1.1)),
            sequence_case(kind, 64, 64, 512, 512, False, t(1.0)),
            sequence_case(kind, 32, 128, 256, 256, True, t(1.3)),
            packed_case(kind, 32, 128, 256, 256, False, t(2.0)),
            packed_case(kind, 16, 128, 128, 128, True, t(1.5)),
            cell_loop_case(kind, 1, 128, 128, 256, t(3.0)),
        ]
    return cases


def attention_case(name: str, description: str, B: int, H: int, L: int, S: int, D: int, *, causal=False,
                   mask=False, train=False, dropout=0.0, target: Optional[float] = None) -> Case:
    import torch.nn.functional as F

    def build():
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, H, n, D, generator=gen).requires_grad_(train) for n in (L, S, S))
        attn_mask = torch.randn(B, 1, L, S, generator=gen) if mask else None

        def run(fn):
            if train:
                out = fn(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal)
                out.backward(torch.ones_like(out))
            else:
                with torch.no_grad():
                    fn(q, k, v, attn_mask=attn_mask, dropout_p=dropout, is_causal=causal)

        flops = 4.0 * B * H * L * S * D * (0.5 if causal else 1.0) * (3.5 if train else 1.0)
        return (lambda: run(F.scaled_dot_product_attention)), (lambda: run(seqkernels.scaled_dot_product_attention)), flops

    return Case(name, "attention", description, build, target)


def attention_cases() -> List[Case]:
    """The grid of the attention issue (FLOPs 4*B*H*L*S*D, halved for causal, x3.5 with the backward)."""
    return [
        attention_case("sdpa-fwd-B4-H8-1024-D64", "forward, B=4, H=8, L=S=1024, D=64", 4, 8, 1024, 1024, 64, target=1.0),
        attention_case("sdpa-fwd-causal-B4-H8-1024-D64", "forward, causal, same", 4, 8, 1024, 1024, 64, causal=True,
                       target=1.3),
        attention_case("sdpa-train-B4-H8-1024-D64", "forward + backward, same", 4, 8, 1024, 1024, 64, train=True,
                       target=1.1),
        attention_case("sdpa-train-causal-B4-H8-1024-D64", "forward + backward, causal, same", 4, 8, 1024, 1024, 64,
                       causal=True, train=True, target=1.5),
        attention_case("sdpa-fwd-mask-B4-H8-1024-D64", "forward, float mask (B, 1, L, S)", 4, 8, 1024, 1024, 64,
                       mask=True, target=1.0),
        attention_case("sdpa-train-dropout-B2-H8-1024-D64", "forward + backward, dropout 0.1, B=2, H=8, L=S=1024",
                       2, 8, 1024, 1024, 64, train=True, dropout=0.1, target=3.0),
        attention_case("sdpa-fwd-causal-B16-H12-256-D64", "forward, causal, B=16, H=12, L=S=256, D=64", 16, 12, 256,
                       256, 64, causal=True, target=1.5),
    ]
