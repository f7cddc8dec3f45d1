"""Sharded, atomic, reshardable checkpoints through torch.distributed.checkpoint (DCP).

Layout of `checkpoints/step_<N>/`:
  .metadata, __<rank>_*.distcp   model + optimizer, keyed by parameter name (DCP), so a
                                 checkpoint loads on another world size or strategy
  rank<R>.extra.pt               this rank's RNG state and loss-scaler state (tensors and
                                 numbers only: loaded weights-only)
  sdtrain.json                   step, model shape and world size, readable without torch
`checkpoints/latest` holds the name of the newest complete checkpoint.

A save writes into `step_<N>.partial/` and is renamed into place only after every rank
finished, so a crash mid-save leaves the previous checkpoint and `latest` intact.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from sdtrain.parallel.mesh import DistEnv
from sdtrain.train.checkpoint_layout import INFO, LATEST, checkpoint_dir, read_info
from sdtrain.train.safe_reader import SafeFileSystemReader, SafeLoadPlanner


class Checkpointer:
    def __init__(self, run_dir: Path, keep: int, env: DistEnv):
        self.root = checkpoint_dir(run_dir)
        self.keep = keep
        self.env = env

    def save(self, step: int, model, optimizer, scaler, model_shape: dict) -> Path:
        final = self.root / f"step_{step}"
        partial = self.root / f"step_{step}.partial"
        if self.env.is_main:
            shutil.rmtree(partial, ignore_errors=True)  # debris of an earlier crash
            partial.mkdir(parents=True)
        dist.barrier()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)
        torch.save(_extra_state(scaler), partial / f"rank{self.env.rank}.extra.pt")
        dist.barrier()
        if self.env.is_main:
            info = {"step": step, "model": model_shape, "world_size": self.env.world_size, "time": time.time()}
            (partial / INFO).write_text(json.dumps(info, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _write_atomically(self.root / LATEST, final.name)
            self._prune(keep_name=final.name)
        dist.barrier()
        return final

    def load(self, path: Path, model, optimizer, scaler) -> int:
        """Restore model, optimizer, scaler and RNG in place; return the step to continue at."""
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=SafeLoadPlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        info = read_info(path)
        extra_file = path / f"rank{self.env.rank}.extra.pt"
        if info["world_size"] == self.env.world_size and extra_file.exists():
            _restore_extra(torch.load(extra_file, weights_only=True), scaler)
        return int(info["step"])

    def _prune(self, keep_name: str) -> None:
        steps = sorted(
            (p for p in self.root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial")),
            key=lambda p: int(p.name.split("_")[1]),
        )
        for old in steps[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old)


def _extra_state(scaler) -> dict:
    extra = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        extra["rng_cuda"] = torch.cuda.get_rng_state()
    if scaler is not None and scaler.is_enabled():
        extra["scaler"] = scaler.state_dict()
    return extra


def _restore_extra(extra: dict, scaler) -> None:
    torch.set_rng_state(extra["rng_cpu"])
    if "rng_cuda" in extra and torch.cuda.is_available():
        torch.cuda.set_rng_state(extra["rng_cuda"])
    if "scaler" in extra and scaler is not None:
        scaler.load_state_dict(extra["scaler"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
