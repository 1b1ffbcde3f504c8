"""Drop-in ``torch.nn`` modules backed by seqkernels' kernels."""
from .attention import MultiheadAttention
from .rnn import LSTM, RNN, LSTMCell, RNNCell

__all__ = ["LSTM", "LSTMCell", "MultiheadAttention", "RNN", "RNNCell"]
