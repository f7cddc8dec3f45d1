"""Tensor parallelism (Megatron-LM), applied to sdtrain's GPT from outside: the model keeps no
distributed code, its layers are swapped for parallel ones holding this rank's piece.

What each rank of the tensor-parallel group holds:
- attention: qkv column-parallel with the heads split over the ranks: q, k and v each cut
  by heads, so a rank's qkv holds its heads' q, k and v (rows [0:C], [C:2C], [2C:3C] of the
  whole, each sliced); proj row-parallel. n_heads becomes the local count.
  llama's: q column-parallel by query heads, k and v by key/value heads (a rank's query heads
  are exactly the groups of its key/value heads, as n_kv_heads divides by T), proj
  row-parallel; n_heads and n_kv_heads become the local counts. The attention module takes its
  input into the tp region once for q, k and v (one gather, one gradient sum, not three);
  rotary embedding then turns each local head at the token's place in the whole sequence,
  which the attention sees whole even under sequence parallelism.
- MLP: fc column-parallel, proj row-parallel. llama's SwiGLU: gate and up column-parallel
  (sharing their input's way into the tp region, as q, k and v do), proj row-parallel.
- the token embedding, and the head (tied to it or not), vocabulary-parallel
  (vocab_parallel.py): the loss never makes the whole vocabulary's logits.
- position embedding and layer norms (LayerNorm, llama's RMSNorm): whole (replicated over tp).
- MoE MLPs: whole on every tp rank (router and experts replicated over tp, experts split
  over ep as without TP), routing the whole micro-batch as one process does (tp_moe.py).
With sequence parallelism, between the layers every rank holds its part of the sequence:
norms, dropout and residual adds run on it; an all-gather before each column-parallel layer
and a reduce-scatter after each row-parallel one replace the all-reduces (tp_collectives.py).

Weights start as the one-process model's: a real parameter is sliced from its whole value,
and a meta one (a ZeRO model, made later) takes `initial_shard`, the slice of the whole
name-seeded tensor. Apply before activation checkpointing, compile and data parallelism
(torchtitan's order), on a model whose parameters are not yet wrapped.

Gradients of the pieces are complete on their rank. Those of the parameters whole on every
tp rank are equal there without sequence parallelism (their inputs and output gradients are
whole and equal). With it, each rank's norms, row-parallel biases and position embedding saw
only its part of the sequence (an MoE layer sees the whole one: its gradients are complete,
tp_moe.py): their gradients are partial sums, named in
`TensorParallelPlan.partial_grads` and summed over tp by `sum_partial_grads` (one
all-reduce). That sum commutes with averaging over dp, so a data-parallel strategy calls it
any time after the step's last backward and before the gradient norm and the update; under
ZeRO on its shards too (their layout is the same on every tp rank).

Dropout: every tp rank draws the same masks (one seed, the same calls). That is required
where the activations are whole and must stay equal on every rank (without sequence
parallelism), but it correlates the masks of different heads, and of different parts of the
sequence, where the ranks hold different ones; Megatron forks a generator seeded per tp rank
there. Not done yet (dropout is 0 in every recipe so far).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from sdtrain.model.gpt import GPT, MLP
from sdtrain.model.llama import SwiGLU
from sdtrain.model.moe.layer import MoEMLP
from sdtrain.model.size import mlp_width
from sdtrain.parallel.placement import DENSE, AxisShard, Placement, Placements
from sdtrain.parallel.strategy import base_name
from sdtrain.parallel.tp_checks import check_tensor_parallel
from sdtrain.parallel.tp_collectives import TensorParallel, into_tp_region
from sdtrain.parallel.tp_linear import ColumnParallelLinear, RowParallelLinear
from sdtrain.parallel.tp_moe import moe_parameter_names, route_whole_sequence
from sdtrain.parallel.vocab_parallel import SequencePartPositions, VocabParallelEmbedding, VocabParallelHeadLoss


@dataclass
class TensorParallelPlan:
    tp: TensorParallel
    # Keyed by base name (placement.py's key), as the plain model names its parameters.
    shards: dict[str, AxisShard | None]  # every parameter -> its cut over "tp", None where whole
    partial_grads: list[str]  # whole parameters whose gradients are partial sums over tp

    def placements(self) -> Placements:
        """Every parameter's placement, for a dense model (experts would add their ep shard)."""
        return {name: Placement(shards=(shard,)) if shard else DENSE for name, shard in self.shards.items()}

    def sum_partial_grads(self, model: nn.Module) -> None:
        """Sum the partial gradients over tp, in one all-reduce (see the module's docstring)."""
        partial = set(self.partial_grads)  # base names: the model may be wrapped since (checkpointing, compile, DDP)
        grads = [p.grad for name, p in model.named_parameters() if base_name(name) in partial and p.grad is not None]
        if not grads:
            return
        flat = self.tp.all_reduce(torch.cat([g.flatten() for g in grads]), kind="all_reduce_grads")
        for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
            grad.copy_(part.view_as(grad))


