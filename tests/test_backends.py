"""Backend selection: automatic choice, forcing (context manager and environment), errors, and the package
working without its C++ extension."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import seqkernels
from seqkernels import backends


def _cell_args(dtype=torch.float32):
    return (torch.randn(2, 3, dtype=dtype), (torch.randn(2, 4, dtype=dtype), torch.randn(2, 4, dtype=dtype)),
            torch.randn(16, 3, dtype=dtype), torch.randn(16, 4, dtype=dtype))


def test_available_backends_reports_every_backend_with_a_reason():
    status = seqkernels.available_backends()
    assert list(status) == ["reference", "cpu", "triton", "cuda"]
    for name, (ok, why) in status.items():
        assert isinstance(ok, bool) and isinstance(why, str) and why, name
    assert status["reference"][0]
    assert status["cpu"][0], status["cpu"][1]  # this suite runs against a built extension


def test_cpu_tensors_pick_the_cpu_backend():
    x, hx, w_ih, w_hh = _cell_args()
    impl = backends.select("lstm_cell", x.device, x, *hx, w_ih, w_hh, None, None)
    assert impl.backend == "cpu"


def test_unsupported_dtype_falls_back_to_reference_and_logs_once(caplog):
    x, hx, w_ih, w_hh = _cell_args(torch.float16)
    with caplog.at_level(logging.WARNING, logger="seqkernels"):
        impl = backends.select("lstm_cell", x.device, x, *hx, w_ih, w_hh, None, None)
        backends.select("lstm_cell", x.device, x, *hx, w_ih, w_hh, None, None)
    assert impl.backend == "reference"
    logged = [r.getMessage() for r in caplog.records if "lstm_cell runs on the reference backend" in r.getMessage()]
    assert len(logged) <= 1  # once per process: an earlier test may already have logged it
    h, c = seqkernels.lstm_cell(x, hx, w_ih, w_hh)
    h_ref, c_ref = torch.lstm_cell(x.float(), tuple(t.float() for t in hx), w_ih.float(), w_hh.float())
    torch.testing.assert_close(h.float(), h_ref, rtol=2e-3, atol=2e-3)


def test_use_backend_forces_and_restores():
    x, hx, w_ih, w_hh = _cell_args()
    with seqkernels.use_backend("reference"):
        assert backends.forced_backend() == "reference"
        assert backends.select("lstm_cell", x.device, x, *hx, w_ih, w_hh, None, None).backend == "reference"
        with seqkernels.use_backend(None):
            assert backends.select("lstm_cell", x.device, x, *hx, w_ih, w_hh, None, None).backend == "cpu"
    assert backends.forced_backend() is None


def test_forced_backend_that_cannot_run_lists_its_reasons():
    x, hx, w_ih, w_hh = _cell_args(torch.float16)
    with seqkernels.use_backend("cpu"), pytest.raises(seqkernels.BackendError, match=r"'cpu' was forced.*float16"):
        seqkernels.lstm_cell(x, hx, w_ih, w_hh)
    with seqkernels.use_backend("cuda"), pytest.raises(seqkernels.BackendError, match=r"'cuda' was forced"):
        seqkernels.lstm_cell(*_cell_args())
    with seqkernels.use_backend("triton"), pytest.raises(seqkernels.BackendError,
                                                         match=r"'triton' was forced.*float32, got torch.float64"):
        seqkernels.lstm_cell(*_cell_args(torch.float64))


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match=r"unknown seqkernels backend 'fast'; expected one of reference, cpu"):
        with seqkernels.use_backend("fast"):
            pass


ENV_CHECK = """
    import torch, seqkernels
    from seqkernels import backends
    x = torch.randn(2, 3)
    hx = (torch.randn(2, 4), torch.randn(2, 4))
    w_ih, w_hh = torch.randn(16, 3), torch.randn(16, 4)
    try:
        print("selected", backends.select("lstm_cell", x.device, x, *hx, w_ih, w_hh, None, None).backend)
        seqkernels.lstm_cell(x, hx, w_ih, w_hh)
        seqkernels.nn.LSTMCell(3, 4)(x, hx)
    except ValueError as e:
        print("error", e)
"""


def test_environment_variable_forces_a_backend():
    result = _run_python(ENV_CHECK, SEQKERNELS_BACKEND="reference")
    assert result.returncode == 0, result.stderr
    assert "selected reference" in result.stdout
    result = _run_python(ENV_CHECK, SEQKERNELS_BACKEND="nope")
    assert "error SEQKERNELS_BACKEND: unknown seqkernels backend 'nope'" in result.stdout, result.stdout + result.stderr


def test_triton_is_allowed_on_cpu_tensors_only_under_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    why = backends.reasons("triton", "lstm_cell", torch.device("cpu"))
    assert why and ("TRITON_INTERPRET" in why[0] or "not importable" in why[0])


def _run_python(code: str, **env) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "SEQKERNELS_BACKEND"}
    full_env.update(env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=full_env, timeout=120)


def test_import_loads_neither_extension_nor_triton():
    result = _run_python("""
        import sys, seqkernels
        assert "seqkernels._C" not in sys.modules, "extension loaded at import"
        assert "triton" not in sys.modules, "triton imported at import"
        print("ok")
    """)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def test_without_the_extension_everything_falls_back_to_reference():
    """With seqkernels._C unimportable, the package works on the reference backend and says why."""
    result = _run_python("""
        import sys
        sys.modules["seqkernels._C"] = None  # makes `import seqkernels._C` raise ImportError
        import torch, seqkernels
        ok, why = seqkernels.available_backends()["cpu"]
        assert not ok and "seqkernels._C is not available" in why and "import of seqkernels._C halted" in why, why
        torch.manual_seed(0)
        ref = torch.nn.LSTM(3, 4, num_layers=2)
        ours = seqkernels.nn.LSTM.from_torch(ref)
        x = torch.randn(5, 2, 3)
        torch.testing.assert_close(ours(x)[0], ref(x)[0])
        cell = torch.nn.LSTMCell(3, 4)
        torch.testing.assert_close(seqkernels.nn.LSTMCell.from_torch(cell)(x[0])[0], cell(x[0])[0])
        try:
            with seqkernels.use_backend("cpu"):
                seqkernels.nn.LSTMCell(3, 4)(x[0])
        except seqkernels.BackendError as e:
            assert "seqkernels._C is not available" in str(e), e
        else:
            raise AssertionError("forced cpu backend ran without the extension")
        print("cpu:", why)
    """)
    assert result.returncode == 0, result.stderr
    assert "lstm_cell runs on the reference backend" in result.stderr  # the fallback is logged
    assert "cpu: C++ extension seqkernels._C is not available (ModuleNotFoundError" in result.stdout


def test_environment_report():
    result = _run_python("import runpy; runpy.run_module('seqkernels', run_name='__main__')")
    assert result.returncode == 0, result.stderr
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"\n{name}" in result.stdout
    assert "torch      " in result.stdout and "threads    intra-op" in result.stdout
