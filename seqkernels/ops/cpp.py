"""What the C++ kernels of ``seqkernels._C`` take, shared by every op's ``cpu.py``."""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import Tensor

from .. import _ext

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The type the kernels compute in (csrc/common.h, compute_type): float32 for bfloat16, else the dtype."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


def supports(*tensors: Optional[Tensor]) -> List[str]:
    """Why the C++ kernels cannot take these (already validated) arguments; empty if they can."""
    for t in tensors:
        if t is None:
            continue
        if t.dtype not in DTYPES:
            return [f"the cpu kernels take float32, float64 and bfloat16, got {t.dtype}"]
        if t.layout != torch.strided:
            return [f"the cpu kernels take dense tensors, got layout {t.layout}"]
    return []


def bind_ops(namespace: Dict[str, object], names: Iterable[str]) -> None:
    """Once the extension has loaded, bind each op's overload ``torch.ops.seqkernels.<name>.default`` as
    ``namespace[name]``: looking ops up on torch.ops costs about half a microsecond per call, which shows in
    cell-step loops. The ops are called only through a backend the dispatcher chose, so only once loaded."""
    names = tuple(names)

    def bind() -> None:
        for name in names:
            namespace[name] = getattr(torch.ops.seqkernels, name).default

    _ext.on_load(bind)
