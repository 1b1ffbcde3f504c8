"""Plain-PyTorch scaled-dot-product attention: the oracle the kernels are checked against.

Exactly ``torch.nn.functional.scaled_dot_product_attention``'s math, written out: scores ``q @ k^T * scale``,
top-left causal mask, bool mask (True takes part) or additive float mask, softmax, dropout, ``@ v``; grouped-query
attention repeats each key/value head over its group of query heads. Rows that see no key give 0 (as torch
2.13's CPU kernels), not NaN. Any device and floating dtype, float64 included; differentiable by autograd.

Dropout is seqkernels' counter-based one (``dropout_keep``), which the kernels regenerate in their backward: a
probability is kept when a hash of (seed, its flat index in the broadcast (batch..., heads, L, S) shape) is at
least p. The seed is drawn from torch's generator, so ``torch.manual_seed`` reproduces it; the C++ kernels drop the
same entries for the same seed. The Triton kernels use Triton's Philox generator instead: their keep mask
(``triton.dropout_keep``) can be passed in as ``dropout_keep_mask``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor


def draw_dropout_seed() -> int:
    """A dropout seed from torch's default generator (so torch.manual_seed reproduces the dropout)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def dropout_keep(seed: int, shape: Sequence[int], p: float) -> Tensor:
    """Which entries of a tensor of `shape` dropout keeps: u >= p, with u in [0, 1) from a SplitMix64 hash of
    (seed, flat index) - the generator of the C++ kernels (csrc/cpu/attention.cpp), in numpy's wrapping uint64."""
    n = math.prod(shape)
    with np.errstate(over="ignore"):
        z = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    u = (z >> np.uint64(40)).astype(np.float64) * (1.0 / 16777216.0)
    return torch.from_numpy(u >= p).reshape(tuple(shape))


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
    dropout_seed: Optional[int] = None,
    dropout_keep_mask: Optional[Tensor] = None,
) -> Tensor:
    """As torch's function; ``dropout_seed`` (drawn from torch's generator when None) keys the dropout, or
    ``dropout_keep_mask`` (bool, broadcastable to the probabilities) gives the entries it keeps."""
    L, S, E = query.shape[-2], key.shape[-2], query.shape[-1]
    scale = 1.0 / math.sqrt(E) if scale is None else scale
    if enable_gqa and query.dim() >= 3 and key.shape[-3] != query.shape[-3]:
        group = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(group, dim=-3)
        value = value.repeat_interleave(group, dim=-3)
    scores = query @ key.transpose(-2, -1) * scale
    if is_causal:
        visible = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    blind = torch.isneginf(scores).all(dim=-1, keepdim=True)  # rows that see no key
    probs = torch.softmax(scores.masked_fill(blind, 0.0), dim=-1).masked_fill(blind, 0.0)
    if dropout_p > 0.0:
        if dropout_keep_mask is not None:
            keep = dropout_keep_mask
        else:
            seed = draw_dropout_seed() if dropout_seed is None else dropout_seed
            keep = dropout_keep(seed, probs.shape, dropout_p).to(probs.device)
        probs = probs * keep / (1.0 - dropout_p)
    return probs @ value
