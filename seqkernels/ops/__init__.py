"""One folder per op family: the reference (oracle) beside each backend's kernels and the autograd Functions."""
