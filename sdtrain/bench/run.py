"""`sdtrain bench`: strategies and peers measured side by side, in one invocation.

Each strategy is a real `sdtrain launch` of the recipe (fresh processes, the same code path
a user runs); each peer is its own plain implementation of the same model and batch.
Throughput is the median over logging intervals after the first (warm-up) one, and each
entry keeps its best of `repeats` alternating rounds, since a shared machine's noise only
ever slows a run down. The headline number is a ratio measured in the same run, never an
absolute time.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from sdtrain.errors import UserInputError
from sdtrain.launch.node import threads_per_worker
from sdtrain.recipe import load_recipe

INTERVAL = 5  # steps per throughput sample


@dataclass
class Entry:
    name: str
    world_size: int
    kind: str  # "sdtrain" or "peer"
    samples: list[float] = field(default_factory=list)  # tokens/s per round
    peak_mem_gib: list[float] = field(default_factory=list)
    mfu: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return max(self.samples) if self.samples else 0.0


def strategy_settings(name: str, nproc: int) -> tuple[int, list[str]]:
    """(world size, recipe overrides) for a strategy name."""
    if name == "single":
        return 1, ["parallel.zero_stage=0"]
    if name in ("ddp", "zero0"):
        return nproc, ["parallel.zero_stage=0"]
    raise UserInputError(f"--strategies: unknown strategy {name!r}; available: single, ddp")


def run_bench(recipe_path: str, strategies: list[str], peers: list[str], nproc: int, steps: int,
              repeats: int, overrides: list[str]) -> dict:
    if steps < 3 * INTERVAL:
        raise UserInputError(f"--steps {steps}: need at least {3 * INTERVAL} for a warm-up interval and samples")
    for peer in peers:
        if peer != "torch":
            raise UserInputError(f"--peers: unknown peer {peer!r}; available: torch")
    plans = {name: strategy_settings(name, nproc) for name in strategies}
    base = [*overrides, f"train.steps={steps}", f"log.every={INTERVAL}", "train.eval_every=0",
            "checkpoint.at_end=false", "checkpoint.every=0"]
    # Validate every variant up front: a bad recipe fails before the first run, not after.
    resolved = {name: load_recipe(recipe_path, [*base, *extra]) for name, (_, extra) in plans.items()}
    entries = {name: Entry(name, world, "sdtrain") for name, (world, _) in plans.items()}
    if "torch" in peers:
        entries["torch-ddp"] = Entry("torch-ddp", nproc, "peer")
    with tempfile.TemporaryDirectory(prefix="sdtrain-bench-") as tmp:
        for round_index in range(repeats):
            for name, (world, extra) in plans.items():
                _measure_sdtrain(entries[name], recipe_path, [*base, *extra], world, Path(tmp) / f"{name}-{round_index}")
                if name == "ddp" and "torch" in peers:
                    _measure_torch_peer(entries["torch-ddp"], resolved[name], world, Path(tmp) / f"peer-{round_index}.json")
            if "torch" in peers and "ddp" not in plans:
                _measure_torch_peer(entries["torch-ddp"], resolved[next(iter(plans))], nproc, Path(tmp) / f"peer-{round_index}.json")
    return _report(entries, resolved[next(iter(plans))], steps, repeats)


def _measure_sdtrain(entry: Entry, recipe_path: str, overrides: list[str], world: int, run_dir: Path) -> None:
    args = [sys.executable, "-m", "sdtrain", "launch", recipe_path, "--nproc-per-node", str(world),
            "--run-dir", str(run_dir)]
    for override in overrides:
        args += ["--set", override]
    _run(args, f"sdtrain {entry.name}", _thread_env(world))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    entry.samples.append(statistics.median(r["tokens_per_s"] for r in rows[1:]))
    entry.peak_mem_gib = json.loads((run_dir / "summary.json").read_text())["peak_mem_gib"]
    entry.mfu = rows[-1]["mfu"]


def _measure_torch_peer(entry: Entry, recipe, world: int, out: Path) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "sdtrain.bench.peer_ddp", "--recipe-json", json.dumps(recipe_for_world(recipe, world)),
            "--out", str(out), "--interval", str(INTERVAL)]
    _run(args, "torch DDP peer", _thread_env(world))
    result = json.loads(out.read_text())
    entry.samples.append(statistics.median(result["tokens_per_s"][1:]))
    entry.peak_mem_gib = result["peak_mem_gib"]


def recipe_for_world(recipe, world: int) -> dict:
    """The recipe with its batch split resolved for `world` ranks, as the peer needs it."""
    from sdtrain.batch import derive_batch

    t = recipe.train
    plan = derive_batch(t.global_batch_size, t.micro_batch_size, t.grad_accum_steps, world)
    data = recipe.model_dump(mode="json")
    data["train"].update(global_batch_size=plan.global_batch, micro_batch_size=plan.micro_batch,
                         grad_accum_steps=plan.grad_accum)
    return data


def _thread_env(world: int) -> dict:
    # The same thread budget for sdtrain and its peer, whatever each launcher defaults to.
    return {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker(world))}


def _run(args: list[str], what: str, env: dict) -> None:
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{tail}")


def _report(entries: dict[str, Entry], recipe, steps: int, repeats: int) -> dict:
    peer = entries.get("torch-ddp")
    rows = []
    for entry in entries.values():
        row = {"name": entry.name, "kind": entry.kind, "world_size": entry.world_size,
               "tokens_per_s": round(entry.tokens_per_s, 1), "rounds": [round(s, 1) for s in entry.samples],
               "mfu": entry.mfu, "peak_mem_gib": entry.peak_mem_gib}
        if peer is not None and entry.kind == "sdtrain" and entry.world_size == peer.world_size and peer.tokens_per_s:
            row["ratio_vs_torch_ddp"] = round(entry.tokens_per_s / peer.tokens_per_s, 3)
        rows.append(row)
    return {"recipe": recipe.name, "model": recipe.model.model_dump(), "steps": steps, "repeats": repeats,
            "results": rows}
