"""The C++ CPU attention kernels (``torch.ops.seqkernels.sdpa_fwd`` / ``sdpa_bwd``, ``csrc/cpu/attention.cpp``):
what they take, their fake kernels for ``torch.compile``, and the ops themselves as module attributes."""
from __future__ import annotations

from typing import List

import torch

from ... import _ext
from .. import cpp
from ..cpp import compute_dtype


def supports(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> List[str]:
    return cpp.supports(query, key, value)


def _register_fakes() -> None:
    @torch.library.register_fake("seqkernels::sdpa_fwd")
    def _sdpa_fwd(query, key, value, attn_mask, is_causal, scale, dropout_p, seed):
        Z, H, L, _ = query.shape
        return query.new_empty(Z, H, L, value.shape[-1]), query.new_empty(Z, H, L, dtype=compute_dtype(query.dtype))

    @torch.library.register_fake("seqkernels::sdpa_bwd")
    def _sdpa_bwd(grad_out, query, key, value, attn_mask, out, lse, is_causal, scale, dropout_p, seed, mask_grad):
        Z, H, L, _ = query.shape
        dmask = query.new_empty(Z, H, L, key.shape[2], dtype=compute_dtype(query.dtype)) if mask_grad else query.new_empty(0, dtype=compute_dtype(query.dtype))
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value), dmask


_ext.on_load(_register_fakes)


# The ops themselves (argument order as declared in csrc/registration.cpp), bound once the extension has loaded.
cpp.bind_ops(globals(), ("sdpa_fwd", "sdpa_bwd"))
