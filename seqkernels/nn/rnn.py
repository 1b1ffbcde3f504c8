"""Drop-in replacements for ``torch.nn.LSTM``, ``RNN``, ``LSTMCell`` and ``RNNCell``.

Each class subclasses its ``torch.nn`` twin, so constructor arguments and defaults, parameter names, shapes and
initialization, ``state_dict``, ``repr`` and ``isinstance`` checks are torch's own; only ``forward`` is replaced,
running the recurrence through seqkernels' dispatched ops (C++ kernels on CPU tensors). ``from_torch(module)``
converts an existing module with its weights.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from ..ops.lstm import lstm_cell, lstm_layer, rnn_cell, rnn_layer

_SEQ_ARGS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional")


def _uniform_steps(steps: int, batch: int) -> Tensor:
    """The batch_sizes of a padded batch (every step runs the whole batch), made once per shape: the layer ops read
    it and nothing writes it. torch.compile traces the plain tensor instead (it would ignore the cache, warning)."""
    if torch.compiler.is_compiling():
        return torch.full((steps,), batch, dtype=torch.int64)
    return _cached_uniform_steps(steps, batch)


@functools.lru_cache(maxsize=64)
def _cached_uniform_steps(steps: int, batch: int) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first made under inference_mode: autograd saves it
        return torch.full((steps,), batch, dtype=torch.int64)


class _FromTorch:
    """``from_torch`` for the drop-in modules: a subclass names its torch twin and the constructor arguments that
    are attributes of the same name, or overrides ``_config``."""

    _torch_cls: type
    _config_args: Tuple[str, ...] = ()

    @classmethod
    def _config(cls, module: torch.nn.Module) -> dict:
        return {name: getattr(module, name) for name in cls._config_args}

    @classmethod
    def from_torch(cls, module: torch.nn.Module):
        """A seqkernels module with ``module``'s configuration, weights (same device and dtype) and mode."""
        if not isinstance(module, cls._torch_cls):
            raise TypeError(
                f"{cls.__name__}.from_torch: expected a {cls._torch_cls.__module__}.{cls._torch_cls.__name__}, "
                f"got {type(module).__name__}"
            )
        config = cls._config(module)
        first = next(module.parameters())
        new = cls(**config, device=first.device, dtype=first.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new


def _check_state(name: str, arg: str, state: Tensor, input: Tensor) -> None:
    if state.dtype != input.dtype:
        raise ValueError(f"{name}: expected {arg} to have the dtype of input ({input.dtype}), got {state.dtype}")
    if state.device != input.device:
        raise ValueError(f"{name}: expected {arg} on the device of input ({input.device}), got {state.device}")


def _stack(states: List[Tensor]) -> Tensor:
    """The final states of every layer and direction as one (layers * directions, ...) tensor; a single one as a
    view of the layer op's own fresh output, sparing torch.stack's copy."""
    return states[0].unsqueeze(0) if len(states) == 1 else torch.stack(states)


def _recurrent_forward(module, input, hx, is_lstm: bool):
    """torch.nn.LSTM / RNN forward semantics, one dispatched layer op per layer and direction."""
    name = type(module).__name__
    num_directions = 2 if module.bidirectional else 1
    proj_size = getattr(module, "proj_size", 0)
    real_hidden = proj_size if proj_size > 0 else module.hidden_size
    state_names = ("hx[0] (h_0)", "hx[1] (c_0)") if is_lstm else ("hx (h_0)",)

    if isinstance(input, PackedSequence):
        data, batch_sizes, sorted_indices, unsorted_indices = input
        checked, is_batched, batch_dim = data, True, 1
        if data.dim() != 2:
            raise ValueError(f"{name}: expected PackedSequence data to be 2-D (steps, input_size), got {data.dim()}-D")
        rows = data
    else:
        if not isinstance(input, Tensor):
            raise TypeError(f"{name}: expected input to be a Tensor or PackedSequence, got {type(input).__name__}")
        if input.dim() not in (2, 3):
            raise ValueError(f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead")
        batch_sizes = sorted_indices = unsorted_indices = None
        is_batched = input.dim() == 3
        batch_dim = 0 if module.batch_first else 1
        if not is_batched:
            input = input.unsqueeze(batch_dim)
        checked = input
        x = input.transpose(0, 1) if module.batch_first else input
        if x.shape[0] == 0:
            raise ValueError(f"{name}: expected input to have a sequence length larger than 0, got 0")
        rows = x.reshape(x.shape[0] * x.shape[1], x.shape[2])  # time-major rows: the packed layout, equal lengths
    B = x.shape[1] if batch_sizes is None else int(batch_sizes[0])

    zero_states = hx is None
    if zero_states:
        shape = (module.num_layers * num_directions, B)
        h0 = torch.zeros(*shape, real_hidden, dtype=rows.dtype, device=rows.device)
        if is_lstm:  # the ops only read the initial states: one zero tensor serves as both where the sizes agree
            same = real_hidden == module.hidden_size
            c0 = h0 if same else torch.zeros(*shape, module.hidden_size, dtype=rows.dtype, device=rows.device)
        hx = (h0, c0) if is_lstm else h0
    else:
        states = tuple(hx) if is_lstm else (hx,)
        if is_lstm and len(states) != 2:
            raise ValueError(f"{name}: expected hx to be a tuple (h_0, c_0), got {len(states)} elements")
        for arg, state in zip(state_names, states):
            if not isinstance(state, Tensor):
                raise TypeError(f"{name}: expected {arg} to be a Tensor, got {type(state).__name__}")
        want = 3 if is_batched else 2
        if any(s.dim() != want for s in states):
            kind = "batched 3-D" if is_batched else "unbatched 2-D"
            dims = ", ".join(f"{s.dim()}-D" for s in states)
            raise RuntimeError(f"{name}: for {kind} input, hx should also be {want}-D but got ({dims}) tensors")
        if not is_batched:
            states = tuple(s.unsqueeze(1) for s in states)
        for arg, state in zip(state_names, states):
            _check_state(name, arg, state, rows)
        hx = states if is_lstm else states[0]
    module.check_forward_args(checked, hx, batch_sizes)  # torch's own shape and dtype checks and messages
    if sorted_indices is not None and not zero_states:  # zeros need no permutation (torch skips it too)
        hx = module.permute_hidden(hx, sorted_indices)
    h0, c0 = hx if is_lstm else (hx, None)
    steps = batch_sizes if batch_sizes is not None else _uniform_steps(x.shape[0], B)

    layer_input = rows
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(num_directions):
            k = layer * num_directions + direction
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh, b_ih, b_hh = _params(module, suffix, module.bias)
            if is_lstm:
                w_hr = _param(module, "weight_hr" + suffix) if proj_size > 0 else None
                out, h, c = lstm_layer(layer_input, steps, h0[k], c0[k], w_ih, w_hh, b_ih, b_hh, w_hr, direction == 1)
                c_n.append(c)
            else:
                out, h = rnn_layer(
                    layer_input, steps, h0[k], w_ih, w_hh, b_ih, b_hh, module.nonlinearity, direction == 1
                )
            outputs.append(out)
            h_n.append(h)
        layer_input = torch.cat(outputs, 1) if num_directions == 2 else outputs[0]
        if module.dropout > 0 and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, True)
    output = layer_input
    if batch_sizes is None:
        output = output.view(x.shape[0], B, output.shape[1])
    hidden = (_stack(h_n), _stack(c_n)) if is_lstm else _stack(h_n)

    if batch_sizes is not None:
        return (
            PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices),
            module.permute_hidden(hidden, unsorted_indices),
        )
    if module.batch_first:
        output = output.transpose(0, 1)
    if not is_batched:
        output = output.squeeze(batch_dim)
        hidden = tuple(s.squeeze(1) for s in hidden) if is_lstm else hidden.squeeze(1)
    return output, hidden


