"""The drop-in modules on PyTorch's own module test inputs (torch.testing._internal.common_modules)."""
from __future__ import annotations

import pytest
import torch

import seqkernels


# Needs expecttest (requirements-test.txt). A plain import: a missing dependency must fail, not skip, this suite.
from torch.testing._internal import common_modules  # noqa: E402

KINDS = {torch.nn.LSTM: "LSTM", torch.nn.RNN: "RNN", torch.nn.LSTMCell: "LSTMCell", torch.nn.RNNCell: "RNNCell"}


def _cases():
    # The module_db input functions draw from the global generator at collection time: seeded, so every run tests
    # the same inputs (unseeded, they changed from run to run, and one run drew a float32 case past the tolerance).
    torch.manual_seed(0)
    out = []
    for info in common_modules.module_db:
        if info.module_cls in KINDS:
            for dtype in (torch.float32, torch.float64):
                for training in (True, False):
                    inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                    out += [pytest.param(info.module_cls, i, dtype, training, id=f"{KINDS[info.module_cls]}-{dtype}-{'train' if training else 'eval'}-{k}") for k, i in enumerate(inputs)]
    return out


def _to64(obj):
    """The same inputs in float64, as new leaves (requires_grad kept)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().double().requires_grad_(obj.requires_grad)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to64(o) for o in obj)
    return obj


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


@pytest.mark.parametrize("cls, module_input, dtype, training", _cases())
def test_module_db_inputs(cls, module_input, dtype, training):
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    torch.manual_seed(0)
    ref = cls(*args, **kwargs).to(dtype)
    ours = getattr(seqkernels.nn, KINDS[cls]).from_torch(ref)
    ref.train(training), ours.train(training)
    fwd_args, fwd_kwargs = module_input.forward_input.args, module_input.forward_input.kwargs
    torch.manual_seed(1)
    out_r = _tensors(ref(*fwd_args, **fwd_kwargs))
    torch.manual_seed(1)
    out_o = _tensors(ours(*fwd_args, **fwd_kwargs))
    leaves = [t for t in _tensors(fwd_args) if t.requires_grad]
    upstream = [torch.randn_like(o) for o in out_r]
    g_r = torch.autograd.grad(out_r, leaves + list(ref.parameters()), upstream, allow_unused=True)
    g_o = torch.autograd.grad(out_o, leaves + list(ours.parameters()), upstream, allow_unused=True)
    assert len(out_o) == len(out_r)
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-12)
        for a, b in zip(list(out_o) + list(g_o), list(out_r) + list(g_r)):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, **tol)
        return
    # float32: against the float64 evaluation of the same module and inputs, within float32 rounding. (These
    # modules have 2-3 hidden units: a max-error ratio over so few elements, the FlashAttention rule used by the
    # larger tests, flips on run-to-run rounding noise of the BLAS.)
    exact = cls(*args, **kwargs).double()
    exact.load_state_dict({k: v.double() for k, v in ref.state_dict().items()})
    exact.train(training)
    args64 = _to64(fwd_args)
    torch.manual_seed(1)
    out_x = _tensors(exact(*args64, **fwd_kwargs))
    leaves64 = [t for t in _tensors(args64) if t.requires_grad]
    g_x = torch.autograd.grad(out_x, leaves64 + list(exact.parameters()), [u.double() for u in upstream], allow_unused=True)
    for k, (a, b, c) in enumerate(zip(list(out_o) + list(g_o), list(out_r) + list(g_r), list(out_x) + list(g_x))):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), c, rtol=1e-5, atol=1e-5, msg=lambda m: f"output/grad {k}: {m}")
