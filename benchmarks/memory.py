"""Peak memory of one call, measured in a fresh process: Linux's peak resident set (VmHWM), reset just before the
call (/proc/self/clear_refs), minus the resident set at that moment. The CPU has no allocator statistics like
CUDA's, so this counts what the call really touched.

``python -m benchmarks.memory SIDE`` (torch or seqkernels) prints the bytes for the attention case below; the suite
runs it once per side.
"""
from __future__ import annotations

import subprocess
import sys
from typing import Callable, Optional


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak resident bytes fn() adds above the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def attention_dropout_case(side: str) -> int:
    """Forward + backward with dropout 0.1, B=1, H=4, L=S=4096, D=64 (the attention issue's memory case)."""
    import torch
    import torch.nn.functional as F

    import seqkernels

    fn = F.scaled_dot_product_attention if side == "torch" else seqkernels.scaled_dot_product_attention
    seqkernels.available_backends()
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 4096, 64, generator=gen, requires_grad=True) for _ in range(3))
    grad = torch.randn(1, 4, 4096, 64, generator=gen)

    def step():
        fn(q, k, v, dropout_p=0.1).backward(grad)

    return peak_bytes(step)


def measure_in_subprocess(side: str) -> Optional[int]:
    """The case's peak bytes for one side, in a fresh interpreter (None where /proc is unavailable)."""
    result = subprocess.run([sys.executable, "-m", "benchmarks.memory", side], capture_output=True, text=True)
    if result.returncode != 0:
        print(result.stderr, file=sys.stderr)
        return None
    return int(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(attention_dropout_case(sys.argv[1]))
