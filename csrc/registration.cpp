// Every seqkernels op schema, declared once. Backend files register implementations with
// TORCH_LIBRARY_IMPL(seqkernels, <key>, m); Python registers fake (meta) implementations and autograd.
// The Python module itself (seqkernels._C, whose import runs these initializers) is in csrc/python.cpp.
#include <torch/library.h>

TORCH_LIBRARY(seqkernels, m) {
  // LSTM cell step. gates: the activated gates (i, f, g, o), in float32 for bfloat16 inputs; kept for backward.
  m.def("lstm_cell_fwd(Tensor input, Tensor hx, Tensor cx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh)"
        " -> (Tensor hy, Tensor cy, Tensor gates)");
  m.def("lstm_cell_bwd(Tensor grad_hy, Tensor grad_cy, Tensor input, Tensor hx, Tensor cx, Tensor w_ih,"
        " Tensor w_hh, Tensor cy, Tensor gates)"
        " -> (Tensor grad_input, Tensor grad_hx, Tensor grad_cx, Tensor grad_w_ih, Tensor grad_w_hh,"
        " Tensor grad_bias)");
  // RNN cell step; nonlinearity is 'tanh' or 'relu'.
  m.def("rnn_cell_fwd(Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh,"
        " str nonlinearity) -> Tensor hy");
  m.def("rnn_cell_bwd(Tensor grad_hy, Tensor input, Tensor hx, Tensor w_ih, Tensor w_hh, Tensor hy,"
        " str nonlinearity)"
        " -> (Tensor grad_input, Tensor grad_hx, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");

  // One layer, one direction over a whole packed sequence (see csrc/cpu/recurrence.cpp for the layout):
  // input (N, input_size) rows of all steps, batch_sizes (T,) int64 non-increasing. With train=True the forward
  // also returns the activated gates (N, 4H) and cell states (N, H) for the backward; otherwise both are empty.
  m.def("lstm_seq_fwd(Tensor input, Tensor batch_sizes, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh,"
        " Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool train)"
        " -> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  // grad_w_hr is an empty (0, 0) tensor when w_hr is None.
  m.def("lstm_seq_bwd(Tensor grad_output, Tensor grad_hn, Tensor grad_cn, Tensor input, Tensor batch_sizes,"
        " Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor output, Tensor gates, Tensor cells,"
        " bool reverse)"
        " -> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh,"
        " Tensor grad_bias, Tensor grad_w_hr)");
  m.def("rnn_seq_fwd(Tensor input, Tensor batch_sizes, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih,"
        " Tensor? b_hh, str nonlinearity, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def("rnn_seq_bwd(Tensor grad_output, Tensor grad_hn, Tensor input, Tensor batch_sizes, Tensor h0, Tensor w_ih,"
        " Tensor w_hh, Tensor output, str nonlinearity, bool reverse)"
        " -> (Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias)");
  // Scaled-dot-product attention (see csrc/cpu/attention.cpp for the layout): q (Z, Hq, L, E), k (Z, Hkv, S, E),
  // v (Z, Hkv, S, Ev), Hq a multiple of Hkv; attn_mask a bool or float (Z, Hq, L, S) view, broadcast through
  // strides. Dropout (p in [0, 1)) is drawn from a counter-based generator keyed by seed, so the backward
  // regenerates it. The forward also returns each row's log-sum-exp, for sdpa_bwd only: in base 2 (log2 of the
  // sum of 2^(score * log2 e)), float32 for bfloat16 inputs.
  m.def("sdpa_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, bool is_causal, float scale,"
        " float dropout_p, int seed) -> (Tensor out, Tensor lse)");
  // grad_mask is dense (Z, Hq, L, S) when mask_grad, else empty.
  m.def("sdpa_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor out,"
        " Tensor lse, bool is_causal, float scale, float dropout_p, int seed, bool mask_grad)"
        " -> (Tensor grad_query, Tensor grad_key, Tensor grad_value, Tensor grad_mask)");
}
