"""What every Triton kernel file shares: the matmul helper, the matmul precision per dtype, and the launch entry
point through which every kernel runs (which the compile report, ``seqkernels.triton_report``, records instead of
running, so that it compiles exactly what the launchers would launch)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, List, Optional, Tuple

import torch
import triton
import triton.language as tl

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def dot(a, b, PREC: tl.constexpr):
    """tl.dot with float32 accumulation. PREC "upcast" is for Triton's interpreter only, whose tl.dot mishandles
    bfloat16 operands: it multiplies them as float32, which is exact for bfloat16 values."""
    if PREC == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b, input_precision=PREC)


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: 3xTF32 (float32 accuracy on tensor cores) for float32, native for half types
    ("upcast" under the interpreter for bfloat16: see ``dot``)."""
    if dtype == torch.float32:
        return "tf32x3"
    if dtype == torch.bfloat16 and triton.knobs.runtime.interpret:
        return "upcast"
    return "ieee"


def dtype_reasons(dtype: torch.dtype) -> List[str]:
    if dtype not in DTYPES:
        return [f"the triton kernels take float16, bfloat16 and float32, got {dtype}"]
    return []


Launch = Tuple[Any, Tuple[int, ...], Tuple[Any, ...], dict]
_recorder: Optional[List[Launch]] = None


def launch(kernel, grid: Tuple[int, ...], *args, **meta) -> None:
    """Run ``kernel[grid](*args, **meta)``, or record it while ``recording()`` is active."""
    if _recorder is not None:
        _recorder.append((kernel, tuple(grid), args, meta))
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def recording() -> Iterator[List[Launch]]:
    """Record launches instead of running them: yields the list they are appended to."""
    global _recorder
    previous, _recorder = _recorder, []
    try:
        yield _recorder
    finally:
        _recorder = previous