class LSTM(_FromTorch, torch.nn.LSTM):
    """``torch.nn.LSTM`` with seqkernels' recurrence (same arguments, parameters, inputs and outputs)."""

    _torch_cls = torch.nn.LSTM
    _config_args = _SEQ_ARGS + ("proj_size",)

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[Tuple[Tensor, Tensor]] = None
    ) -> Tuple[Union[Tensor, PackedSequence], Tuple[Tensor, Tensor]]:
        return _recurrent_forward(self, input, hx, is_lstm=True)


class RNN(_FromTorch, torch.nn.RNN):
    """``torch.nn.RNN`` (tanh or relu) with seqkernels' recurrence."""

    _torch_cls = torch.nn.RNN
    _config_args = _SEQ_ARGS + ("nonlinearity",)

    def forward(
        self, input: Union[Tensor, PackedSequence], hx: Optional[Tensor] = None
    ) -> Tuple[Union[Tensor, PackedSequence], Tensor]:
        return _recurrent_forward(self, input, hx, is_lstm=False)


def _cell_inputs(name: str, input: Tensor, states):
    """torch's cell conventions: 1-D (unbatched) or 2-D input, states default to zeros."""
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}: expected input to be a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
    for idx, value in enumerate(states or ()):
        if not isinstance(value, Tensor):
            raise TypeError(f"{name}: expected hx[{idx}] to be a Tensor, got {type(value).__name__}")
        if value.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
    is_batched = input.dim() == 2
    if not is_batched:
        input = input.unsqueeze(0)
        states = tuple(s.unsqueeze(0) for s in states) if states is not None else None
    return input, states, is_batched


