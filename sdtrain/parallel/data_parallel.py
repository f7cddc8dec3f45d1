"""ZeRO stage 0: plain data parallelism with DDP semantics (every rank holds everything,
gradients are all-reduced as an average in buckets that overlap backward)."""

from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sdtrain.parallel.mesh import DistEnv


def apply_data_parallel(model: nn.Module, env: DistEnv) -> nn.Module:
    if env.dp_size == 1:
        return model  # nothing to average; skip the wrapper and its hooks
    return DistributedDataParallel(
        model,
        device_ids=[env.local_rank] if env.device.type == "cuda" else None,
        process_group=env.dp_group,
        gradient_as_bucket_view=True,  # grads live in the buckets: one copy fewer
    )


def grad_sync(model: nn.Module, sync: bool):
    """Skip the all-reduce on every micro-batch but the last of a step."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()
