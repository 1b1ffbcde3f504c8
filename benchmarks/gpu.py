"""``python -m benchmarks.gpu``: the Triton kernels against torch on an NVIDIA GPU (not run in CI: needs a GPU).

Attention: forward and forward + backward TFLOP/s of seqkernels' Triton flash attention against
``torch.nn.functional.scaled_dot_product_attention`` (FLOPs 4·B·H·L·S·D, halved for causal, x2.5 for the
backward), bfloat16, with the dense bf16 peak of the card for reference when it is known. LSTM: forward and a
training step of ``seqkernels.nn.LSTM`` (Triton) against ``torch.nn.LSTM`` (cuDNN) at batch 1 to 64.

Both sides are timed in turn (A B A B) with CUDA events after warm-up; medians and the ratio torch / seqkernels.
Goals (README): attention forward >= 60% of the dense bf16 peak at L = S >= 4096, D = 128; the LSTM at batch
<= 16 faster than cuDNN.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, List

import torch
import torch.nn.functional as F

import seqkernels

# Dense bf16 tensor-core peak, TFLOP/s, by device name fragment.
PEAK_BF16 = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0}


def _cuda_time(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def time_pair(fa, fb, reps: int = 20):
    for _ in range(3):
        fa()
        fb()
    torch.cuda.synchronize()
    ta: List[float] = []
    tb: List[float] = []
    for _ in range(reps):
        ta.append(_cuda_time(fa))
        tb.append(_cuda_time(fb))
    return statistics.median(ta), statistics.median(tb)


def peak() -> float:
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))


def attention(reps: int) -> None:
    print(f"attention, bfloat16, {torch.cuda.get_device_name()} (dense bf16 peak {peak():.0f} TFLOP/s)")
    print(f"{'case':<40} {'torch ms':>9} {'ours ms':>9} {'ratio':>6} {'ours TFLOP/s':>13} {'% peak':>7}")
    for B, H, L, D, causal in [(4, 16, 1024, 64, False), (2, 16, 4096, 128, False), (2, 16, 4096, 128, True),
                               (1, 16, 8192, 128, False), (8, 16, 2048, 64, True)]:
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        for train in (False, True):
            def run(fn):
                def go():
                    out = fn(q, k, v, is_causal=causal)
                    if train:
                        out.backward(torch.ones_like(out))
                return go

            with seqkernels.use_backend("triton"):
                t_torch, t_ours = time_pair(run(F.scaled_dot_product_attention),
                                            run(seqkernels.scaled_dot_product_attention), reps)
            f = flops * (3.5 if train else 1.0)
            name = f"{'train' if train else 'fwd'}{'-causal' if causal else ''}-B{B}-H{H}-L{L}-D{D}"
            rate = f / t_ours / 1e12
            print(f"{name:<40} {t_torch * 1e3:9.3f} {t_ours * 1e3:9.3f} {t_torch / t_ours:6.2f} {rate:13.1f} "
                  f"{100 * rate / peak():6.1f}%")


def lstm(reps: int) -> None:
    print("\nLSTM, float32, T=256, input = hidden; seqkernels (Triton) against torch.nn.LSTM (cuDNN)")
    print(f"{'case':<40} {'torch ms':>9} {'ours ms':>9} {'ratio':>6}")
    for hidden in (128, 512):
        for B in (1, 4, 16, 64):
            ref = torch.nn.LSTM(hidden, hidden, device="cuda")
            ours = seqkernels.nn.LSTM(hidden, hidden, device="cuda")
            ours.load_state_dict(ref.state_dict())
            x = torch.randn(256, B, hidden, device="cuda", requires_grad=True)
            for train in (False, True):
                def run(m):
                    def go():
                        if train:
                            m(x)[0].sum().backward()
                        else:
                            with torch.no_grad():
                                m(x)
                    return go

                t_torch, t_ours = time_pair(run(ref), run(ours), reps)
                name = f"lstm-{'train' if train else 'infer'}-B{B}-H{hidden}"
                print(f"{name:<40} {t_torch * 1e3:9.3f} {t_ours * 1e3:9.3f} {t_torch / t_ours:6.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--only", choices=["attention", "lstm"], default=None)
    opts = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks.gpu needs a CUDA device (and a CUDA build of torch); none is visible", file=sys.stderr)
        return 2
    if opts.only in (None, "attention"):
        attention(opts.reps)
    if opts.only in (None, "lstm"):
        lstm(opts.reps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
