"""Drop-in ``torch.nn.MultiheadAttention`` running seqkernels' fused scaled-dot-product attention.

The class subclasses torch's, so constructor, parameters, ``state_dict`` and everything but ``forward`` are
torch's own. ``forward`` follows ``torch.nn.functional.multi_head_attention_forward`` step by step (torch's own
helpers validate shapes and canonicalize masks, so errors read the same); the attention itself runs the fused
kernel. Attention weights, when asked for, come from a separate softmax pass, since the kernel never forms
them; in training with dropout they come, with the output, from plain PyTorch.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import scaled_dot_product_attention
from .rnn import _FromTorch


def _mha_forward(m, query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal):
    H = m.num_heads
    is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, H)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, bsz, E = query.shape
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=query.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("MultiheadAttention: is_causal needs attn_mask (the causal mask), as in torch")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None  # the kernel's own causal masking replaces the mask
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                      target_type=query.dtype, check_other=False)
        is_causal = False if key_padding_mask is not None else is_causal
        if attn_mask is not None:
            is_causal = False  # the mask given says it all
    for name, t in (("key", key), ("value", value)):
        if t.shape[1] != bsz:
            raise ValueError(f"MultiheadAttention: expected {name} to have query's batch size ({bsz}), got {t.shape[1]}")
    if E != m.embed_dim:
        raise ValueError(f"MultiheadAttention: expected query's embedding dim {m.embed_dim}, got {E}")
    hd = E // H
    if m._qkv_same_embed_dim:
        if key.shape != value.shape:
            raise ValueError(f"MultiheadAttention: key shape {tuple(key.shape)} does not match value's {tuple(value.shape)}")
        q, k, v = F._in_projection_packed(query, key, value, m.in_proj_weight, m.in_proj_bias)
    else:
        b_q, b_k, b_v = m.in_proj_bias.chunk(3) if m.in_proj_bias is not None else (None, None, None)
        q, k, v = F._in_projection(query, key, value, m.q_proj_weight, m.k_proj_weight, m.v_proj_weight, b_q, b_k, b_v)
    S = key.shape[0]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (L, S):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(L, S)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * H, L, S):
                raise RuntimeError(
                    f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be {(bsz * H, L, S)}."
                )
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if m.bias_k is not None:
        k = torch.cat([k, m.bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, m.bias_v.repeat(1, bsz, 1)])
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    q = q.view(L, bsz * H, hd).transpose(0, 1)
    k = k.view(k.shape[0], bsz * H, hd).transpose(0, 1)
    v = v.view(v.shape[0], bsz * H, hd).transpose(0, 1)
    if m.add_zero_attn:
        zeros = torch.zeros(bsz * H, 1, hd, dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    S = k.shape[1]
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, S):
            raise RuntimeError(
                f"MultiheadAttention: expected key_padding_mask of shape {(bsz, S)}, got {tuple(key_padding_mask.shape)}"
            )
        kpm = key_padding_mask.view(bsz, 1, 1, S).expand(-1, H, -1, -1).reshape(bsz * H, 1, S)
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    dropout_p = m.dropout if m.training else 0.0
    q4, k4, v4 = q.view(bsz, H, L, hd), k.view(bsz, H, S, hd), v.view(bsz, H, S, hd)
    mask4 = None
    if attn_mask is not None:
        rows = attn_mask.shape[1]  # L, or 1 for a key padding mask alone (broadcast over queries)
        mask4 = attn_mask.view(bsz, H, rows, S) if attn_mask.shape[0] == bsz * H else attn_mask.view(1, 1, rows, S)

    weights = None
    if need_weights:
        scores = q4 @ k4.transpose(-2, -1) * (1.0 / math.sqrt(hd))
        if mask4 is not None:
            scores = scores + mask4
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:  # the weights returned are the dropped ones, as torch's: compute the output from them
            weights = F.dropout(weights, p=dropout_p)
            out4 = weights @ v4
        else:
            out4 = scaled_dot_product_attention(q4, k4, v4, attn_mask=mask4, is_causal=is_causal)
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not is_batched:
            weights = weights.squeeze(0)
    else:
        out4 = scaled_dot_product_attention(q4, k4, v4, attn_mask=mask4, dropout_p=dropout_p, is_causal=is_causal)
    out = out4.permute(2, 0, 1, 3).reshape(bsz * L, E)
    out = F.linear(out, m.out_proj.weight, m.out_proj.bias).view(L, bsz, E)
    if not is_batched:
        out = out.squeeze(1)
    return out, weights


class MultiheadAttention(_FromTorch, torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with seqkernels' fused attention (same arguments, parameters, outputs)."""

    _torch_cls = torch.nn.MultiheadAttention

    @classmethod
    def _config(cls, module: torch.nn.Module) -> dict:
        # Several constructor arguments are not attributes of the same name: read them off the parameters.
        return dict(embed_dim=module.embed_dim, num_heads=module.num_heads, dropout=module.dropout,
                    bias=module.in_proj_bias is not None, add_bias_kv=module.bias_k is not None,
                    add_zero_attn=module.add_zero_attn, kdim=module.kdim, vdim=module.vdim,
                    batch_first=module.batch_first)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Optional[Tensor] = None,
        need_weights: bool = True,
        attn_mask: Optional[Tensor] = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> Tuple[Tensor, Optional[Tensor]]:
        is_batched = query.dim() == 3
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        out, weights = _mha_forward(self, query, key, value, key_padding_mask, need_weights, attn_mask,
                                    average_attn_weights, is_causal)
        if self.batch_first and is_batched:
            out = out.transpose(1, 0)
        return out, weights
