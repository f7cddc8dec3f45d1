"""Top-k routing with capacity, as DeepSpeed's gating defines it (random token selection and
second-expert sampling off), in index form so that dispatch never builds an [S, E, C] tensor.

Rules (S tokens of one routing group, E experts, k choices per token):
- softmax in fp32; each token's k choices are its k highest probabilities (optionally shifted
  by a selection bias, which changes only *which* experts are chosen, never the weights);
- capacity C = max(ceil(k*S/E*capacity_factor), min_capacity), or with drop_tokens=False the
  largest per-expert count (dropless);
- slots are taken in token order, choice rank r of every token before rank r+1 of any
  (for k=2: every first choice before any second choice); an assignment past C is dropped;
- combine weight: k=1 the router probability itself (Switch); k>=2 the kept choices'
  probabilities renormalised over the token's kept choices; 0 where dropped;
- load-balancing loss E * sum_e mean_prob_e * first_choice_fraction_e for k <= 2, and with the
  fraction of all k*S assignments for k > 2 (DeepSpeed's topkgating).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F


@dataclass
class Routing:
    """Where each of a token's k choices goes. `slot` is the position in the expert's buffer;
    it is only meaningful where `kept` (a dropped assignment's slot is >= capacity)."""

    expert: torch.Tensor  # [S, k] long, the chosen experts, best first
    slot: torch.Tensor  # [S, k] long
    kept: torch.Tensor  # [S, k] bool
    weight: torch.Tensor  # [S, k] fp32 combine weights, 0 where dropped
    capacity: int
    tokens_per_expert: torch.Tensor  # [E] long, assignments before dropping
    dropped: torch.Tensor  # scalar long, assignments dropped
    aux_loss: torch.Tensor  # scalar fp32
    probs: torch.Tensor  # [S, E] fp32


@lru_cache(maxsize=256)  # every MoE layer asks it for the same shapes on every micro-batch
def capacity_for(num_tokens: int, num_experts: int, k: int, capacity_factor: float, min_capacity: int) -> int:
    # Computed in float32 the way DeepSpeed's _capacity does, so that a product that lands a
    # rounding error above an integer (10 * 1.1) gives the same C in both.
    per_expert = torch.tensor(num_tokens / num_experts) * torch.tensor(capacity_factor * k)
    return max(int(torch.ceil(per_expert).item()), min_capacity)


def route(
    logits: torch.Tensor,
    k: int,
    capacity_factor: float,
    min_capacity: int,
    drop_tokens: bool,
    selection_bias: torch.Tensor | None = None,
) -> Routing:
    num_tokens, num_experts = logits.shape
    if not 1 <= k <= num_experts:
        raise ValueError(f"top_k must be between 1 and the number of experts ({num_experts}), got {k}")
    probs = F.softmax(logits.float(), dim=-1)
    scores = probs if selection_bias is None else probs + selection_bias.detach().float()
    expert = torch.topk(scores, k, dim=-1).indices  # [S, k]

    # One row per assignment, all first choices before any second choice, tokens in order.
    choice_onehot = F.one_hot(expert.t(), num_experts)  # [k, S, E]
    by_rank = choice_onehot.reshape(k * num_tokens, num_experts)
    position = ((torch.cumsum(by_rank, dim=0) - 1) * by_rank).sum(dim=-1)
    slot = position.view(k, num_tokens).t()
    tokens_per_expert = by_rank.sum(dim=0)

    if drop_tokens:
        capacity = capacity_for(num_tokens, num_experts, k, capacity_factor, min_capacity)
    else:
        capacity = int(tokens_per_expert.max().item()) if num_tokens else 0
    kept = slot < capacity

    chosen = probs.gather(1, expert) * kept
    if k == 1:
        weight = chosen
    else:
        weight = chosen / chosen.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(chosen.dtype).eps)

    mean_prob = probs.mean(dim=0)
    if k <= 2:
        load_fraction = choice_onehot[0].float().mean(dim=0)
    else:
        load_fraction = choice_onehot.float().sum(dim=0).mean(dim=0) / k
    aux_loss = num_experts * (mean_prob * load_fraction).sum()

    return Routing(
        expert=expert,
        slot=slot,
        kept=kept,
        weight=weight,
        capacity=capacity,
        tokens_per_expert=tokens_per_expert,
        dropped=(~kept).sum(),
        aux_loss=aux_loss,
        probs=probs,
    )


def top_k_gating(logits: torch.Tensor, k: int, capacity_factor: float, min_capacity: int, drop_tokens: bool):
    """The dense form DeepSpeed returns: (combine_weights [S, E, C], dispatch_mask [S, E, C] bool,
    aux_loss, tokens_per_expert [E])."""
    r = route(logits, k, capacity_factor, min_capacity, drop_tokens)
    num_tokens, num_experts = logits.shape
    buffer = num_experts * r.capacity
    # Dropped assignments go to one extra scratch column, cut off below, so the scatter has no branch.
    flat = torch.where(r.kept, r.expert * r.capacity + r.slot, torch.full_like(r.slot, buffer))
    combine = r.weight.new_zeros(num_tokens, buffer + 1).scatter_add(1, flat, r.weight)
    dispatch = torch.zeros(num_tokens, buffer + 1, dtype=torch.bool, device=logits.device).scatter_(1, flat, True)
    combine = combine[:, :buffer].view(num_tokens, num_experts, r.capacity)
    dispatch = dispatch[:, :buffer].view(num_tokens, num_experts, r.capacity)
    return combine, dispatch, r.aux_loss, r.tokens_per_expert


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: the mean over tokens of logsumexp(logits)^2, keeping router logits small."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()
