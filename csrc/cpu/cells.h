// The inference cell steps of csrc/cpu/lstm.cpp, for the direct Python bindings of csrc/python.cpp (the same
// kernels are registered as the ops lstm_cell_fwd and rnn_cell_fwd).
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

namespace seqkernels {

// lstm_cell_fwd for inference: the same checks and kernels, without the saved gates (kept in a per-thread scratch
// buffer where the kernel allows): returns (hy, cy).
std::tuple<at::Tensor, at::Tensor> lstm_cell_step(const at::Tensor& input, const at::Tensor& hx,
                                                  const at::Tensor& cx, const at::Tensor& w_ih,
                                                  const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                                                  const std::optional<at::Tensor>& b_hh);

// One Elman RNN step ('tanh' or 'relu'): returns hy.
at::Tensor rnn_cell_fwd(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, const std::string& nonlinearity);

}  // namespace seqkernels
