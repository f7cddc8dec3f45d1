"""Peer: DeepSpeed's own NVMe offload (ZeRO-Infinity) at ZeRO-3, `--option optimizer` (the
optimizer state in files, as sdtrain's zero3-nvme row) or `--option params` (the stage-3
weight shards too, as zero3-nvme-params), started by torchrun on the recipe's device and
backend (gloo on CPU).

The files live in a folder beside the round's result file (under the bench's run folder) and
are removed when the peer ends, however it ends. DeepSpeed's offload wants its own CPU Adam
(DeepSpeedCPUAdam, AdamW mode at the recipe's lr, betas and weight decay); it and the async-I/O
op (libaio) are JIT-compiled by DeepSpeed on first use (cached after), before the clock starts.
The precision is the recipe's (DeepSpeed's bf16 block, else fp32), as the sdtrain row's. Besides tokens/s it reports, from rank 0 after the warm-up interval, the
bytes its process read from and wrote to the disk per step (/proc/self/io: the kernel's count,
page-cache hits excluded) and the time its training thread spent in DeepSpeed's swap calls
(the I/O the step waited on, as sdtrain's offload_wait_s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from sdtrain.bench.offload_peer import PARAMS_ON_CPU
from sdtrain.bench.peer_common import (
    build_model,
    deepspeed_config,
    deepspeed_step,
    device_and_backend,
    parse_args,
    timed_loop,
)
from sdtrain.parallel.mesh import leave_process_group

OPTIONS = ("optimizer", "params")
MiB = 2**20
PERSISTENCE_THRESHOLD = 10**5  # DeepSpeed's default: weights this small stay resident, never swapped
# DeepSpeed's aio block: 1 MiB requests, 8 in flight, 2 I/O threads (intra_op_parallelism is its
# thread_count); a sub-group under one block it keeps in memory
AIO = {"block_size": MiB, "queue_depth": 8, "intra_op_parallelism": 2, "single_submit": False,
       "overlap_events": True}


def nvme_config(folder: str, model=None) -> dict:
    """zero_optimization for ZeRO-3 with the optimizer (and, given the model, its weights) on NVMe.
    DeepSpeed swaps each weight into a buffer of its own, and a block's gather holds every one
    of its weights at once (small ones stay resident, under the persistence threshold), so the
    buffers are sized to the largest weight and counted for two blocks: one gathered, one
    prefetched, besides the embeddings."""
    nvme = {"device": "nvme", "nvme_path": folder, "pin_memory": False}
    zero = {"stage": 3, "overlap_comm": True, "offload_optimizer": {**nvme, "buffer_count": 4},
            "stage3_param_persistence_threshold": PERSISTENCE_THRESHOLD}
    if model is not None:
        block = [p for p in next(iter(model.blocks.values())).parameters() if p.numel() > PERSISTENCE_THRESHOLD]
        largest = max(p.numel() for p in model.parameters())
        zero["offload_param"] = {**nvme, "buffer_count": 2 * len(block) + 4, "buffer_size": largest, "max_in_cpu": 0}
    return zero



def disk_bytes() -> tuple[int, int]:
    """(read, written) bytes this process moved to or from storage so far (page cache excluded)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def async_io_unavailable() -> str | None:
    """Why DeepSpeed's async_io op (libaio) cannot run here, or None: it is built (or JIT-compiled)
    now, before any timing, so a machine without libaio skips the peer with DeepSpeed's reason."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if builder is None:
        return f"DeepSpeed's {get_accelerator().device_name()} accelerator has no async_io op"
    if not builder.is_compatible(verbose=False):
        return "DeepSpeed's async_io op does not build here (it needs libaio: apt-get install libaio-dev)"
    try:
        builder.load(verbose=False)
    except Exception as exc:  # a compile error is DeepSpeed's to report, in its own words
        last = str(exc).strip().splitlines()[-1:] or [type(exc).__name__]
        return f"DeepSpeed's async_io op failed to build: {last[0][:200]}"
    return None


def main() -> None:
    args, recipe = parse_args()
    if args.option not in OPTIONS:
        raise SystemExit(f"--option {args.option!r}: one of {', '.join(OPTIONS)}")
    device, backend = device_and_backend(recipe)
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # read when deepspeed is imported
    import deepspeed
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    folder = Path(f"{args.out}-deepspeed-nvme")
    why_not = PARAMS_ON_CPU if args.option == "params" and device.type == "cpu" else async_io_unavailable()
    if why_not:  # a note in the bench's table, not a failed peer: nothing of DeepSpeed's ran
        if int(os.environ.get("RANK", 0)) == 0:
            Path(args.out).write_text(json.dumps({"skipped": why_not}))
        return
    # torchrun ends the other ranks with SIGTERM when one fails: leave through the finally
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        run(args, recipe, device, backend, deepspeed, DeepSpeedCPUAdam, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    leave_process_group()


def run(args, recipe, device, backend, deepspeed, cpu_adam, folder: Path) -> None:
    t = recipe["train"]
    deepspeed.init_distributed(dist_backend=backend)
    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(recipe, device)
    optimizer = cpu_adam(model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                         weight_decay=t["weight_decay"], adamw_mode=True)
    config = deepspeed_config(recipe, nvme_config(str(folder), model if args.option == "params" else None))
    config["aio"] = AIO
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    generator = torch.Generator().manual_seed(t["seed"] + dist.get_rank())
    io = SwapIO(warm_up_steps=args.interval)

    def train_step(step):
        loss = deepspeed_step(engine, recipe, generator, device)
        io.after_step(step)
        return loss

    timed_loop(recipe, args, device, train_step, extra=io.numbers)


class SwapIO:
    """Rank 0's disk bytes and the time its training thread spent inside DeepSpeed's swap calls
    (submitting and waiting on reads and writes of optimizer state and weight shards), per step
    over the steps after the warm-up interval. The calls are DeepSpeed's own, timed from outside
    (its stage-3 timers are reset and printed inside every step when switched on)."""

    def __init__(self, warm_up_steps: int):
        self.warm_up_steps, self.steps, self.swap_s, self.inside = warm_up_steps, 0, 0.0, False
        self.start_bytes = (0, 0)
        from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
        from deepspeed.runtime.swap_tensor.partitioned_param_swapper import AsyncPartitionedParameterSwapper
        from deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper import PipelinedOptimizerSwapper

        for cls in (PartitionedOptimizerSwapper, PipelinedOptimizerSwapper):
            self._time(cls, "swap_in_optimizer_state", "swap_out_optimizer_state", "swap_out_gradients",
                       "flush_gradients")
        self._time(AsyncPartitionedParameterSwapper, "swap_in", "synchronize_reads", "synchronize_writes")

    def _time(self, cls, *names: str) -> None:
        for name in names:
            setattr(cls, name, self._timed(getattr(cls, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            if self.inside:  # one swap call inside another: the outer one's time holds it
                return method(*args, **kwargs)
            self.inside, began = True, time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.swap_s += time.perf_counter() - began
                self.inside = False
        return timed

    def after_step(self, step: int) -> None:
        if step == self.warm_up_steps:
            self.start_bytes, self.swap_s = disk_bytes(), 0.0
        elif step > self.warm_up_steps:
            self.steps += 1

    def numbers(self) -> dict:
        if not self.steps:
            return {}
        read, written = (b - a for a, b in zip(self.start_bytes, disk_bytes()))
        return {"offload_wait_s": self.swap_s / self.steps, "offload_read_gib": read / self.steps / 2**30,
                "offload_write_gib": written / self.steps / 2**30}


if __name__ == "__main__":
    main()
