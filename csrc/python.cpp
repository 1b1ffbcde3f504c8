// The Python module seqkernels._C. Importing it loads this library, which runs the TORCH_LIBRARY initializers
// of csrc/registration.cpp: the ops are reached through torch.ops.seqkernels.
//
// Besides, two direct bindings for the inference cell step, which Python loops call once per time step: a
// dispatched op call costs a few microseconds of argument boxing and dispatch, as much as the step's work at
// small sizes. They run the same kernels, with the same argument checks, as lstm_cell_fwd and rnn_cell_fwd;
// the callers use them only where no autograd graph is recorded.
#include <torch/extension.h>

#include "cpu/cells.h"

PYBIND11_MODULE(_C, m) {
  m.doc() = "seqkernels C++ ops (see torch.ops.seqkernels) and the direct cell-step bindings";
  m.def("lstm_cell_step", &seqkernels::lstm_cell_step, "lstm_cell_fwd without the saved gates: returns (hy, cy)");
  m.def("rnn_cell_step", &seqkernels::rnn_cell_fwd, "rnn_cell_fwd: returns hy");
}
