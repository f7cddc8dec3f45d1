"""Measure what issue 10's README section quotes, side by side in one script:

- checkpoint stall: how long training stands still per save, synchronous DCP save against
  checkpoint.async_save (DCP async_save), on the same recipe and machine, alternating rounds;
- restart: failure -> restart -> first step after it, from a fault injected at step 7 with
  checkpoints every 5 (restarts.jsonl's times and the first metrics line after the restart).

    .venv/bin/python tests/measure_operations.py [--rounds 2] [--d-model 384] [--layers 6]

Not a test: it prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from conftest import REPO, TINY, merge  # noqa: E402


def launch(recipe: dict, run_dir: Path, *overrides: str, env: dict | None = None, watch=None) -> subprocess.Popen:
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    argv = [sys.executable, "-m", "sdtrain", "launch", str(path), "--run-dir", str(run_dir)]
    for override in overrides:
        argv += ["--set", override]
    return subprocess.Popen(argv, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def stall(recipe: dict, tmp: Path, name: str, async_save: bool) -> list[float]:
    run_dir = tmp / name
    proc = launch(recipe, run_dir, f"checkpoint.async_save={str(async_save).lower()}")
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    return json.loads((run_dir / "summary.json").read_text())["checkpoint_stall_s"]


def restart_times(tmp: Path) -> dict:
    """Wall-clock marks of one restart: the failing rank's report, the attempt stopped,
    the new attempt started, its first step logged (metrics.jsonl polled every 20 ms)."""
    run_dir = tmp / "restart"
    recipe = merge(TINY, {"train": {"steps": 10}, "launch": {"nproc_per_node": 2, "max_restarts": 1},
                          "checkpoint": {"every": 5, "at_end": False}})
    launched_at = time.time()
    proc = launch(recipe, run_dir, env={"SDTRAIN_INJECT_FAULT": "1:7"})
    first_step_at = fresh_first_step_at = None
    while proc.poll() is None:
        restarts = run_dir / "restarts.jsonl"
        if fresh_first_step_at is None and (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size:
            fresh_first_step_at = time.time()
        if first_step_at is None and restarts.exists():
            steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
            if steps and steps[-1] == 6:  # truncated back to 5 by the resumed rank 0, then step 6 logged
                first_step_at = time.time()
        time.sleep(0.02)
    assert proc.returncode == 0, proc.stderr.read()[-3000:]
    record = json.loads((run_dir / "restarts.jsonl").read_text().splitlines()[0])
    return {
        "report_to_stopped_s": round(record["stopped_at"] - record["failed_at"], 2),  # report time: whole seconds
        "stopped_to_restarted_s": round(record["restarted_at"] - record["stopped_at"], 2),
        "restarted_to_first_step_s": round(first_step_at - record["restarted_at"], 2) if first_step_at else None,
        "fresh_launch_to_first_step_s": round(fresh_first_step_at - launched_at, 2),  # attempt 0, for comparison
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--restart-only", action="store_true", help="measure the restart, not the checkpoint stall")
    args = parser.parse_args()
    recipe = merge(TINY, {"model": {"d_model": args.d_model, "n_layers": args.layers, "n_heads": 4},
                          "train": {"steps": 12, "eval_batches": 1}, "launch": {"nproc_per_node": 2},
                          "checkpoint": {"every": 4, "at_end": False, "keep": 1}, "log": {"every": 4}})
    sync_s, async_s = [], []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for r in range(0 if args.restart_only else args.rounds):  # alternating: the machine's load hits both alike
            sync_s += stall(recipe, tmp, f"sync{r}", False)
            async_s += stall(recipe, tmp, f"async{r}", True)
        restart = restart_times(tmp)
    params = 12 * args.layers * args.d_model**2 + 256 * args.d_model
    print(json.dumps({
        "params_approx": params,
        "checkpoint_mb_approx": round(params * 12 / 2**20),  # fp32 weights + two Adam moments
        "sync_stall_s_per_save": sync_s, "async_stall_s_per_save": async_s,
        **({"median_sync_s": statistics.median(sync_s), "median_async_s": statistics.median(async_s),
            "async_over_sync": round(statistics.median(async_s) / statistics.median(sync_s), 3)} if sync_s else {}),
        "restart": restart,
    }, indent=2))


if __name__ == "__main__":
    main()
