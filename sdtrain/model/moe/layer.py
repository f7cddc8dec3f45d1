"""The MoE MLP: a router picks top-k experts per token (gating.route), the kept token copies
are gathered sorted by expert, the experts run as one grouped matmul on exactly those rows
(experts.py), and each token's outputs come back by index, weighted. Capacity decides which
assignments drop, but nothing is padded to it: no [S, E, C] tensor and no [E, C, d] buffer.
A routing group is the layer's input on one rank (one micro-batch), so which tokens compete
for capacity, and which drop, is the same at any EP and DP size.

The load-balancing and z losses join the training loss through the layer's output
(AddAuxLoss), so they need no plumbing through the model, a pipeline or the strategies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sdtrain.model.moe.balance import BiasBalancer
from sdtrain.model.moe.dispatch import LocalDispatch
from sdtrain.model.moe.experts import GroupedExperts
from sdtrain.model.moe.gating import route, router_z_loss


@dataclass(frozen=True)
class MoESettings:
    num_experts: int = 8
    top_k: int = 2
    every_n_layers: int = 2
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 2.0
    min_capacity: int = 4
    drop_tokens: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    balance: str = "aux_loss"

    def is_moe_layer(self, index: int) -> bool:
        return (index + 1) % self.every_n_layers == 0


class AddAuxLoss(torch.autograd.Function):
    """Identity on the layer's output; backward also starts the auxiliary loss's gradient,
    d(scale x aux) / d(aux) = scale: the aux loss counts in the training loss as the main loss
    does (scale is 1 / micro-batches per step, as each micro-batch's loss is divided)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale, ctx.aux_meta = scale, (aux.dtype, aux.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dtype, device = ctx.aux_meta
        return grad, torch.full((), ctx.scale, dtype=dtype, device=device), None


# Per-layer numbers summed over a logging interval: aux loss, z loss, routings, assignments
# dropped, assignments made; then the load of each expert.
STAT_FIELDS = 5


class MoEMLP(nn.Module):
    def __init__(self, d_model: int, hidden: int, moe: MoESettings, swiglu: bool = False):
        super().__init__()
        self.moe = moe
        self.router = nn.Linear(d_model, moe.num_experts, bias=False)
        self.experts = GroupedExperts(moe.num_experts, d_model, hidden, swiglu)  # swiglu: llama blocks' (Mixtral's)
        self.balancer = BiasBalancer(moe.num_experts) if moe.balance == "bias" else None
        self.dispatch = LocalDispatch()  # AllToAllDispatch under expert parallelism (set from outside)
        self.loss_scale = 1.0  # 1 / micro-batches per step (set from outside)
        self.stats: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        moe, shape = self.moe, x.shape
        tokens = x.reshape(-1, shape[-1])
        logits = self.router(tokens)
        bias = self.balancer.bias if self.balancer is not None else None
        capacity_factor = moe.capacity_factor if self.training else moe.eval_capacity_factor
        r = route(logits, moe.top_k, capacity_factor, moe.min_capacity, moe.drop_tokens, bias)
        token, choice = r.kept.nonzero(as_tuple=True)  # kept assignments, in token order
        expert, order = torch.sort(r.expert[token, choice], stable=True)  # by expert, token order within
        token, weight = token[order], r.weight[token, choice][order]
        counts = torch.bincount(expert, minlength=moe.num_experts)
        out = self.dispatch(self.experts, tokens[token], counts)
        weighted = out * weight.unsqueeze(1).to(out.dtype)
        y = out.new_zeros(tokens.shape[0], out.shape[-1]).index_add(0, token, weighted).view(shape)
        z_loss = router_z_loss(logits)
        if self.training and torch._C._current_graph_task_id() == -1:  # not a recompute in backward
            self._record(r, z_loss)
            if self.balancer is not None:
                self.balancer.observe(r.tokens_per_expert)
        aux = moe.aux_loss_coef * r.aux_loss + moe.z_loss_coef * z_loss
        if torch.is_grad_enabled() and aux.requires_grad and (moe.aux_loss_coef or moe.z_loss_coef):
            y = AddAuxLoss.apply(y, aux, self.loss_scale)
        return y

    @torch.no_grad()
    def _record(self, r, z_loss: torch.Tensor) -> None:
        row = torch.cat([torch.stack([r.aux_loss.float(), z_loss.float(), torch.ones((), device=z_loss.device),
                                      r.dropped.float(), r.tokens_per_expert.sum().float()]),
                         r.tokens_per_expert.float()])
        self.stats = row if self.stats is None else self.stats + row

    def take_stats(self) -> torch.Tensor:
        """The numbers summed since the last call (zeros if the layer did not run)."""
        stats = self.stats
        self.stats = None
        if stats is None:
            stats = torch.zeros(STAT_FIELDS + self.moe.num_experts, device=self.router.weight.device)
        return stats
