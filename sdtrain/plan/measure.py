"""The cluster measured here, for `sdtrain plan` without cluster flags: the device's peak
(train/peak.py, as `sdtrain env`), its memory bandwidth (a large copy), the bus bandwidth of
an all-reduce over this node's workers (`sdtrain bench comm`, in its own processes), what
each rank may hold (estimate/fit.py), on CPU the page cache's bandwidth where NVMe offload's
files go (bench/disk.py), and the efficiency a two-block slice of the recipe's model reaches
in forward + backward at two micro-batch sizes (the calibration).

Each measurement takes seconds to a minute, so it is cached (one JSON file per machine and
worker count, and per model shape for the calibration) with the date and the command that
measures it again (`--remeasure`). The only module of the planner that imports torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.plan.cluster import GPU_DEFAULTS, Cluster

CACHE_ENV = "SDTRAIN_CACHE"
COMM_SIZES = "4K,16M"  # the latency, and the bandwidth
CALIBRATION_LAYERS = 2
CALIBRATION_SEQUENCES = (1, 8)  # micro-batches timed: the efficiency curve's two points
CALIBRATION_VERSION = 2  # 2: with tp_overheads (a cached one without them is measured again)
PAGE_CACHE_PROBE_BYTES = 256 * 2**20
UNPROBED_DISK_GBPS = 1.0  # where the probe cannot write


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "sdtrain")
    return Path(root) / "plan"


def cached(name: str, refresh: str, remeasure: bool, measure) -> dict:
    """The cached measurement `name`, or a new one (written with the date and `refresh`)."""
    path = cache_dir() / f"{name}.json"
    if not remeasure and path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            pass  # a torn file is measured again
    values = measure()
    values.update(measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), refresh=refresh)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values, indent=1))
        tmp.replace(path)
    except OSError:
        pass  # a read-only home still plans, measuring each time
    return values


def key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:12]


def measure_cluster(recipe, recipe_path: str, nproc: int, remeasure: bool = False) -> Cluster:
    """This machine as a cluster of `nproc` workers."""
    import torch

    device = "cuda" if recipe.launch.backend != "gloo" and torch.cuda.is_available() else "cpu"
    refresh = f"sdtrain plan {recipe_path} --nproc-per-node {nproc} --remeasure"
    host = cached(f"machine-{key(socket.gethostname(), nproc, device)}", refresh, remeasure,
                  lambda: measure_machine(device, nproc))
    model = recipe.model.model_dump(mode="json")
    calibration = cached(f"efficiency-{key(CALIBRATION_VERSION, socket.gethostname(), nproc, device, model, recipe.train.precision)}",
                         refresh, remeasure, lambda: calibrate(recipe, device, nproc, host["peak_tflops"]))
    budget = device_budget(device, nproc)
    return Cluster(gpus=nproc, gpus_per_node=nproc, device_memory_gib=budget / 2**30,
                   peak_tflops=host["peak_tflops"], intra_node_gbps=host["busbw_gbps"],
                   inter_node_gbps=host["busbw_gbps"], memory_gbps=host["memory_gbps"],
                   host_memory_gbps=host["memory_gbps"] if device == "cpu" else GPU_DEFAULTS["host_memory_gbps"],
                   disk_gbps=offload_gbps(recipe, refresh, remeasure) if device == "cpu" else GPU_DEFAULTS["disk_gbps"],
                   efficiency=calibration["efficiency"], efficiency_half_tokens=calibration["half_tokens"],
                   tp_overheads=tuple(tuple(pair) for pair in calibration.get("tp_overheads", [])),
                   latency_us=host["latency_us"], rank_share=rank_share(device, nproc),
                   device=device, source=f"measured here {host['measured_at']}; refresh: {refresh}")


def offload_gbps(recipe, refresh: str, remeasure: bool) -> float:
    """GB/s at which NVMe offload moves its state, read and written back (the harmonic mean of
    the two directions: each moves the same bytes), measured where its files go. On a CPU
    machine that is the page cache's: the files are rewritten in place every step and, where
    they fit in free memory, never wait on the disk (a verify's offload runs here read 11 GB/s
    and wrote 4 GB/s against a disk of 1.4 / 2.1). Where they do not fit, give the disk's own
    bandwidth (`sdtrain bench` prints it beside its nvme rows) in a cluster YAML."""
    from sdtrain.bench.disk import probe_page_cache
    from sdtrain.estimate.disk import nearest_existing

    zero = recipe.parallel.zero
    folder = nearest_existing(Path(zero.nvme_path or "runs").expanduser())
    try:
        probe = cached(f"page-cache-{key(socket.gethostname(), str(folder), zero.sub_group_mb)}", refresh, remeasure,
                       lambda: probe_page_cache(folder, int(zero.sub_group_mb * 2**20), PAGE_CACHE_PROBE_BYTES))
    except OSError:  # not writable there, or full: offload would fail there too; priced as a slow disk
        return UNPROBED_DISK_GBPS
    return 2 / (1 / probe["read_gbps"] + 1 / probe["write_gbps"])


def rank_share(device: str, nproc: int) -> float:
    """The share of a core's worth each CPU worker gets while all compute: the launcher gives each
    at least one thread (launch/node.py), so more workers than cores take turns on them."""
    if device != "cpu":
        return 1.0
    from sdtrain.launch.node import threads_per_worker, usable_cores

    return min(1.0, usable_cores() / (nproc * threads_per_worker(nproc)))


def device_budget(device: str, nproc: int) -> float:
    from sdtrain.estimate.fit import cpu_budget, cuda_budget

    budget = cuda_budget() if device == "cuda" else cpu_budget(nproc)
    return budget.per_rank


def measure_machine(device: str, nproc: int) -> dict:
    import torch

    from sdtrain.launch.node import threads_per_worker
    from sdtrain.train.peak import measure_peak_flops

    torch.set_num_threads(threads_per_worker(nproc))  # as each worker gets
    peak = measure_peak_flops(device)
    busbw, latency_us = bus_bandwidth(nproc, device)
    return {"peak_tflops": peak.flops / 1e12, "peak": peak.describe(), "memory_gbps": memory_bandwidth(device),
            "busbw_gbps": busbw, "latency_us": latency_us, "device": device, "nproc": nproc}


def memory_bandwidth(device: str) -> float:
    """GB/s of a 256 MiB copy (read + write), the best of a few."""
    import torch

    x = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        y.copy_(x)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - start) / 1e9)
    return best


def bus_bandwidth(nproc: int, device: str) -> tuple[float, float]:
    """(all-reduce bus bandwidth GB/s, the smallest all-reduce's time in us) over `nproc` workers,
    from `sdtrain bench comm`."""
    if nproc == 1:
        return 1e3, 1.0  # nothing to cross: any numbers; no term uses them
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "comm.json"
        argv = [sys.executable, "-m", "sdtrain", "bench", "comm", "--nproc", str(nproc), "--ops", "all_reduce",
                "--sizes", COMM_SIZES, "--repeats", "2", "--json", str(out)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if done.returncode or not out.is_file():
            raise UserInputError(f"measuring this machine's bandwidth failed ({' '.join(argv[1:])}: "
                                 f"{(done.stderr or done.stdout).strip()[-300:]}); give the cluster with --gpus ... "
                                 "--inter-node-gbps, or --cluster FILE")
        rows = [r for r in json.loads(out.read_text())["results"] if r["op"] == "all_reduce"]
    return max(r["busbw_gbps"] for r in rows), min(r["time_us"] for r in rows)


def calibrate(recipe, device: str, nproc: int, peak_tflops: float) -> dict:
    """Efficiency of a two-block slice of the recipe's model, forward + backward + loss, at
    two micro-batch sizes: e(t) = E·t / (t + h) through both points (1/e is linear in 1/t)."""
    import torch

    from sdtrain.launch.node import threads_per_worker
    from sdtrain.model.gpt import GPT, GPTConfig
    from sdtrain.model.size import flops_per_token

    torch.set_num_threads(threads_per_worker(nproc))  # as each worker gets
    fields = recipe.model.model_dump()
    fields.update(n_layers=min(CALIBRATION_LAYERS, recipe.model.n_layers), init_from=None)
    config = GPTConfig(**fields)
    model = GPT(config, loss_chunk_tokens=recipe.train.loss_chunk_tokens).to(device)
    points, best_s = [], {}
    for sequences in CALIBRATION_SEQUENCES:
        x = torch.randint(0, config.vocab_size, (sequences, config.seq_len), device=device)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=recipe.train.precision != "fp32"):
                model.loss(model(x), x).backward()
            if device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        tokens = sequences * config.seq_len
        best_s[sequences] = best
        points.append((tokens, flops_per_token(config) * tokens / best / (peak_tflops * 1e12)))
    tp_overheads = measure_tp_overheads(recipe, fields, nproc, device, best_s)
    (t1, e1), (t2, e2) = points
    slope = (1 / e1 - 1 / e2) / (1 / t1 - 1 / t2)  # h / E
    top = 1 / (1 / e2 - slope / t2)  # E
    if slope <= 0:  # noise: a flat curve at the larger point's efficiency
        return {"efficiency": min(e2, 1.0), "half_tokens": 1.0, "points": points, "tp_overheads": tp_overheads}
    if not 0 < top <= 1:  # the curve would pass the peak: capped there, through the small point
        top = 1.0
    return {"efficiency": top, "half_tokens": slope * top, "points": points, "tp_overheads": tp_overheads}


def measure_tp_overheads(recipe, fields: dict, nproc: int, device: str, best_s: dict) -> list:
    """[tp, overhead] for each tp this node's workers could form (tp_probe.py), on CPU: a GPU's
    tp runs on NCCL beside compute, which this one-device probe cannot show."""
    from sdtrain.divisors import divisors
    from sdtrain.launch.node import threads_per_worker
    from sdtrain.plan.tp_probe import tp_overhead

    if device != "cpu":
        return []
    sequences = CALIBRATION_SEQUENCES[-1]
    overheads = []
    for tp in divisors(nproc)[1:]:
        try:
            overheads.append([tp, tp_overhead(fields, recipe.train.loss_chunk_tokens, sequences, tp, True,
                                               threads_per_worker(nproc), best_s[sequences])])
        except Exception:  # noqa: BLE001 - a model tp cannot cut (heads, width): no such layout is planned
            continue
    return overheads
