"""Drop-in ``torch.nn`` modules backed by seqkernels' kernels."""
from .rnn import LSTM, RNN, LSTMCell, RNNCell

__all__ = ["LSTM", "LSTMCell", "RNN", "RNNCell"]
