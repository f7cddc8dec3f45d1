"""Sharded, atomic, reshardable checkpoints through torch.distributed.checkpoint (DCP).

Layout of `checkpoints/step_<N>/`:
  .metadata, __<rank>_*.distcp   weights and Adam moments keyed by parameter name, whole or
                                 as DTensors of boxes (ZeRO, flat_unit.py): DCP reshards on
                                 load, so a checkpoint loads on another world size or ZeRO
                                 stage (and one written with ShardedTensors still loads)
  rank<R>.extra.pt               this rank's RNG state and loss-scaler state (tensors and
                                 numbers only: loaded weights-only)
  sdtrain.json                   step, model shape, world size and layout (pp, dp, ep),
                                 and the run's step-0 eval loss (`eval_baseline`), readable
                                 without torch
  manifest.json                  name, size and sha256 of every other file, written last
`checkpoints/latest` holds the name of the newest complete checkpoint.

A save writes into `step_<N>.partial/` and is renamed into place only after every rank
finished, so a crash mid-save leaves the previous checkpoint and `latest` intact.

checkpoint.async_save: DCP's async_save copies the state to CPU memory (the stall training
sees) and writes the files from a thread, over a gloo group of its own (its collectives must
never interleave with training's). The save is completed (digests, manifest, rename,
`latest`) when the next save starts or training ends: until then `latest` names the
previous checkpoint, as after a crash mid-save.
checkpoint_verify.py checks a checkpoint against all of this before anything loads it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from sdtrain.parallel.mesh import DistEnv
from sdtrain.parallel.strategy import Strategy
from sdtrain.train.checkpoint_layout import INFO, LATEST, checkpoint_dir, read_info
from sdtrain.train.checkpoint_manifest import digests, write_manifest
from sdtrain.train.safe_reader import SafeFileSystemReader, SafeLoadPlanner


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, env: DistEnv, async_save: bool = False):
        self.root = checkpoint_dir(run_dir)
        self.keep = keep
        self.env = env
        self.async_group = dist.new_group(backend="gloo") if async_save else None
        self.pending = None  # (future, step, model_shape) of an async save not yet completed
        # The run's step-0 eval loss, kept in every checkpoint of the run: metrics.jsonl has no
        # row for step 0, and a launch that fails writes no summary, so a resumed launch (after
        # a restart, or on another world size) reads it from the checkpoint it resumes.
        self.eval_baseline: float | None = None

    def save(self, step: int, strategy: Strategy, model_shape: dict) -> Path:
        """Save at `step`; with async_save, return once the state is copied (the files
        follow, and the checkpoint is completed by the next save or by finish())."""
        self.finish()
        final = self.root / f"step_{step}"
        partial = self.root / f"step_{step}.partial"
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crash
            partial.mkdir(parents=True)
        dist.barrier()
        extra = partial / f"rank{self.env.rank}.extra.pt"
        if self.async_group is not None:
            future = dcp.async_save(strategy.checkpoint_state(), checkpoint_id=partial, process_group=self.async_group)
            torch.save({**_rng_state(), **strategy.extra_state()}, extra)
            self.pending = (future, step, model_shape)
            return final
        dcp.save(strategy.checkpoint_state(), checkpoint_id=partial)
        torch.save({**_rng_state(), **strategy.extra_state()}, extra)
        self._complete(step, model_shape)
        return final

    def finish(self) -> None:
        """Complete an async save: wait for its files, then manifest, rename, `latest`."""
        if self.pending is not None:
            future, step, model_shape = self.pending
            self.pending = None
            future.result()
            self._complete(step, model_shape)

    def _complete(self, step: int, model_shape: dict) -> None:
        final = self.root / f"step_{step}"
        partial = self.root / f"step_{step}.partial"
        extra = partial / f"rank{self.env.rank}.extra.pt"
        # Each rank hashes the files it wrote, all at once; the gather is also the barrier
        # after which every rank's files are complete.
        written = digests([extra, *sorted(partial.glob(f"__{self.env.rank}_*.distcp"))])
        every_rank = [None] * self.env.world_size
        dist.all_gather_object(every_rank, written)
        if self.env.is_main:
            info = {"step": step, "model": model_shape, "world_size": self.env.world_size,
                    "layout": self.env.layout.as_dict(), "time": time.time()}
            if self.eval_baseline is not None and math.isfinite(self.eval_baseline):  # NaN is no JSON
                info["eval_baseline"] = self.eval_baseline
            (partial / INFO).write_text(json.dumps(info, indent=2))
            write_manifest(partial, {name: d for files in every_rank for name, d in files.items()})
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomically(self.root / LATEST, final.name)
            self._prune(keep_name=final.name)
        dist.barrier()

    def load(self, path: Path, strategy: Strategy) -> int:
        """Restore weights, optimizer, scaler and RNG in place; return the step to continue at."""
        dcp.load(strategy.checkpoint_state(), storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        strategy.after_load()
        info = read_info(path)
        self.eval_baseline = eval_baseline_in(info)
        extra_file = path / f"rank{self.env.rank}.extra.pt"
        # RNG and loss-scaler state belong to a rank's place in the layout it was written in.
        written_in = info.get("layout", {})
        same_layout = info["world_size"] == self.env.world_size and all(
            written_in.get(axis, 1) == getattr(self.env.layout, axis) for axis in ("pp", "tp"))
        if same_layout and extra_file.exists():
            extra = torch.load(extra_file, weights_only=True)
            _restore_rng(extra)
            strategy.load_extra_state(extra)
        elif (path / "rank0.extra.pt").exists():  # fp16's loss scale is the same on every rank: any rank's
            extra = torch.load(path / "rank0.extra.pt", weights_only=True)
            strategy.load_extra_state({key: extra[key] for key in ("loss_scale",) if key in extra})
        return int(info["step"])

    def _prune(self, keep_name: str) -> None:
        steps = sorted(
            (p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")),
            key=lambda p: int(p.name.split("_")[1]),
        )
        for old in steps[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old)


def eval_baseline_in(info: dict) -> float | None:
    """The step-0 eval loss a checkpoint's sdtrain.json carries, or None. sdtrain.json is
    input (read_info bounds its size): anything but a finite number is None."""
    value = info.get("eval_baseline")
    if type(value) not in (int, float) or not math.isfinite(value):
        return None
    return float(value)


def _rng_state() -> dict:
    extra = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        extra["rng_cuda"] = torch.cuda.get_rng_state()
    return extra


def _restore_rng(extra: dict) -> None:
    torch.set_rng_state(extra["rng_cpu"])
    if "rng_cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng_cuda"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
