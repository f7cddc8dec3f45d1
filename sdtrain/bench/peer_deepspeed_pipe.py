"""Peer: DeepSpeed's pipeline (`deepspeed.pipe.PipelineModule`, `engine.train_batch()`, its
1F1B schedule) on the same GPT, at `--option P` stages and the recipe's micro-batches
(gradient_accumulation_steps = train.grad_accum_steps = M), the rest of the workers data
parallel; started by torchrun on the recipe's device and backend (gloo on CPU).

The model is sdtrain's own GPT cut into DeepSpeed layers, built lazily per stage by
LayerSpec from the same modules and first values (GPT's initial_value, by parameter name):
token embedding, position embedding, the blocks, the final norm, the head. The head is tied
to the token embedding as in sdtrain (TiedLayerSpec: the first and the last stage each hold
the matrix and DeepSpeed all-reduces its gradient between them every step), so the model,
its parameter count and its tied-weight traffic are sdtrain's. Blocks are split evenly over
the stages (partition `type:BlockPipe`, as sdtrain's `uniform`); the embeddings go with the
first block, the norm and head with the last.
"""

from __future__ import annotations

import itertools
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from sdtrain.bench.peer_common import (
    deepspeed_config,
    device_and_backend,
    micro_batches,
    parse_args,
    recipe_adamw,
    timed_loop,
)
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.mesh import leave_process_group


class TokenEmbedding(nn.Module):
    """The token embedding, or on the last stage the head that shares its matrix."""

    def __init__(self, cfg: GPTConfig, seed: int):
        super().__init__()
        self.embedding = GPT(cfg, seed, layers=[], first=True, last=False).tok_emb

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.embedding(idx)


def head_logits(embedding: TokenEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embedding.embedding.weight)


class PositionEmbedding(nn.Module):
    def __init__(self, cfg: GPTConfig, seed: int):
        super().__init__()
        self.embedding = GPT(cfg, seed, layers=[], first=True, last=False).pos_emb

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.embedding(torch.arange(x.size(1), device=x.device))


class BlockPipe(nn.Module):
    """Block `index` of the GPT, with the first values it has in the whole model."""

    def __init__(self, cfg: GPTConfig, seed: int, index: int):
        super().__init__()
        self.part = GPT(cfg, seed, layers=[index], first=False, last=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.part(x)


def layer_specs(cfg: GPTConfig, seed: int) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    return [
        TiedLayerSpec("embedding", TokenEmbedding, cfg, seed, tied_weight_attr=["embedding.weight"]),
        LayerSpec(PositionEmbedding, cfg, seed),
        *(LayerSpec(BlockPipe, cfg, seed, i) for i in range(cfg.n_layers)),
        LayerSpec(nn.LayerNorm, cfg.d_model, bias=cfg.bias),  # ones and zeros, as GPT's ln_f starts
        TiedLayerSpec("embedding", TokenEmbedding, cfg, seed, forward_fn=head_logits,
                      tied_weight_attr=["embedding.weight"]),
    ]


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))


def main() -> None:
    args, recipe = parse_args()
    device, backend = device_and_backend(recipe)
    os.environ.setdefault("DS_ACCELERATOR", device.type)  # read when deepspeed is imported
    import deepspeed
    from deepspeed.pipe import PipelineModule

    t, stages = recipe["train"], int(args.option)
    deepspeed.init_distributed(dist_backend=backend)
    cfg = GPTConfig(**recipe["model"])
    partition = "parameters" if recipe["parallel"]["pipeline"]["partition"] == "parameters" else "type:BlockPipe"
    model = PipelineModule(layer_specs(cfg, t["seed"]), num_stages=stages, loss_fn=cross_entropy,
                           partition_method=partition,
                           activation_checkpoint_interval=1 if t["activation_checkpointing"] else 0)
    optimizer = recipe_adamw(recipe, model.parameters(), device)
    config = deepspeed_config(recipe, {"stage": int(recipe["parallel"]["zero_stage"])})
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    # The first stage reads a micro-batch's inputs and the last its targets: both draw the
    # same samples, seeded by the data-parallel replica, not the rank.
    generator = torch.Generator().manual_seed(t["seed"] + engine.grid.get_data_parallel_id())
    batches = itertools.chain.from_iterable(micro_batches(recipe, generator, device) for _ in itertools.count())

    def train_step(step):
        return engine.train_batch(batches)  # M micro-batches through DeepSpeed's 1F1B schedule

    timed_loop(recipe, args, device, train_step)
    leave_process_group()


if __name__ == "__main__":
    main()
