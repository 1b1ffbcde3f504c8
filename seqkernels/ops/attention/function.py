"""Scaled-dot-product attention: argument validation (torch's rules), the autograd Function over the kernels,
and the dispatched entry point."""
from __future__ import annotations

import math
from types import ModuleType
from typing import Optional

import torch
from torch import Tensor

from ... import backends
from . import cpu, reference


class SDPAFunction(torch.autograd.Function):
    """Canonical (Z, H, L, E) tensors in; saves only the output and the log-sum-exp besides the inputs."""

    @staticmethod
    def forward(ctx, kernels: ModuleType, q, k, v, mask, is_causal: bool, scale: float, dropout_p: float, seed: int):
        out, lse = kernels.sdpa_fwd(q, k, v, mask, is_causal, scale, dropout_p, seed)
        ctx.kernels, ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.seed = kernels, is_causal, scale, dropout_p, seed
        ctx.mask_grad = mask is not None and mask.requires_grad
        ctx.save_for_backward(q, k, v, mask, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse = ctx.saved_tensors
        dq, dk, dv, dmask = ctx.kernels.sdpa_bwd(
            grad_out, q, k, v, mask, out, lse, ctx.is_causal, ctx.scale, ctx.dropout_p, ctx.seed, ctx.mask_grad
        )
        return None, dq, dk, dv, (dmask.to(mask.dtype) if ctx.mask_grad else None), None, None, None, None


def _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    op = "scaled_dot_product_attention"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{op}: expected {name} to have at least 2 dims (..., length, features), got {t.dim()}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: expected {name} to have a floating dtype, got {t.dtype}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise ValueError(f"{op}: expected {name} to have the dtype of query ({query.dtype}), got {t.dtype}")
        if t.device != query.device:
            raise ValueError(f"{op}: expected {name} on the device of query ({query.device}), got {t.device}")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(
            f"{op}: expected key's last dim to equal query's (E = {query.shape[-1]}), got {key.shape[-1]}"
        )
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(
            f"{op}: expected value to have key's sequence length (S = {key.shape[-2]}), got {value.shape[-2]}"
        )
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{op}: expected dropout_p in [0, 1), got {dropout_p}")
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"{op}: expected a finite scale, got {scale}")
    if enable_gqa:
        if query.dim() < 3 or key.dim() < 3 or value.dim() < 3:
            raise ValueError(f"{op}: enable_gqa needs a heads dim (..., heads, length, features) on every input")
        hq, hk, hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if hk != hv or hq % hk:
            raise ValueError(
                f"{op}: with enable_gqa, expected key and value heads to be equal and to divide the query heads "
                f"({hq}), got {hk} and {hv}"
            )
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"{op}: expected attn_mask to be None when is_causal=True (as torch), got a mask")
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"{op}: expected attn_mask to be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise ValueError(
                f"{op}: expected attn_mask to be bool or of query's dtype ({query.dtype}), got {attn_mask.dtype}"
            )
        if attn_mask.device != query.device:
            raise ValueError(f"{op}: expected attn_mask on the device of query ({query.device}), got {attn_mask.device}")


