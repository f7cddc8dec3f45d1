"""The device's matmul FLOP/s, measured: a short probe, so that MFU is against what this
device really reaches rather than a datasheet figure (an H200 measures about 790 TFLOP/s of
bf16 matmul against the datasheet's 989). The nominal table (metrics.PEAK_FLOPS) stays the
fallback.

CUDA: bf16 4096 x 4096 matmuls, timed with CUDA events. CPU: fp32 1024 x 1024 (the
precision CPU runs train in), timed by the clock. Either way the best of a few timed
batches, within about `budget_s`: noise on a shared machine only ever slows a batch down.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PeakFlops:
    flops: float  # FLOP/s
    dtype: str
    size: int  # n of the n x n matmuls
    device: str  # what ran it, e.g. "NVIDIA H200" or "CPU, 2 threads"

    def describe(self) -> str:
        rate = f"{self.flops / 1e12:.1f} TFLOP/s" if self.flops >= 1e12 else f"{self.flops / 1e9:.1f} GFLOP/s"
        return f"{rate} {self.dtype} {self.size}x{self.size} matmul on {self.device} (measured)"


def measure_peak_flops(device: torch.device | str = "cpu", budget_s: float = 1.0) -> PeakFlops:
    device = torch.device(device)
    if device.type == "cuda":
        return _probe_cuda(device, budget_s)
    return _probe_cpu(budget_s)


def _probe_cuda(device: torch.device, budget_s: float) -> PeakFlops:
    n, dtype, per_batch = 4096, torch.bfloat16, 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, clocks ramp up
        a @ b
    torch.cuda.synchronize(device)
    best, deadline = 0.0, time.perf_counter() + budget_s
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(per_batch):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, per_batch * 2 * n**3 / (start.elapsed_time(end) / 1e3))
        if time.perf_counter() > deadline:
            break
    return PeakFlops(best, "bf16", n, torch.cuda.get_device_name(device))


def _probe_cpu(budget_s: float) -> PeakFlops:
    n = 1024
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    best, deadline = 0.0, time.perf_counter() + budget_s
    while True:
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        elapsed = time.perf_counter() - start
        best = max(best, 2 * n**3 / elapsed)
        if start + elapsed > deadline:
            break
    return PeakFlops(best, "fp32", n, f"CPU, {torch.get_num_threads()} threads")
