"""Measure the hang diagnosis for the README: hang -> diagnosis time of the drill, and what
the collective record costs per call.

    .venv/bin/python tests/measure_hang.py [--runs 3] [--hang-timeout 5]

1. SDTRAIN_INJECT_HANG=1:3 on 2 local workers: from the hung rank's last progress (it began
   step 3) to the watchdog's detection (detected_at in hang/node0.json) and to the launcher's
   exit with the diagnosis printed.
2. gloo all_reduce of 4 KiB in a 1-process group (so that the machine's noise in moving bytes
   does not drown the wrapper), plain and through collective_log's wrapper, alternated in one
   process: the wrapper's cost per call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import TINY, merge  # noqa: E402
from test_hang import run_watching  # noqa: E402


def hang_once(folder: Path, timeout_s: float) -> tuple[float, float]:
    recipe = folder / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(merge(TINY, {"train": {"steps": 40},
                                                  "launch": {"nproc_per_node": 2, "hang_timeout_s": timeout_s}})))
    result, _, ended = run_watching(["launch", recipe, "--run-dir", folder / "run"],
                                    {"SDTRAIN_INJECT_HANG": "1:3", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1 and "root cause: hang: rank 1" in result.stderr, result.stderr
    report = json.loads((folder / "run" / "hang" / "node0.json").read_text())
    began = report["ranks"]["1"]["progress_at"]
    return report["detected_at"] - began, ended - began


def all_reduce_timing(rank: int, world: int, port: int, out: Path, calls: int = 5000, rounds: int = 7) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    tensor = torch.ones(1024)
    plain = dist.all_reduce
    from sdtrain.parallel import collective_log

    collective_log.install()
    recorded = dist.all_reduce
    times = {"plain": [], "recorded": []}
    for _ in range(rounds):
        for name, call in (("plain", plain), ("recorded", recorded)):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                call(tensor)
            times[name].append((time.perf_counter() - start) / calls)
    log, calls_alone = collective_log.LOG, 100_000
    start = time.perf_counter()
    for _ in range(calls_alone):
        log.complete(log.enter("all_reduce", None, [tensor]))
    times["record_alone"] = (time.perf_counter() - start) / calls_alone
    if rank == 0:
        out.write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--hang-timeout", type=float, default=5.0)
    parser.add_argument("--skip-hang", action="store_true", help="only the collective record's cost")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i in range(0 if args.skip_hang else args.runs):
            folder = Path(tmp) / f"hang{i}"
            folder.mkdir()
            runs.append(hang_once(folder, args.hang_timeout))
            print(f"run {i}: detected {runs[-1][0]:.1f} s, diagnosed and stopped {runs[-1][1]:.1f} s after the hang began")
        if runs:
            print(f"hang_timeout_s {args.hang_timeout:g}: detection median {statistics.median(r[0] for r in runs):.1f} s, "
                  f"diagnosis median {statistics.median(r[1] for r in runs):.1f} s (max {max(r[1] for r in runs):.1f} s)")

        import torch.multiprocessing as mp

        from sdtrain.launch.plan import free_port

        out = Path(tmp) / "timing.json"
        mp.spawn(all_reduce_timing, args=(1, free_port(), out), nprocs=1)
        times = json.loads(out.read_text())
        plain, recorded = statistics.median(times["plain"]), statistics.median(times["recorded"])
        print(f"gloo all_reduce 4 KiB, 1-process group: plain {plain * 1e6:.1f} us, recorded {recorded * 1e6:.1f} us "
              f"per call (median of 7 alternated rounds x 5000; difference {(recorded - plain) * 1e6:+.1f} us); "
              f"the record alone (enter + complete) {times['record_alone'] * 1e6:.1f} us per collective")


if __name__ == "__main__":
    main()
