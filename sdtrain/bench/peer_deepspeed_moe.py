"""Peer: DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`) in the same GPT, at `--option
EP[:STAGE]` (expert-parallel size, ZeRO stage 0-2: DeepSpeed refuses MoE with ZeRO-3), started
by torchrun on the recipe's device and backend (gloo on CPU).

The model is sdtrain's GPT with the MLP of every `model.moe.every_n_layers`-th block (blocks
n-1, 2n-1, ...) replaced by DeepSpeed's MoE: the same E, top-k, capacity factor, minimum
capacity and dropping, with random token selection and second-expert sampling off (the
routing sdtrain's gating defines), each expert the same bias-free GELU MLP of width
mlp_ratio x d_model. The loss adds aux_loss_coef x DeepSpeed's load-balancing loss.

Besides tokens/s it reports the share of step time spent in the all-to-all (dispatch and
combine, forward and backward), timed around DeepSpeed's own calls after the warm-up interval.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.bench.peer_common import (
    GPTWithHead,
    deepspeed_config,
    device_and_backend,
    micro_batches,
    parse_args,
    precision_autocast,
    recipe_adamw,
    timed_loop,
)
from sdtrain.model.gpt import GPTConfig
from sdtrain.parallel.mesh import leave_process_group


class ExpertMLP(nn.Module):
    """One expert: sdtrain's expert MLP (no biases), as a module DeepSpeed copies per local expert."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(d_model, hidden, bias=False)
        self.proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


def deepspeed_moe(d_model: int, hidden: int, moe: dict, ep: int) -> nn.Module:
    """`deepspeed.moe.layer.MoE` at sdtrain's E, top-k, capacity and dropping, routing as
    sdtrain's gating defines (random token selection and second-expert sampling off)."""
    from deepspeed.moe.layer import MoE

    return MoE(d_model, ExpertMLP(d_model, hidden), num_experts=moe["num_experts"], ep_size=ep, k=moe["top_k"],
               capacity_factor=moe["capacity_factor"], eval_capacity_factor=moe["eval_capacity_factor"],
               min_capacity=moe["min_capacity"], drop_tokens=moe["drop_tokens"], use_rts=False,
               top2_2nd_expert_sampling=False)


class DeepSpeedMoEMLP(nn.Module):
    """A block's MLP slot holding DeepSpeed's MoE; keeps the layer's aux loss for the step's loss."""

    def __init__(self, cfg: GPTConfig, moe: dict, ep: int):
        super().__init__()
        self.moe = deepspeed_moe(cfg.d_model, cfg.mlp_ratio * cfg.d_model, moe, ep)
        self.aux_loss = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, self.aux_loss, _ = self.moe(x)
        return out


def moe_block_indices(n_layers: int, every_n_layers: int) -> list[int]:
    return [i for i in range(n_layers) if (i + 1) % every_n_layers == 0]


def build_moe_model(recipe, ep: int, device: torch.device) -> tuple[nn.Module, list[DeepSpeedMoEMLP]]:
    shape = {k: v for k, v in recipe["model"].items() if k != "moe"}
    cfg, moe = GPTConfig(**shape), recipe["model"]["moe"]
    with device:
        model = GPTWithHead(cfg, seed=recipe["train"]["seed"])
        layers = []
        for index in moe_block_indices(cfg.n_layers, moe["every_n_layers"]):
            layers.append(DeepSpeedMoEMLP(cfg, moe, ep))
            model.blocks[str(index)].mlp = layers[-1]
    return model, layers


class AllToAllClock:
    """Seconds spent in DeepSpeed's all_to_all_single (MoE dispatch and combine, both passes).
    On gloo the call returns when the exchange is done, so its wall time is the wait."""

    def __init__(self, comm):
        self.seconds = 0.0
        original = comm.all_to_all_single

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        comm.all_to_all_single = timed


def main() -> None:
    args, recipe = parse_args()
    device, backend = device_and_backend(recipe)
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # read when deepspeed is imported
    import deepspeed
    import deepspeed.comm
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    t = recipe["train"]
    ep, _, stage = args.option.partition(":")
    ep, stage = int(ep), int(stage or 0)
    deepspeed.init_distributed(dist_backend=backend)  # builds its comm op, if any, before the clock runs
    model, moe_layers = build_moe_model(recipe, ep, device)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": list(model.parameters()),
                                                                   "name": "parameters"})
    optimizer = recipe_adamw(recipe, groups, device)
    config = deepspeed_config(recipe, {"stage": stage, "overlap_comm": True,
                                       "reduce_bucket_size": int(recipe["parallel"]["zero"]["reduce_bucket_mb"] * 2**20)})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    clock = AllToAllClock(deepspeed.comm)
    aux_coef = recipe["model"]["moe"]["aux_loss_coef"]
    generator = torch.Generator().manual_seed(t["seed"] + deepspeed.comm.get_rank())
    measured = {"since": None, "all_to_all_s": 0.0}

    def train_step(step):
        if step == args.interval + 1:  # the warm-up interval is not measured, as for tokens/s
            measured["since"], clock.seconds = time.perf_counter(), 0.0
        for inputs, targets in micro_batches(recipe, generator, device):
            with precision_autocast(recipe, device):
                logits = engine(inputs)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            loss = loss + aux_coef * sum(layer.aux_loss for layer in moe_layers)
            engine.backward(loss)
            engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
        return loss

    def all_to_all_share() -> dict:
        elapsed = time.perf_counter() - measured["since"] if measured["since"] else 0.0
        return {"all_to_all_share": clock.seconds / elapsed if elapsed else None}

    timed_loop(recipe, args, device, train_step, extra=all_to_all_share)
    leave_process_group()


if __name__ == "__main__":
    main()
