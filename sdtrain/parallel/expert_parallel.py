"""Expert parallelism, applied to a plain model from outside: each MoE layer keeps its
slice of the experts (E / ep of them, by global index) and sends tokens to the others
through the all-to-all dispatcher over the "ep" group.

Gradients: dense ones are averaged over the whole data-parallel group as always; expert
ones over the "edp" group only (the ranks holding the same experts), after being divided by
ep in backward (GroupedExperts.grad_scale), which together gives the mean over every rank's
tokens. The global gradient norm counts each expert once: the experts' squares summed over
the ep group, added to the dense ones. Which weights are experts, the strategies learn from
their placements (expert_placements, set once by parallelize), never from their names.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from sdtrain.model.moe.balance import BiasBalancer, update_balancers
from sdtrain.model.moe.dispatch import AllToAllClock, AllToAllDispatch
from sdtrain.model.moe.layer import STAT_FIELDS, MoEMLP
from sdtrain.parallel.placement import Placements, expert_placement
from sdtrain.parallel.strategy import base_name


def moe_layers(model: nn.Module) -> dict[str, MoEMLP]:
    return {base_name(name): m for name, m in model.named_modules() if isinstance(m, MoEMLP)}


def apply_expert_parallel(model: nn.Module, env, micro_batches: int) -> None:
    for name, layer in moe_layers(model).items():
        layer.loss_scale = 1.0 / micro_batches
        if layer.balancer is not None:  # made on the meta device with a ZeRO model: real and fp32 here
            for key in ("bias", "load"):
                setattr(layer.balancer, key, torch.zeros(layer.moe.num_experts, device=env.device))
        if env.ep_size == 1:
            continue
        local = layer.moe.num_experts // env.ep_size
        first = env.ep_rank * local
        layer.experts.keep(first, local)
        layer.experts.grad_scale = 1.0 / env.ep_size
        layer.dispatch = AllToAllDispatch(env.ep_group, env.ep_size)
        model.first_expert[f"{name}.experts"] = first


def expert_placements(model: nn.Module, env) -> Placements:
    """Each MoE layer's expert weights under expert parallelism (after apply_expert_parallel):
    this rank's slice of the layer's E experts, from its first, shared with its edp group. At
    ep 1 every data-parallel rank holds every expert: they are placed as dense weights are."""
    if env.ep_size == 1:
        return {}
    placements = {}
    for name, layer in moe_layers(model).items():
        placement = expert_placement(layer.moe.num_experts, model.first_expert[f"{name}.experts"])
        placements.update({f"{name}.experts.{key}": placement for key, _ in layer.experts.named_parameters()})
    return placements


def rank_local_buffers(model: nn.Module) -> list[str]:
    """The balancers' buffers, named as `model` names them (wrappers included): each rank
    counts its own load, which after_step sums over the ranks, so DDP must not broadcast
    rank 0's over the others'."""
    return [f"{name}.{key}" for name, m in model.named_modules() if isinstance(m, BiasBalancer)
            for key, _ in m.named_buffers()]


def after_step(model: nn.Module, env) -> None:
    """Aux-loss-free balancing: every layer's bias nudged by the load all ranks saw."""
    balancers = [m.balancer for m in moe_layers(model).values() if m.balancer is not None]
    group = env.dp_group
    update_balancers(balancers, (lambda t: dist.all_reduce(t, group=group)) if env.dp_size > 1 else None)


def balancer_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The balancers' biases, for checkpoints (the same on every rank)."""
    return {f"{name}.balancer.bias": m.balancer.bias for name, m in moe_layers(model).items() if m.balancer is not None}


def moe_metrics(model: nn.Module, env, num_experts: int) -> dict:
    """The MoE layers' numbers since the last report, over all ranks and layers: mean aux and
    z loss, load of the least and most loaded expert relative to the mean, assignments dropped
    (a fraction), and under expert parallelism the share of wall time in all-to-alls (the mean
    over ranks)."""
    layers = list(moe_layers(model).values())
    stats = torch.zeros(STAT_FIELDS + num_experts + 1, device=env.device)
    for layer in layers:
        stats[:-1] += layer.take_stats()
    share = AllToAllClock.take_share()
    stats[-1] = share or 0.0
    dist.all_reduce(stats)  # every stage's layers, every replica's tokens
    aux, z, count, dropped, assigned = stats[:STAT_FIELDS].tolist()
    load = stats[STAT_FIELDS:-1]
    mean = load.mean().clamp(min=1e-9)
    record = {"moe_aux_loss": aux / max(count, 1), "moe_z_loss": z / max(count, 1),
              "moe_load_min": (load.min() / mean).item(), "moe_load_max": (load.max() / mean).item(),
              "moe_dropped": dropped / max(assigned, 1)}
    if env.ep_size > 1:
        record["moe_all_to_all_share"] = round(stats[-1].item() / env.world_size, 4)
    return record
