"""``python -m seqkernels``: environment and backend report."""
from __future__ import annotations

import os
import platform
import sys

import torch

import seqkernels
from seqkernels.backends import BACKENDS, ENV_VAR, backend_status, forced_backend


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except Exception as exc:
        return f"not available ({type(exc).__name__})"


def report() -> str:
    lines = [
        f"seqkernels {seqkernels.__version__}",
        f"python     {platform.python_version()} ({sys.executable})",
        f"platform   {platform.platform()}, {platform.machine()}",
        f"torch      {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; oneDNN {torch.backends.mkldnn.is_available()})",
        f"triton     {_version('triton')}",
        f"numpy      {_version('numpy')}",
        f"threads    intra-op {torch.get_num_threads()}, inter-op {torch.get_num_interop_threads()}, "
        f"cpus {os.cpu_count()}",
        f"cuda       {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no device'}",
        f"forced     {forced_backend() or f'none (automatic; {ENV_VAR} unset)'}",
        "",
        "backend    available  reason",
    ]
    for name in BACKENDS:
        ok, why = backend_status(name)
        lines.append(f"{name:<10} {'yes' if ok else 'no':<10} {why}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
