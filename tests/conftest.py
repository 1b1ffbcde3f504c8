"""Shared test helpers: seeded inputs and the comparison rules of DESIGN.md."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional

import pytest
import torch


# The suite chooses backends explicitly; an inherited SEQKERNELS_BACKEND would change what is tested. It is read
# when seqkernels is imported, so clear both the variable and what was read.
os.environ.pop("SEQKERNELS_BACKEND", None)
# No GPU here: the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a kernel is
# defined, so it is set before anything imports the kernels.
os.environ["TRITON_INTERPRET"] = "1"
import seqkernels.backends  # noqa: E402

seqkernels.backends._env_backend = None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@contextlib.contextmanager
def num_threads(n: Optional[int]) -> Iterator[None]:
    """torch's intra-op thread count set to n (None: unchanged) inside the block, restored after it."""
    previous = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_error_rule(name: str, ours: torch.Tensor, theirs: torch.Tensor, exact: torch.Tensor) -> None:
    """FlashAttention's rule: our error against a float64 result is at most twice torch's error in the same dtype
    (plus a floor of a few units of rounding at the result's scale)."""
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    assert ours.dtype == theirs.dtype, f"{name}: dtype {ours.dtype} != torch's {theirs.dtype}"
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    floor = 8 * torch.finfo(ours.dtype).eps * scale
    e_ours, e_theirs = max_err(ours, exact), max_err(theirs, exact)
    assert e_ours <= 2 * e_theirs + floor, f"{name}: error {e_ours:.3g} > 2 x torch's {e_theirs:.3g} + {floor:.3g}"


def assert_close64(name: str, ours: torch.Tensor, exact: torch.Tensor, tol: float = 1e-10) -> None:
    assert ours.shape == exact.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(exact.shape)}"
    scale = max(1.0, exact.abs().max().item()) if exact.numel() else 1.0
    err = max_err(ours, exact)
    assert err <= tol * scale, f"{name}: error {err:.3g} > {tol * scale:.3g}"


def grads(outputs, inputs, grad_outputs):
    """d(sum(outputs * grad_outputs)) / d(inputs), None where an input is not reached."""
    return torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True)
