"""LSTM and RNN recurrences: ``reference.py`` (the oracle), ``cpu.py`` (C++ kernels), ``function.py``
(autograd Functions and dispatched entry points)."""
from .function import lstm_cell, lstm_layer, rnn_cell, rnn_layer

__all__ = ["lstm_cell", "rnn_cell", "lstm_layer", "rnn_layer"]
