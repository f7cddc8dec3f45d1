"""What the trainer needs from a parallel strategy, whatever the ZeRO stage or pipeline.

The trainer hands a step's micro-batches to `forward_backward` (a pipeline schedule must
own their order), then calls `step` once per global batch; evaluation goes through
`evaluate`, the same path without gradients. Checkpoints see the same state layout from
every strategy: weights and Adam moments keyed by parameter name, as full tensors or as
DTensors of a rank's boxes, so DCP can load any checkpoint into any strategy and size.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
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


def sum_of_squares(grads: list[torch.Tensor], device) -> torch.Tensor:
    """The squares of these gradients summed, in fp32, from one norm each as clip_grad_norm_
    takes them: a pass over each, with no squared copy (g.pow(2) made one the size of the
    model's gradients every step: 0.09 s of a ZeRO step at 51M parameters, the norm 0.017)."""
    if not grads:
        return torch.zeros((), device=device)
    return torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).pow(2).sum()


class Strategy:
    model: nn.Module  # what forward runs through (maybe wrapped, e.g. by DDP)
    env: object  # DistEnv
    loss_scaler = None  # fp16's LossScaler (loss_scale.py): the loss is scaled, the step unscales

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss backward starts from: times the loss scale under fp16."""
        return loss if self.loss_scaler is None else self.loss_scaler.scaled(loss)

    @property
    def plain(self) -> nn.Module:
        """The model itself, under any wrapper: it computes the loss."""
        return getattr(self.model, "module", self.model)

    def forward_backward(self, micro_batches: list, autocast) -> torch.Tensor:
        """Forward and backward over one step's micro-batches of this rank; the sum of their
        mean losses. Each backward sees its loss divided by the number of micro-batches, so
        the gradient is that of the mean over the rank's samples."""
        total = torch.zeros((), device=self.env.device)
        for i, (inputs, targets) in enumerate(micro_batches):
            with self.micro_batch(is_last=i == len(micro_batches) - 1):
                with autocast():
                    loss = self.plain.loss(self.model(inputs), targets)
                self.backward(self.scaled(loss / len(micro_batches)))
            total += loss.detach()
        return total

    @torch.no_grad()
    def evaluate(self, micro_batches: list, autocast) -> torch.Tensor:
        """The sum of the micro-batches' mean losses, without gradients."""
        total = torch.zeros((), device=self.env.device)
        for inputs, targets in micro_batches:
            with autocast():
                total += self.plain.loss(self.model(inputs), targets).float()
        return total

    def mean_loss(self, loss_sum: torch.Tensor, count: int) -> float:
        """The mean over the whole global batch of what forward_backward / evaluate returned
        on every rank (each rank summed `count` micro-batches)."""
        value = loss_sum.detach().float().clone() / count
        if self.env.dp_size > 1:
            dist.all_reduce(value, op=dist.ReduceOp.AVG, group=self.env.dp_group)
        return value.item()

    def log_metrics(self, mem_gib: float) -> dict:
        """Numbers the strategy adds to a metrics.jsonl record (called on every rank, with
        this rank's memory)."""
        return {}

    def micro_batch(self, is_last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, grad: torch.Tensor | None = None) -> None:
        loss.backward(grad)

    def grads_ready(self, params: list) -> None:
        """Gradients were written outside autograd (a zero-bubble W pass)."""

    def step(self, lr: float, grad_clip: float) -> torch.Tensor:
        """Finish gradient reduction, clip by global norm, update; returns the pre-clip norm.
        Between the norm and the update it asks update_allowed (the step's guard)."""
        raise NotImplementedError

    update_gate = None  # the trainer's step guard (train/nonfinite.py): global grad norm -> update or not

    def gate_updates(self, gate) -> None:
        self.update_gate = gate

    def update_allowed(self, norm: torch.Tensor) -> bool:
        """False: drop this step's update (the caller zeroes the gradients); the same
        answer on every rank."""
        return self.update_gate is None or self.update_gate(norm)

    def finish(self) -> None:
        """After the last step: nothing the strategy started may still be in flight."""

    def checkpoint_state(self) -> dict:
        """{"model": {name: weights}, "optim": {moment: {name: tensor}, "step": tensor}}; the
        tensors are the live ones (or views of them), so DCP loads in place."""
        raise NotImplementedError

    def after_load(self) -> None:
        """Propagate freshly loaded master state to whatever the forward pass reads."""

    def extra_state(self) -> dict:
        return {"loss_scale": self.loss_scaler.state_dict()} if self.loss_scaler is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.loss_scaler is not None:
            self.loss_scaler.load_extra_state(state)

    def state_bytes(self) -> dict[str, int]:
        """Model-state bytes this rank holds, counted from the tensors: params, grads, optimizer."""
        raise NotImplementedError

    def comm_bytes(self) -> dict[str, int]:
        return {}


def adamw(decay: list, no_decay: list, train, device: torch.device) -> torch.optim.AdamW:
    """The recipe's AdamW over two groups (weight decay on `decay` only). Fused on CPU as on
    CUDA: torch's single-tensor loop makes about ten passes over every parameter, the fused
    kernel one (an 11.5M-parameter step: 63 ms against 14 ms on one CPU thread). The results
    differ from the loop's in the last bit of some elements, never more."""
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, fused=device.type in ("cpu", "cuda"),
    )


def init_adam_state(optimizer: torch.optim.Optimizer, param: torch.Tensor, moments: dict) -> None:
    """Create AdamW's state up front (as its first step would), so a checkpoint can be
    loaded into it before any step, and so the moments can be views we choose."""
    fused = optimizer.param_groups[0].get("fused")
    step = torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu")
    optimizer.state[param] = {"step": step, **moments}


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)
