"""Backend registry and per-call backend selection.

Backends:
  ``reference``  plain PyTorch: any device and floating dtype (float64 included); the oracle the kernels are
                 checked against.
  ``cpu``        the C++ kernels of ``seqkernels._C`` (CPU tensors; float32, float64, bfloat16).
  ``triton``     Triton kernels: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
  ``cuda``       CUDA C++ kernels of ``seqkernels._C`` built against a CUDA torch.

Each op registers one implementation per backend with a ``supports`` function returning the reasons it cannot
take a given call (empty list: it can). Selection is per call: CUDA tensors try triton, cuda, reference; CPU
tensors try cpu, reference. ``use_backend(name)`` or the ``SEQKERNELS_BACKEND`` environment variable force one
backend; a forced backend that cannot take a call raises :class:`BackendError` listing its reasons. An automatic
fallback past a preferred backend is logged once per (op, backend, reasons).

``SEQKERNELS_BACKEND`` is read once, when seqkernels is imported (as torch reads its own environment variables):
the per-call cost of consulting ``os.environ`` showed in cell-step loops. ``use_backend`` is process-wide, like
``torch.backends`` flags: a plain module-level stack, which
``torch.compile`` reads (and guards on) while tracing, where a ``ContextVar`` would break the graph.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from . import _ext

BACKENDS: Tuple[str, ...] = ("reference", "cpu", "triton", "cuda")
PREFERENCE: Dict[str, Tuple[str, ...]] = {
    "cuda": ("triton", "cuda", "reference"),
    "cpu": ("cpu", "reference"),
}
ENV_VAR = "SEQKERNELS_BACKEND"

logger = logging.getLogger("seqkernels")


class BackendError(RuntimeError):
    """A forced backend cannot run a call, or no backend can."""


@dataclass(frozen=True)
class Implementation:
    op: str
    backend: str
    fn: Callable
    supports: Optional[Callable[..., List[str]]]


_registry: Dict[str, Dict[str, Implementation]] = {}
_forced: List[Optional[str]] = []  # innermost use_backend last
_status_cache: Dict[str, Tuple[bool, str]] = {}
_env_backend: Optional[str] = os.environ.get(ENV_VAR) or None
_logged: set = set()


def register(op: str, backend: str, supports: Optional[Callable[..., List[str]]] = None):
    """Decorator: ``fn`` implements ``op`` on ``backend``; ``supports(*args, **kwargs)`` lists why not."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")

    def decorate(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = Implementation(op, backend, fn, supports)
        return fn

    return decorate


def _check_name(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown seqkernels backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]) -> Iterator[None]:
    """Force backend ``name`` for calls in this context (``None``: automatic selection, even where
    ``SEQKERNELS_BACKEND`` is set)."""
    if name is not None:
        _check_name(name, "use_backend")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


def forced_backend() -> Optional[str]:
    """The backend forced by :func:`use_backend` or, failing that, by ``SEQKERNELS_BACKEND``."""
    if _forced:
        return _forced[-1]
    if _env_backend is not None:
        return _check_name(_env_backend, ENV_VAR)
    return None


def _triton_status() -> Tuple[bool, str]:
    try:
        import triton
    except Exception as exc:
        return False, f"triton is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1): runs on CPU tensors"
    return False, f"triton {triton.__version__} is installed but there is no CUDA device (TRITON_INTERPRET=1 runs its kernels on CPU tensors)"


def _status(name: str) -> Tuple[bool, str]:
    if name == "reference":
        return True, "plain PyTorch: any device, any floating dtype"
    if name == "cpu":
        if not _ext.load():
            return False, f"C++ extension seqkernels._C is not available ({_ext.error()})"
        return True, f"C++ kernels in {_ext.path()}"
    if name == "triton":
        return _triton_status()
    if name == "cuda":
        if torch.version.cuda is None:
            return False, "this torch build has no CUDA support"
        if not _ext.load():
            return False, f"C++ extension seqkernels._C is not available ({_ext.error()})"
        if not _ext.has_kernel("lstm_cell_fwd", "CUDA"):
            return False, "seqkernels._C was built without CUDA sources"
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        return True, f"CUDA C++ kernels on {torch.cuda.get_device_name()}"
    raise ValueError(f"unknown backend {name!r}")


def backend_status(name: str) -> Tuple[bool, str]:
    """``(available, reason)`` for one backend, independent of any particular call."""
    _check_name(name, "backend_status")
    # The triton status depends on TRITON_INTERPRET, which tests toggle; the others are fixed per process.
    if name == "triton":
        return _triton_status()
    if name not in _status_cache:
        _status_cache[name] = _status(name)
    return _status_cache[name]


def available_backends() -> Dict[str, Tuple[bool, str]]:
    """``{name: (available, reason)}`` for every backend."""
    return {name: backend_status(name) for name in BACKENDS}


def _device_reasons(name: str, device: torch.device) -> List[str]:
    if name == "reference":
        return []
    if name == "cpu" and device.type != "cpu":
        return [f"the cpu backend runs CPU tensors, got tensors on {device}"]
    if name == "cuda" and device.type != "cuda":
        return [f"the cuda backend runs CUDA tensors, got tensors on {device}"]
    if name == "triton" and device.type not in ("cuda", "cpu"):
        return [f"the triton backend runs CUDA tensors, got tensors on {device}"]
    if name == "triton" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return ["the triton backend runs CPU tensors only under TRITON_INTERPRET=1"]
    return []


def reasons(name: str, op: str, device: torch.device, *args, **kwargs) -> List[str]:
    """Why backend ``name`` cannot run ``op`` on this call (empty: it can)."""
    ok, why = backend_status(name)
    if not ok:
        return [why]
    found = _device_reasons(name, device)
    if found:
        return found
    impl = _registry.get(op, {}).get(name)
    if impl is None:
        return [f"the {name} backend has no kernel for {op}"]
    return impl.supports(*args, **kwargs) if impl.supports is not None else []


def select(op: str, device: torch.device, *args, **kwargs) -> Implementation:
    """The implementation of ``op`` that runs this call (arguments are passed to each ``supports``)."""
    forced = forced_backend()
    if forced is not None:
        why = reasons(forced, op, device, *args, **kwargs)
        if why:
            raise BackendError(
                f"seqkernels backend {forced!r} was forced but cannot run {op} on this call: " + "; ".join(why)
            )
        return _registry[op][forced]
    rejected: List[str] = []
    for name in PREFERENCE.get(device.type, ("reference",)):
        why = reasons(name, op, device, *args, **kwargs)
        if not why:
            if rejected:
                key = (op, name, tuple(rejected))
                if key not in _logged:
                    _logged.add(key)
                    logger.warning("seqkernels: %s runs on the %s backend: %s", op, name, "; ".join(rejected))
            return _registry[op][name]
        rejected.append(f"{name}: {'; '.join(why)}")
    raise BackendError(f"no seqkernels backend can run {op} on this call: " + " | ".join(rejected))
