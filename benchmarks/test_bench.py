"""pytest-benchmark view of the suite's cases: ``pytest benchmarks/`` times each side separately (for history and
comparison across runs with pytest-benchmark's tools). The ratios and targets come from ``python -m benchmarks``,
which times both sides in turn."""
import pytest

from benchmarks.cases import attention_cases, recurrent_cases

CASES = recurrent_cases() + attention_cases()


@pytest.mark.parametrize("side", ["torch", "seqkernels"])
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(benchmark, case, side):
    torch_fn, ours_fn, _ = case.build()
    benchmark.group = case.name
    benchmark(torch_fn if side == "torch" else ours_fn)
