"""What the trainer needs from a parallel strategy, whatever the ZeRO stage.

The trainer runs forward through `strategy.model`, calls `backward` per micro-batch inside
`micro_batch(is_last)`, then `step` once per global batch. Checkpoints see the same state
layout from every strategy: weights and Adam moments keyed by parameter name, as full
tensors or as ShardedTensors, so DCP can load any checkpoint into any strategy and size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")


def base_name(name: str) -> str:
    """A parameter's name in the plain model, whatever wrappers were applied around it."""
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return name.removeprefix("module.")  # DDP


def decays(param: torch.Tensor) -> bool:
    """Weight decay applies to matrices (linear weights, embeddings), not biases or norms."""
    return param.dim() >= 2


def clip_coefficient(total_norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ applies: max_norm / (norm + 1e-6), at most 1."""
    return torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)


class Strategy:
    model: nn.Module

    def micro_batch(self, is_last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        """Finish gradient reduction, clip by global norm, update; returns the pre-clip norm."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict:
        """{"model": {name: weights}, "optim": {moment: {name: tensor}, "step": tensor}}; the
        tensors are the live ones (or views of them), so DCP loads in place."""
        raise NotImplementedError

    def after_load(self) -> None:
        """Propagate freshly loaded master state to whatever the forward pass reads."""

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def state_bytes(self) -> dict[str, int]:
        """Model-state bytes this rank holds, counted from the tensors: params, grads, optimizer."""
        raise NotImplementedError

    def comm_bytes(self) -> dict[str, int]:
        return {}


def init_adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, moments: dict) -> None:
    """Create AdamW's state up front (as its first step would), so a checkpoint can be
    loaded into it before any step, and so the moments can be views we choose."""
    fused = optimizer.param_groups[0].get("fused")
    step = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
    optimizer.state[param] = {"step": step, **moments}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
