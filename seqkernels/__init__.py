"""seqkernels: fused kernels for sequence models (LSTM/RNN recurrences, attention) in PyTorch.

Public API:
  seqkernels.lstm_cell / rnn_cell        functional cell steps (as torch.lstm_cell / rnn_tanh_cell)
  seqkernels.scaled_dot_product_attention   as torch.nn.functional.scaled_dot_product_attention
  seqkernels.nn.LSTM, LSTMCell, RNN, RNNCell   drop-in torch.nn modules
  seqkernels.use_backend(name)           force a backend in a context ("reference", "cpu", "triton", "cuda")
  seqkernels.available_backends()        {name: (available, reason)}

Importing seqkernels loads neither the C++ extension nor triton; both are loaded on first use.
"""
from . import nn
from .backends import BACKENDS, BackendError, available_backends, use_backend
from .ops.attention import scaled_dot_product_attention
from .ops.lstm import lstm_cell, rnn_cell

__version__ = "0.1.0"

__all__ = ["BACKENDS", "BackendError", "available_backends", "use_backend", "lstm_cell", "rnn_cell", "scaled_dot_product_attention", "nn"]
