"""Shared helpers: tiny recipes, and running the real `sdtrain` command in a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent

# Small enough that a multi-process run takes seconds on 2 cores, big enough to be a real GPT.
TINY = {
    "name": "tiny",
    "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 32, "vocab_size": 256},
    "data": {"source": "stdlib", "max_bytes": 262144},
    "train": {"steps": 10, "global_batch_size": 8, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 2, "eval_batches": 1},
    "launch": {"nproc_per_node": 1},
    "checkpoint": {"at_end": False},
    "log": {"every": 1},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


@pytest.fixture
def write_recipe(tmp_path):
    def write(extra: dict | None = None, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(merge(TINY, extra or {})))
        return path

    return write


def sdtrain(*args, cwd=None, timeout=300, env=None, **popen) -> subprocess.CompletedProcess:
    """Run the real CLI as a user would (a fresh Python process)."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "sdtrain", *map(str, args)],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=full_env, **popen,
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in metrics(run_dir) if "loss" in m]


def assert_losses_match(reference: Path, run_dir: Path, rel_tol: float, steps: int, checked=None) -> None:
    """run_dir logged `steps` losses, as the one-process `reference` did, each within rel_tol
    of the reference's (only the steps in `checked`, where given)."""
    expected, got = losses(reference), losses(run_dir)
    assert len(got) == len(expected) == steps
    for step, (a, b) in enumerate(zip(expected, got), 1):
        if checked is None or step in checked:
            assert abs(a - b) <= rel_tol * abs(a), f"step {step}: one process {a} vs {run_dir.name} {b}"


def assert_bitwise_same(reference: Path, run_dir: Path, steps: int) -> None:
    """run_dir logged the reference's `steps` losses to the bit, and its final checkpoint holds the
    same weights to the bit (offload, which must change where state lives and nothing else)."""
    import torch

    from sdtrain.train.export import load_model_weights

    assert losses(run_dir) == losses(reference) and len(losses(run_dir)) == steps
    ours, theirs = load_model_weights(run_dir)[0], load_model_weights(reference)[0]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def model_state(run_dir: Path) -> list[dict]:
    """Each rank's model-state bytes by kind, as summary.json reports them."""
    return json.loads((run_dir / "summary.json").read_text())["model_state_bytes"]


RESUMABLE = {"train": {"steps": 10}, "launch": {"nproc_per_node": 2}, "checkpoint": {"every": 5, "keep": 3, "at_end": True}}


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
    """10 uninterrupted steps at world size 2, checkpoints at steps 5 and 10: one real run,
    shared by every test of checkpoints (copy what you change)."""
    tmp = tmp_path_factory.mktemp("full")
    recipe = tmp / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(merge(TINY, RESUMABLE)))
    result = sdtrain("launch", recipe, "--run-dir", tmp / "run")
    assert result.returncode == 0, result.stderr
    return recipe, tmp / "run"


def crashed_copy(run_dir: Path, dest: Path) -> Path:
    """The run as a crash right after step 5's checkpoint would have left it."""
    shutil.copytree(run_dir, dest)
    shutil.rmtree(dest / "checkpoints" / "step_10")
    (dest / "checkpoints" / "latest").write_text("step_5")
    return dest


def launch_run(tmp: Path, name: str, nproc: int, recipe: dict, *overrides: str) -> Path:
    """A real `sdtrain launch` of `recipe` (a dict) on nproc workers into tmp/name, which must succeed."""
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    args = ["launch", path, "--nproc-per-node", nproc, "--run-dir", tmp / name]
    for override in overrides:
        args += ["--set", override]
    result = sdtrain(*args, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp / name


@contextlib.contextmanager
def spawned_rank():
    """The body of a rank that mp.spawn started, after init_process_group. On success it ends
    as a worker does (mesh.leave_process_group: barrier, destroy, exit without interpreter
    finalization, which with gloo's threads still about aborts with SIGABRT now and then,
    "terminate called without an active exception"); on failure the group is destroyed and
    the exception goes on to mp.spawn, which reports it."""
    import torch.distributed as dist

    from sdtrain.parallel.mesh import leave_process_group

    try:
        yield
    except BaseException:
        dist.destroy_process_group()
        raise
    leave_process_group()
