"""Timing: both sides in turn (A B A B ...) in one process after warm-up; medians and their ratio.

Machines are noisy, so a single absolute time means little: interleaving exposes both sides to the same noise,
and the ratio of medians is what the targets are about.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List


def time_pair(fa: Callable[[], object], fb: Callable[[], object], min_time: float = 1.0, min_pairs: int = 5,
              max_pairs: int = 200) -> Dict[str, object]:
    """Median seconds of fa and fb, timed alternately until both have run `min_time` or `max_pairs` times."""
    for _ in range(2):  # warm-up: first-touch allocation, lazy initialization, caches
        fa()
        fb()
    ta: List[float] = []
    tb: List[float] = []
    while len(ta) < max_pairs and (len(ta) < min_pairs or min(sum(ta), sum(tb)) < min_time):
        start = time.perf_counter()
        fa()
        ta.append(time.perf_counter() - start)
        start = time.perf_counter()
        fb()
        tb.append(time.perf_counter() - start)
    return {"a_median_s": statistics.median(ta), "b_median_s": statistics.median(tb), "pairs": len(ta)}


def gemm_rate(n: int = 1024, min_time: float = 1.0) -> float:
    """This machine's float32 GEMM rate in GFLOP/s (torch.mm, n x n x n, median): the practical roof."""
    import torch

    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times: List[float] = []
    while len(times) < 5 or sum(times) < min_time:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times) / 1e9