def _param(module, name: str) -> Tensor:
    """A parameter read from the module's parameter dict where it lives there: nn.Module's attribute lookup costs
    about half a microsecond per name, which shows in step loops, and several times that when the caches are cold
    after a layer's kernel. Parametrized weights (torch.nn.utils.parametrize) are properties instead, read as
    attributes."""
    found = module._parameters.get(name)
    return found if found is not None else getattr(module, name)


def _params(module, suffix: str = "", bias: bool = True) -> Tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """weight_ih, weight_hh, bias_ih, bias_hh of a cell or of a layer and direction (`suffix`, as "_l0_reverse");
    the biases None without bias."""
    w_ih, w_hh = _param(module, "weight_ih" + suffix), _param(module, "weight_hh" + suffix)
    if not bias:
        return w_ih, w_hh, None, None
    return w_ih, w_hh, _param(module, "bias_ih" + suffix), _param(module, "bias_hh" + suffix)


class LSTMCell(_FromTorch, torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` running seqkernels' fused cell kernel."""

    _torch_cls = torch.nn.LSTMCell
    _config_args = ("input_size", "hidden_size", "bias")

    def forward(self, input: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor]:
        if type(hx) is tuple and isinstance(input, Tensor) and input.dim() == 2:  # the step-loop case, kept lean
            params = self._parameters
            try:
                return lstm_cell(input, hx, params["weight_ih"], params["weight_hh"], params["bias_ih"],
                                 params["bias_hh"])
            except (KeyError, ValueError, TypeError):
                pass  # parametrized weights (no dict entry) or bad input: the full path below handles both

        if hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError("LSTMCell: expected hx to be a tuple (h_0, c_0) of two tensors")
        input, states, is_batched = _cell_inputs("LSTMCell", input, hx)
        if states is None:
            zeros = torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
            states = (zeros, zeros)
        h, c = lstm_cell(input, tuple(states), *_params(self, "", self.bias))
        if not is_batched:
            h, c = h.squeeze(0), c.squeeze(0)
        return h, c


class RNNCell(_FromTorch, torch.nn.RNNCell):
    """``torch.nn.RNNCell`` (tanh or relu) running seqkernels' fused cell kernel."""

    _torch_cls = torch.nn.RNNCell
    _config_args = ("input_size", "hidden_size", "bias", "nonlinearity")

    def forward(self, input: Tensor, hx: Optional[Tensor] = None) -> Tensor:
        if isinstance(hx, Tensor) and isinstance(input, Tensor) and input.dim() == 2:  # the step-loop case, kept lean
            try:
                return rnn_cell(input, hx, *_params(self, "", self.bias), self.nonlinearity)
            except (ValueError, TypeError):
                pass  # bad input: the full path below reports it in torch's words

        input, states, is_batched = _cell_inputs("RNNCell", input, None if hx is None else (hx,))
        h0 = (
            states[0]
            if states is not None
            else torch.zeros(input.size(0), self.hidden_size, dtype=input.dtype, device=input.device)
        )
        h = rnn_cell(input, h0, *_params(self, "", self.bias), self.nonlinearity)
        return h if is_batched else h.squeeze(0)
