"""``python -m seqkernels.triton_report``: compile every Triton kernel for real GPU targets, no GPU needed.

Each Triton op module lists report cases (``report_cases()``): calls of its launchers that, together, reach every
launch configuration the launchers can choose (block sizes, warps, stages, and the code variants: dtypes, causal,
masks, dropout). The cases run with launches recorded instead of executed (``triton_common.recording``); each
distinct launch is then compiled with Triton for sm_80 and sm_90 exactly as the launcher would have launched it
(same specialization of its arguments), and ptxas reports its registers and spills. Triton also specializes integer
arguments on their values (equal to 1, divisible by 16), which the report cases' sizes cannot all reach at once: so
each launch is compiled a second time with every integer argument generic ("ints generic" in the config column),
the code that sizes and strides of no special value get.

The table lists: kernel, config, arch, registers, spill bytes (stores + loads), shared memory, and the tensor-core
instructions in the PTX (``mma`` on sm_80, ``wgmma`` on sm_90). Exit status 1 when a kernel fails to compile,
spills, needs more shared memory than the architecture gives one block, or contains a matmul (``tt.dot``) that
was not lowered to tensor-core instructions.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ARCHS = (80, 90)
# Shared memory one block may use (opt-in maximum): A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}
MODULES = ("seqkernels.ops.attention.triton", "seqkernels.ops.lstm.triton")


@dataclass
class Row:
    kernel: str
    config: str
    arch: int
    registers: int = -1
    spills: int = -1
    shared: int = -1
    tensor_cores: str = "-"
    has_dot: bool = False
    error: Optional[str] = None
    seconds: float = 0.0

    def problems(self) -> List[str]:
        if self.error:
            return [f"failed to compile: {self.error}"]
        found = []
        if self.spills > 0:
            found.append(f"spills {self.spills} bytes")
        if self.shared > SHARED_LIMIT[self.arch]:
            found.append(f"needs {self.shared} bytes of shared memory (sm_{self.arch} gives {SHARED_LIMIT[self.arch]})")
        if self.has_dot and self.tensor_cores == "-":
            found.append("matmul without tensor-core instructions")
        return found


def _describe(kernel, args, meta, generic: bool = False) -> str:
    """The launch's configuration: its constexprs and options, and the dtypes of its tensors."""
    import torch

    dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)
                     and a.is_floating_point()})
    parts = [f"{k}={v}" for k, v in meta.items()]
    return " ".join(parts + ["/".join(dtypes)] + (["ints generic"] if generic else []))


GENERIC_INT = 3  # neither 1 nor a multiple of 16: the integer value Triton specializes nothing for


def _generic(args) -> tuple:
    return tuple(GENERIC_INT if type(a) is int else a for a in args)


def _key(kernel, args, meta, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return target, signature, constexprs, attrs, options


def _ptxas_usage(ptx: str, arch: int) -> Tuple[int, int]:
    """(registers, spill bytes) from ptxas -v, with the ptxas Triton itself uses for this arch."""
    from triton.backends.nvidia.compiler import get_ptxas

    target = re.search(r"\.target\s+(\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", f"-arch={target}", path, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    text = done.stdout + done.stderr
    if done.returncode:
        raise RuntimeError(f"ptxas: {text.strip()}")
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return regs, spills


def compile_launch(kernel, args, meta, arch: int, generic: bool = False) -> Row:
    """Compile one recorded launch for sm_<arch> (with ``generic``, its integer arguments made generic) and
    measure it."""
    row = Row(kernel.__name__, _describe(kernel, args, meta, generic), arch)
    if generic:
        args = _generic(args)
    start = time.perf_counter()
    try:
        import triton
        from triton.compiler import ASTSource

        target, signature, constexprs, attrs, options = _key(kernel, args, meta, arch)
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        ptx = compiled.asm["ptx"]
        row.has_dot = "tt.dot" in compiled.asm["ttir"]
        row.tensor_cores = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "-")
        row.shared = int(compiled.metadata.shared)
        row.registers, row.spills = _ptxas_usage(ptx, arch)
    except Exception as exc:  # reported, and fails the run
        lines = str(exc).strip().splitlines()
        row.error = f"{type(exc).__name__}: {lines[-1] if lines else ''}"
    row.seconds = time.perf_counter() - start
    return row


def _compile(job) -> Row:
    module_name, index, arch, generic = job
    kernel, args, meta = _launches(module_name)[index]
    return compile_launch(kernel, args, meta, arch, generic)


_cache: Dict[str, list] = {}


def _launches(module_name: str) -> list:
    """Every distinct launch (kernel, args, meta) the module's report cases make, in a stable order."""
    if module_name not in _cache:
        import importlib

        from .ops import triton_common

        module = importlib.import_module(module_name)
        seen, launches = set(), []
        for case in module.report_cases():
            with triton_common.recording() as recorded:
                case()
            for kernel, _grid, args, meta in recorded:
                key = (kernel.__name__, _describe(kernel, args, meta), _signature_key(args))
                if key not in seen:
                    seen.add(key)
                    launches.append((kernel, args, meta))
        _cache[module_name] = launches
    return _cache[module_name]


def _has_specialized_ints(args) -> bool:
    """Whether Triton specializes any integer argument of this launch (equal to 1, or divisible by 16)."""
    return any(type(a) is int and (a == 1 or a % 16 == 0) for a in args)


def _signature_key(args) -> tuple:
    import torch

    return tuple(str(a.dtype) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seqkernels.triton_report", description=__doc__.split("\n")[0])
    parser.add_argument("--filter", default="", help="only kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    opts = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("triton_report compiles for GPU targets: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

    jobs = []
    for module_name in MODULES:
        for index, (kernel, args, meta) in enumerate(_launches(module_name)):
            if opts.filter in kernel.__name__:
                variants = [False, True] if _has_specialized_ints(args) else [False]
                for generic in variants:
                    for arch in ARCHS:
                        jobs.append((module_name, index, arch, generic))
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, opts.jobs)) as pool:
        rows = list(pool.map(_compile, jobs))

    header = f"{'kernel':<24} {'arch':<6} {'regs':>4} {'spill':>5} {'smem KiB':>8} {'tensor':<6}  config"
    print(header)
    print("-" * len(header))
    failed = 0
    for row in rows:
        problems = row.problems()
        failed += bool(problems)
        smem = f"{row.shared / 1024:.1f}" if row.shared >= 0 else "-"
        print(f"{row.kernel:<24} sm_{row.arch:<3} {row.registers:>4} {row.spills:>5} {smem:>8} {row.tensor_cores:<6}  "
              f"{row.config}" + (f"  <- {'; '.join(problems)}" if problems else ""))
    print(f"\n{len(rows)} compilations ({len(rows) // len(ARCHS)} launch configurations and integer "
          f"specializations x sm_80, sm_90) in "
          f"{time.perf_counter() - start:.0f} s: {failed} with problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
