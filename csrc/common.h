// Input validation shared by every C++ entry point. Each op checks all of its arguments here before any
// kernel touches memory; a message names the op, the argument, what was expected and what came.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace seqkernels {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16;
}

inline void check_cpu_float(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got None");
  TORCH_CHECK(t.device().is_cpu(), op, ": expected ", name, " to be a CPU tensor, got a tensor on ",
              t.device());
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": expected ", name,
              " to have dtype float32, float64 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.layout() == at::kStrided, op, ": expected ", name, " to be a dense (strided) tensor, got ",
              t.layout());
}

// `name` must match `ref` (named `ref_name`) in dtype and device.
inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": expected ", name, " to have the dtype of ", ref_name,
              " (", ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TORCH_CHECK(t.dim() == dim, op, ": expected ", name, " to be ", dim, "-D ", layout, ", got a ", t.dim(),
              "-D tensor of shape ", t.sizes());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                        const char* layout) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, " ", layout, ", got ",
              t.sizes());
}

// A full check of one tensor argument against the reference argument of the op.
inline void check_arg(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                      const char* layout, const char* ref_name, const at::Tensor& ref) {
  check_cpu_float(op, name, t);
  check_same_dtype(op, name, t, ref_name, ref);
  check_shape(op, name, t, expected, layout);
}

// b_ih and b_hh: both tensors of shape (rows) matching input, or both None.
inline void check_biases(const char* op, const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh, int64_t rows, const char* layout,
                         const at::Tensor& input) {
  TORCH_CHECK(b_ih.has_value() == b_hh.has_value(), op,
              ": expected b_ih and b_hh to be both tensors or both None, got b_ih ",
              b_ih.has_value() ? "a tensor" : "None", " and b_hh ", b_hh.has_value() ? "a tensor" : "None");
  if (b_ih.has_value()) {
    check_arg(op, "b_ih", *b_ih, {rows}, layout, "input", input);
    check_arg(op, "b_hh", *b_hh, {rows}, layout, "input", input);
  }
}

// The RNN nonlinearity: returns true for "relu", false for "tanh".
inline bool is_relu(const char* op, const std::string& nonlinearity) {
  TORCH_CHECK(nonlinearity == "tanh" || nonlinearity == "relu", op,
              ": expected nonlinearity to be 'tanh' or 'relu', got '", nonlinearity, "'");
  return nonlinearity == "relu";
}

// bfloat16 inputs are computed in float32 (matmul accumulation, activations, state); others in their own type.
inline at::ScalarType compute_type(at::ScalarType t) {
  return t == at::kBFloat16 ? at::kFloat : t;
}

// t in dtype `type`: t itself, without a dispatched call, when it already is (a cell step's fixed cost is a few
// microseconds, and each dispatched no-op conversion is a tenth of one).
inline at::Tensor as_type(const at::Tensor& t, at::ScalarType type) {
  return t.scalar_type() == type ? t : t.to(type);
}

inline at::Tensor to_compute(const at::Tensor& t) {
  return as_type(t, compute_type(t.scalar_type())).contiguous();
}

}  // namespace seqkernels
