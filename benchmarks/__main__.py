"""``python -m benchmarks``: seqkernels against PyTorch on the CPU.

Prints a table (torch and seqkernels medians, their ratio against the target, GFLOP/s and the fraction of this
machine's measured GEMM rate), and writes the results as JSON and an SVG chart (default: benchmarks/results/).

The attention memory case (peak resident memory of forward + backward with dropout, each side in a fresh
process) runs with the full suite or --filter memory.

Options: --filter SUBSTRING (run matching cases only), --min-time SECONDS (per side and case; default 1.0),
--threads N (torch.set_num_threads), --out DIR, --list.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import seqkernels
from seqkernels.__main__ import report

from .cases import attention_cases, recurrent_cases
from .plot import ratio_chart
from .runner import gemm_rate, time_pair

MEMORY_CASE = "sdpa-memory-train-dropout-B1-H4-4096-D64"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--filter", default="", help="run only cases whose name contains this")
    parser.add_argument("--min-time", type=float, default=1.0, help="seconds per side and case (default 1.0)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) first")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in recurrent_cases() + attention_cases() if args.filter in c.name]
    run_memory = args.filter in MEMORY_CASE
    if args.list:
        for c in cases:
            print(f"{c.name:45s} {c.description}")
        if run_memory:
            print(f"{MEMORY_CASE:45s} peak memory, forward + backward with dropout 0.1, B=1, H=4, L=S=4096, D=64")
        return 0
    if not cases and not run_memory:
        print(f"no case matches --filter {args.filter!r} (see --list)", file=sys.stderr)
        return 2

    print(report())
    roof = gemm_rate()
    print(f"\nfloat32 GEMM rate (torch.mm 1024^3, {torch.get_num_threads()} threads): {roof:.0f} GFLOP/s\n")
    header = f"{'case':45s} {'torch ms':>9s} {'ours ms':>9s} {'ratio':>6s} {'target':>6s}  {'GFLOP/s':>8s} {'of GEMM':>7s}"
    print(header)
    print("-" * len(header))
    results = []
    for case in cases:
        torch_fn, ours_fn, flops = case.build()
        t = time_pair(torch_fn, ours_fn, min_time=args.min_time)
        ratio = t["a_median_s"] / t["b_median_s"]
        gflops = flops / t["b_median_s"] / 1e9
        met = None if case.target is None else ratio >= case.target
        mark = "" if met is None else ("  ok" if met else "  MISSED")
        target = f"{case.target:.1f}" if case.target else "-"
        print(f"{case.name:45s} {t['a_median_s'] * 1e3:9.2f} {t['b_median_s'] * 1e3:9.2f} {ratio:6.2f} {target:>6s}"
              f"  {gflops:8.1f} {gflops / roof:7.0%}{mark}", flush=True)
        results.append({
            "case": case.name, "group": case.group, "description": case.description,
            "torch_ms": t["a_median_s"] * 1e3, "seqkernels_ms": t["b_median_s"] * 1e3, "pairs": t["pairs"],
            "ratio": ratio, "target": case.target, "met": met,
            "seqkernels_gflops": gflops, "torch_gflops": flops / t["a_median_s"] / 1e9, "fraction_of_gemm": gflops / roof,
        })

    if run_memory:
        from .memory import measure_in_subprocess

        peaks = {side: measure_in_subprocess(side) for side in ("torch", "seqkernels")}
        if None not in peaks.values():
            ratio = peaks["seqkernels"] / peaks["torch"]
            met = ratio <= 0.25
            print(f"{MEMORY_CASE:45s} peak MiB: torch {peaks['torch'] / 2**20:.0f}, "
                  f"seqkernels {peaks['seqkernels'] / 2**20:.0f}, ratio {ratio:.3f} (target <= 0.25)"
                  f"{'  ok' if met else '  MISSED'}")
            results.append({
                "case": MEMORY_CASE, "group": "attention",
                "description": "peak memory, forward + backward with dropout 0.1, B=1, H=4, L=S=4096, D=64",
                "torch_peak_bytes": peaks["torch"], "seqkernels_peak_bytes": peaks["seqkernels"],
                "memory_ratio": ratio, "target": 0.25, "met": met, "ratio": 1.0 / ratio,
            })

    targets = [r for r in results if r["met"] is not None]
    print(f"\ntargets met: {sum(r['met'] for r in targets)} of {len(targets)}")
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seqkernels": seqkernels.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(), "gemm_gflops": roof, "backends": seqkernels.available_backends(),
    }
    json_path = os.path.join(args.out, "results.json")
    with open(json_path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    svg_path = os.path.join(args.out, "ratios.svg")
    with open(svg_path, "w") as f:
        timed = [r for r in results if "memory_ratio" not in r]
        f.write(ratio_chart(timed, f"seqkernels vs torch on {os.cpu_count()} CPU threads (higher is better)"))
    print(f"wrote {json_path} and {svg_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
