"""The matmul peak probe: a positive, finite FLOP/s within its time budget, and `sdtrain env`
prints it labelled as measured."""

import math
import time

from conftest import sdtrain
from sdtrain.train.peak import measure_peak_flops


def test_cpu_probe_is_a_positive_finite_rate_within_its_budget():
    start = time.perf_counter()
    peak = measure_peak_flops("cpu", budget_s=0.5)
    elapsed = time.perf_counter() - start
    assert math.isfinite(peak.flops) and peak.flops > 0
    # the budget, plus set-up and the one matmul that may straddle the deadline (slow on a
    # loaded 2-core machine: 2 GFLOP at a few GFLOP/s)
    assert elapsed < 2.5, elapsed
    assert peak.dtype == "fp32" and peak.size == 1024 and "(measured)" in peak.describe()


def test_env_prints_the_measured_peak():
    result = sdtrain("env")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith("peak matmul"))
    assert "FLOP/s" in line and "(measured)" in line
