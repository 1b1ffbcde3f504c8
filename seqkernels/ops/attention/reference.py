"""Plain-PyTorch scaled-dot-product attention: the oracle the kernels are checked against.

Exactly ``torch.nn.functional.scaled_dot_product_attention``'s math, written out: scores ``q @ k^T * scale``,
top-left causal mask, bool mask (True takes part) or additive float mask, softmax, dropout, ``@ v``; grouped-query
attention repeats each key/value head over its group of query heads. Rows that see no key give 0 (as torch
2.13's CPU kernels), not NaN. Any device and floating dtype, float64 included; differentiable by autograd.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor] = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Optional[float] = None,
    enable_gqa: bool = False,
) -> Tensor:
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
        probs = torch.nn.functional.dropout(probs, dropout_p, training=True)
    return probs @ value
