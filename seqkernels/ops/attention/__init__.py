"""Scaled-dot-product attention: ``reference.py`` (the oracle), ``cpu.py`` (C++ kernels), ``function.py``
(validation, autograd Function, dispatched entry point)."""
from .function import scaled_dot_product_attention

__all__ = ["scaled_dot_product_attention"]
