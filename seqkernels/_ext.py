"""Loads the C++ extension ``seqkernels._C`` once, on first use, and keeps the error when it cannot.

Importing ``seqkernels._C`` runs its ``TORCH_LIBRARY`` initializers, which define the ``torch.ops.seqkernels``
ops. Nothing here runs at ``import seqkernels``; a missing or broken extension shows up as the reason the ``cpu``
(and ``cuda``) backends are unavailable, never as an import error.
"""
from __future__ import annotations

import importlib
import threading
from typing import Callable, List, Optional

import torch

_lock = threading.Lock()
_loaded: Optional[bool] = None
_error: Optional[str] = None
_path: Optional[str] = None
_on_load: List[Callable[[], None]] = []


def _constant_under_compile(fn: Callable[[], bool]) -> Callable[[], bool]:
    """What torch.compiler.assume_constant_result does (Dynamo runs ``fn`` eagerly and takes its result as a
    constant), without that function's import of torch._dynamo (and with it triton) at ``import seqkernels``."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


# Under torch.compile the first call runs eagerly and its result is a constant of the graph: the import and its
# lock cannot be traced, and the answer never changes once known.
@_constant_under_compile
def load() -> bool:
    """Import the extension if not tried yet; return whether it is loaded."""
    global _loaded, _error, _path
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            try:
                module = importlib.import_module("seqkernels._C")
                _path = getattr(module, "__file__", None)
                for hook in _on_load:
                    hook()
                _loaded = True
            except Exception as exc:  # ImportError, OSError (undefined symbol), RuntimeError (op redefinition)
                _error = f"{type(exc).__name__}: {exc}"
                _loaded = False
    return _loaded


def error() -> Optional[str]:
    """Why the extension could not be loaded (None if it loaded or was not tried)."""
    return _error


def path() -> Optional[str]:
    return _path


def on_load(hook: Callable[[], None]) -> None:
    """Run ``hook`` once the extension has loaded (now, if it already has): used to register fake kernels."""
    if _loaded:
        hook()
    else:
        _on_load.append(hook)


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``seqkernels::<op>`` has a kernel registered for ``dispatch_key`` (e.g. "CPU", "CUDA")."""
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key(f"seqkernels::{op}", dispatch_key)