def apply_tensor_parallel(model: GPT, tp: TensorParallel) -> TensorParallelPlan:
    cfg = model.cfg
    llama = cfg.arch == "llama"
    check_tensor_parallel(tp.size, cfg.n_heads, mlp_width(cfg), cfg.vocab_size, cfg.seq_len, tp.sequence_parallel,
                          *((cfg.n_kv_heads, "model.ffn_hidden") if llama else ()))
    shards: dict[str, AxisShard | None] = {name: None for name, _ in model.named_parameters()}

    def cut(name: str, whole: torch.Tensor, dim: int, pieces: int = 1) -> torch.Tensor:
        local = whole.size(dim) // pieces // tp.size
        # start: where this rank's slice begins within each of the `pieces` parts (q, k, v)
        shards[name] = AxisShard("tp", dim, whole.size(dim), tp.rank * local, pieces, local if pieces > 1 else 0)
        if whole.is_meta:
            shape = list(whole.shape)
            shape[dim] //= tp.size
            return torch.empty(shape, dtype=whole.dtype, device="meta")
        return tp_piece(whole.detach(), shards[name], tp.size).clone()

    def column(prefix: str, linear: nn.Linear, pieces: int = 1, shared_input: bool = False) -> ColumnParallelLinear:
        bias = None if linear.bias is None else cut(f"{prefix}.bias", linear.bias, 0, pieces)
        layer = ColumnParallelLinear(cut(f"{prefix}.weight", linear.weight, 0, pieces), bias, tp)
        layer.input_in_tp_region = shared_input  # its module takes the input into the tp region once
        return layer

    def row(prefix: str, linear: nn.Linear) -> RowParallelLinear:
        bias = None if linear.bias is None else linear.bias.detach()  # whole: added once, after the sum
        return RowParallelLinear(cut(f"{prefix}.weight", linear.weight, 1), bias, tp)

    for key, block in model.blocks.items():
        attn, mlp = block.attn, block.mlp
        if llama:
            for name in ("q", "k", "v"):  # q by query heads, k and v by key/value heads
                setattr(attn, name, column(f"blocks.{key}.attn.{name}", getattr(attn, name), shared_input=True))
            attn.n_kv_heads //= tp.size
            enter_tp_region_once(attn, tp)
        else:
            attn.qkv = column(f"blocks.{key}.attn.qkv", attn.qkv, pieces=3)  # q, k and v each cut by heads
        attn.proj = row(f"blocks.{key}.attn.proj", attn.proj)
        attn.n_heads //= tp.size
        if isinstance(mlp, MLP):
            mlp.fc = column(f"blocks.{key}.mlp.fc", mlp.fc)
            mlp.proj = row(f"blocks.{key}.mlp.proj", mlp.proj)
        elif isinstance(mlp, SwiGLU):
            mlp.gate = column(f"blocks.{key}.mlp.gate", mlp.gate, shared_input=True)
            mlp.up = column(f"blocks.{key}.mlp.up", mlp.up, shared_input=True)
            mlp.proj = row(f"blocks.{key}.mlp.proj", mlp.proj)
            enter_tp_region_once(mlp, tp)
        elif isinstance(mlp, MoEMLP) and tp.sequence_parallel:
            route_whole_sequence(mlp, tp)
    vocab_start = tp.rank * (cfg.vocab_size // tp.size)
    tied = model.tok_emb is not None and model.lm_head is not None and model.lm_head.weight is model.tok_emb.weight
    if model.tok_emb is not None:
        model.tok_emb = VocabParallelEmbedding(cut("tok_emb.weight", model.tok_emb.weight, 0), vocab_start, tp)
        if tp.sequence_parallel and model.pos_emb is not None:  # llama has none: its positions are rotary
            model.pos_emb = SequencePartPositions(model.pos_emb, tp)
    if model.lm_head is not None:
        head = model.lm_head
        head.weight = model.tok_emb.weight if tied else nn.Parameter(cut("lm_head.weight", head.weight, 0))
        head.out_features = head.weight.size(0)
        model.head_loss = VocabParallelHeadLoss(model.head_loss.chunk_tokens, vocab_start, tp)
    complete = moe_parameter_names(model)  # the MoE layers saw the whole sequence
    whole = [name for name, shard in shards.items() if shard is None and name not in complete]
    return TensorParallelPlan(tp, shards, whole if tp.sequence_parallel else [])


def enter_tp_region_once(module: nn.Module, tp: TensorParallel) -> None:
    """The module's input taken into the tp region (gathered along the sequence under sequence
    parallelism, else copied) once, before its column-parallel layers that all read it: their
    input gradients are summed over tp by that one collective's backward."""
    module.register_forward_pre_hook(lambda _, args: (into_tp_region(args[0], tp), *args[1:]))


def tp_piece(whole: torch.Tensor, shard: AxisShard, size: int) -> torch.Tensor:
    """This rank's piece of the whole tensor: of each of its `shard.pieces` equal parts along
    `shard.dim` (q, k and v of a fused qkv), the slice starting at `shard.start`."""
    local = shard.whole // shard.pieces // size
    parts = whole.chunk(shard.pieces, dim=shard.dim)
    return torch.cat([part.narrow(shard.dim, shard.start, local) for part in parts], dim=shard.dim)


def tp_whole(pieces_in_rank_order: list[torch.Tensor], shard: AxisShard) -> torch.Tensor:
    """The whole tensor from every rank's piece (for an export or a consolidated checkpoint)."""
    per_rank = [piece.chunk(shard.pieces, dim=shard.dim) for piece in pieces_in_rank_order]
    return torch.cat([part for k in range(shard.pieces) for part in (rank[k] for rank in per_rank)], dim=shard.dim)


def initial_shard(model: GPT, name: str, out: torch.Tensor, shard: AxisShard, size: int) -> None:
    """Write parameter `name`'s first value, this rank's piece of it, into `out`: the slice
    of the whole name-seeded tensor (GPT.initial_value), so every tp size starts alike."""
    shape = list(out.shape)
    shape[shard.dim] = shard.whole
    whole = torch.empty(shape, dtype=out.dtype, device=out.device)
    model.initial_value(name, whole)
    out.copy_(tp_piece(whole, shard, size))