def _canonical(query, key, value, attn_mask, enable_gqa):
    """(Z, Hq, L, E), (Z, Hkv, S, E), (Z, Hkv, S, Ev), mask view (Z, Hq, L, S) or None, and the output shape."""
    op = "scaled_dot_product_attention"
    q, k, v = (t if t.dim() >= 3 else t.unsqueeze(0) for t in (query, key, value))
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if not enable_gqa and not (hk == hv and hk in (1, hq)):
        try:  # plain broadcasting of the heads dim, as torch's matmuls would
            heads = torch.broadcast_shapes((hq,), (hk,), (hv,))[0]
        except RuntimeError:
            raise ValueError(f"{op}: query, key and value heads ({hq}, {hk}, {hv}) do not broadcast") from None
        k, v = k.expand(*k.shape[:-3], heads, *k.shape[-2:]), v.expand(*v.shape[:-3], heads, *v.shape[-2:])
        hq, hk = heads, heads
    try:
        batch = torch.broadcast_shapes(q.shape[:-3], k.shape[:-3], v.shape[:-3])
    except RuntimeError:
        raise ValueError(
            f"{op}: batch dims of query {tuple(q.shape[:-3])}, key {tuple(k.shape[:-3])} and value "
            f"{tuple(v.shape[:-3])} do not broadcast"
        ) from None
    Z = math.prod(batch)
    L, E, S, Ev = q.shape[-2], q.shape[-1], k.shape[-2], v.shape[-1]
    q4 = q.expand(*batch, hq, L, E).reshape(Z, hq, L, E).contiguous()
    k4 = k.expand(*batch, hk, S, E).reshape(Z, hk, S, E).contiguous()
    v4 = v.expand(*batch, hk, S, Ev).reshape(Z, hk, S, Ev).contiguous()
    mask4 = None
    if attn_mask is not None:
        full = (*batch, hq, L, S)
        try:
            mask4 = attn_mask.expand(full)
        except RuntimeError:
            raise ValueError(
                f"{op}: expected attn_mask to broadcast to {full} (batch, heads, L, S), got {tuple(attn_mask.shape)}"
            ) from None
        if mask4.dtype == torch.bfloat16:
            mask4 = mask4.float()  # the kernels add float masks in the compute type
        mask4 = mask4.reshape(Z, hq, L, S)  # a view unless several broadcast batch dims must be merged
    out_shape = (*batch, hq, L, Ev) if query.dim() >= 3 else (L, Ev)
    return q4, k4, v4, mask4, out_shape


@backends.register("sdpa", "reference")
def _sdpa_reference(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return reference.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _run_kernels(kernels: ModuleType, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Run a kernel backend (a module with ``sdpa_fwd`` / ``sdpa_bwd``) on canonical tensors, with autograd when
    any input needs a gradient."""
    q4, k4, v4, mask4, out_shape = _canonical(query, key, value, attn_mask, enable_gqa)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    seed = reference.draw_dropout_seed() if dropout_p > 0.0 else 0
    tensors = (q4, k4, v4, mask4)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out = SDPAFunction.apply(kernels, q4, k4, v4, mask4, is_causal, scale, float(dropout_p), seed)
    else:
        out, _ = kernels.sdpa_fwd(q4, k4, v4, mask4, is_causal, scale, float(dropout_p), seed)
    return out.reshape(out_shape)


@backends.register("sdpa", "cpu", supports=cpu.supports)
def _sdpa_cpu(*args):
    return _run_kernels(cpu, *args)


def _triton_kernels() -> ModuleType:
    from . import triton as kernels  # imports triton: only once the triton backend is chosen or asked

    return kernels


@backends.register("sdpa", "triton", supports=lambda *args: _triton_kernels().supports(*args))
def _sdpa_triton(*args):
    return _run_kernels(_triton_kernels(), *args)


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
    """``torch.nn.functional.scaled_dot_product_attention`` with fused kernels.

    query (..., L, E), key (..., S, E), value (..., S, Ev); leading dims broadcast; with ``enable_gqa`` the
    heads dim (-3) of key/value may divide query's. ``attn_mask``: bool (True takes part) or float (added),
    broadcastable to (..., L, S). ``is_causal``: top-left aligned, as torch. ``scale`` defaults to 1/sqrt(E).
    Rows that see no key give 0 and no gradient, never NaN. Dropout uses a counter-based generator seeded from
    torch's, so ``torch.manual_seed`` reproduces it and the backward regenerates it without storing a mask (the
    C++ and reference backends share one generator, ``reference.dropout_keep``; the Triton kernels use Triton's
    Philox). On CPU tensors the fused C++ kernel runs forward and backward, on CUDA tensors the Triton kernels:
    both read masks through their broadcast strides and never form the L x S matrix.
    """
    _check(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    args = (query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return backends.select("sdpa", query.device, *args).fn(*args)
