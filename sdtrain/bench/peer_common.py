"""What every bench peer shares: its arguments, the same GPT and batch shape as the sdtrain
run on the same device and backend, a timed loop, and the JSON it leaves for `sdtrain bench`.

A peer is started by torchrun (or its own launcher, or none: the single-device ones) and
knows nothing of sdtrain's launcher, trainer, data path or strategies: only the model module
is shared, so the ratio measures the framework, not a different network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sdtrain.model import GPT, GPTConfig

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe-json", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--option", default="", help="peer-specific: a ZeRO stage, a reshard flag")
    args, _ = parser.parse_known_args()  # DeepSpeed's launcher adds --local_rank
    return args, json.loads(args.recipe_json)


class GPTWithHead(GPT):
    """The same GPT, its forward ending in the logits, as a plain training loop expects."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.logits(super().forward(idx))


def device_and_backend(recipe) -> tuple[torch.device, str]:
    """Where the recipe's own run would train, by the rule sdtrain's workers follow
    (parallel/mesh.py, init_distributed): CUDA and NCCL where a GPU is visible and
    launch.backend is not gloo, else CPU and gloo. So on a GPU a ratio divides GPU
    throughput by GPU throughput."""
    backend = recipe["launch"]["backend"]
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device, "nccl" if backend == "auto" else backend
    return torch.device("cpu"), "gloo"


def join_process_group(recipe) -> torch.device:
    device, backend = device_and_backend(recipe)
    dist.init_process_group(backend)
    return device


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def build_model(recipe, device: torch.device) -> GPT:
    with device:  # made where it trains: no whole-model copy from host memory
        return GPTWithHead(GPTConfig(**recipe["model"]), seed=recipe["train"]["seed"])


def micro_batches(recipe, generator: torch.Generator, device: torch.device):
    m, t = recipe["model"], recipe["train"]
    for _ in range(t["grad_accum_steps"]):
        data = torch.randint(0, m["vocab_size"], (t["micro_batch_size"], m["seq_len"] + 1), generator=generator)
        data = data.to(device)
        yield data[:, :-1], data[:, 1:]


def precision_autocast(recipe, device: torch.device):
    """The recipe's precision as sdtrain's trainer applies it: autocast to bf16 or fp16."""
    dtype = AUTOCAST_DTYPES.get(recipe["train"]["precision"])
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def peak_memory_gib(device: torch.device) -> float:
    """CUDA allocator peak on GPU, peak RSS on CPU: what sdtrain's runs report."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed_loop(recipe, args, device: torch.device, train_step: Callable[[int], torch.Tensor],
               extra: Callable[[], dict] = dict) -> None:
    """Run train_step(step) for every step, sample tokens/s every `interval` steps, and
    have rank 0 write them with every rank's peak memory."""
    t = recipe["train"]
    tokens = args.interval * t["global_batch_size"] * recipe["model"]["seq_len"]
    samples, start = [], time.perf_counter()
    for step in range(1, t["steps"] + 1):
        loss = train_step(step)
        if step % args.interval == 0:
            loss.item()  # wait for the step
            now = time.perf_counter()
            samples.append(tokens / (now - start))
            start = now
    peaks = [torch.tensor([peak_memory_gib(device)], device=device)]
    if dist.is_initialized():
        mine, peaks = peaks[0], [torch.zeros(1, device=device) for _ in range(dist.get_world_size())]
        dist.all_gather(peaks, mine)
    if rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"tokens_per_s": samples, "peak_mem_gib": [round(p.item(), 3) for p in peaks],
                       "device": str(device), "omp_threads": os.environ.get("OMP_NUM_THREADS"), **extra()}, f)


def plain_loss(model) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """nanoGPT's loss: the logits of every token, cross-entropy in fp32."""

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    return loss_of


def train_plain(model, recipe, args, device: torch.device,
                sync: Callable[[bool], object] = lambda last: contextlib.nullcontext(),
                loss_fn: Callable | None = None, autocast: bool = True) -> None:
    """The loop the plain-PyTorch peers share: micro-batches (gradient sync only on the last
    one, through `sync`) under the recipe's autocast (unless the peer casts by itself),
    global-norm clipping, AdamW (fused, as sdtrain's), a loss scaler for fp16;
    timed by timed_loop."""
    t = recipe["train"]
    optimizer = recipe_adamw(recipe, model.parameters(), device)
    scaler = torch.amp.GradScaler(device.type, enabled=t["precision"] == "fp16")
    generator = torch.Generator().manual_seed(t["seed"] + rank())
    loss_of = loss_fn or plain_loss(model)
    accum = t["grad_accum_steps"]

    def train_step(step):
        for i, (inputs, targets) in enumerate(micro_batches(recipe, generator, device)):
            with sync(i == accum - 1):
                with precision_autocast(recipe, device) if autocast else contextlib.nullcontext():
                    loss = loss_of(inputs, targets)
                scaler.scale(loss / accum).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or float("inf"))
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    timed_loop(recipe, args, device, train_step)


def train_data_parallel(model, recipe, args, device: torch.device) -> None:
    """train_plain on one worker; on several, inside torch's DistributedDataParallel, whose
    gradients are all-reduced on the step's last micro-batch only (no_sync before it)."""
    from torch.nn.parallel import DistributedDataParallel

    if dist.get_world_size() == 1:
        train_plain(model, recipe, args, device)
        return
    model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                    gradient_as_bucket_view=True)
    train_plain(model, recipe, args, device, sync=lambda last: contextlib.nullcontext() if last else model.no_sync())


def recipe_adamw(recipe, params, device: torch.device) -> torch.optim.AdamW:
    """The recipe's AdamW, fused as sdtrain's: every peer's optimizer (the DeepSpeed peers hand
    it to DeepSpeed as its client optimizer)."""
    t = recipe["train"]
    return torch.optim.AdamW(params, lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                             weight_decay=t["weight_decay"], fused=device.type in ("cpu", "cuda"))


def deepspeed_step(engine, recipe, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One step of a DeepSpeed engine over the recipe's micro-batches (the engine steps its
    optimizer at the accumulation boundary only); the last micro-batch's loss."""
    for inputs, targets in micro_batches(recipe, generator, device):
        logits = engine(inputs)
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        engine.backward(loss)
        engine.step()
    return loss


def deepspeed_config(recipe, zero_optimization: dict) -> dict:
    """DeepSpeed's config for the recipe's batch split, clipping and precision."""
    t = recipe["train"]
    return {
        "train_micro_batch_size_per_gpu": t["micro_batch_size"],
        "gradient_accumulation_steps": t["grad_accum_steps"],
        "gradient_clipping": t["grad_clip"],
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero_optimization,
        "bf16": {"enabled": t["precision"] == "bf16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
