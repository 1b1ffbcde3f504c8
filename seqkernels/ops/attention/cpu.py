"""The C++ CPU attention kernels (``torch.ops.seqkernels.sdpa_fwd`` / ``sdpa_bwd``, ``csrc/cpu/attention.cpp``):
what they take, and their fake kernels for ``torch.compile``."""
from __future__ import annotations

from typing import List

import torch

from ... import _ext

DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def supports(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> List[str]:
    why = []
    if query.dtype not in DTYPES:
        why.append(f"the cpu kernels take float32, float64 and bfloat16, got {query.dtype}")
    if any(t.layout != torch.strided for t in (query, key, value)):
        why.append("the cpu kernels take dense tensors")
    return why


def _compute_dtype(dtype):
    return torch.float32 if dtype == torch.bfloat16 else dtype


def _register_fakes() -> None:
    @torch.library.register_fake("seqkernels::sdpa_fwd")
    def _sdpa_fwd(query, key, value, attn_mask, is_causal, scale, dropout_p, seed):
        Z, H, L, _ = query.shape
        return query.new_empty(Z, H, L, value.shape[-1]), query.new_empty(Z, H, L, dtype=_compute_dtype(query.dtype))

    @torch.library.register_fake("seqkernels::sdpa_bwd")
    def _sdpa_bwd(grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, dropout_p, seed, mask_grad):
        Z, H, L, _ = query.shape
        dmask = query.new_empty(Z, H, L, key.shape[2], dtype=_compute_dtype(query.dtype)) if mask_grad else query.new_empty(0, dtype=_compute_dtype(query.dtype))
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dmask


_ext.on_load(_register_fakes)


def sdpa_fwd(query, key, value, attn_mask, is_causal, scale, dropout_p, seed):
    return torch.ops.seqkernels.sdpa_fwd(query, key, value, attn_mask, is_causal, scale, dropout_p, seed)


def sdpa_bwd(grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, dropout_p, seed, mask_grad):
    return torch.ops.seqkernels.sdpa_bwd(
        grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, dropout_p, seed, mask_grad
    )
