"""Peer: PyTorch's own tensor parallelism (DTensor, `parallelize_module` with ColwiseParallel,
RowwiseParallel and SequenceParallel, the plan torchtitan applies), on the same GPT and batch.

Every worker is one tensor-parallel rank (tp = world; no data parallelism: every rank reads
the same batch). The plan is Megatron's with sequence parallelism: the token and position
embeddings vocabulary- / position-parallel with their outputs split along the sequence,
norms on sequence shards, attention's fused qkv and the MLP's up-projection column-parallel,
both output projections row-parallel, the head (tied or not) column-parallel into a loss that
never gathers whole logits (`loss_parallel`). A llama model (model.arch llama): q, k and v, and
SwiGLU's gate and up column-parallel (each by whole heads: torch's contiguous rows are already
a rank's heads), the RMSNorms on sequence shards, no position embedding.

torch's ColwiseParallel cuts a fused qkv weight into contiguous rows, which would hand rank 0
all of q and half of k. So its rows are first reordered to [q, k, v of rank 0's heads,
q, k, v of rank 1's heads, ...]: the same function, and each rank's slice holds its own
heads' q, k and v, as sdtrain's tensor parallelism splits them.

    torchrun --nproc-per-node 2 -m sdtrain.bench.peer_dtensor_tp --recipe-json '{...}' --out t.json
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

from sdtrain.bench.peer_common import build_model, join_process_group, parse_args, train_plain
from sdtrain.parallel.mesh import leave_process_group


def heads_by_rank(qkv_weight: torch.Tensor, tp: int) -> torch.Tensor:
    """The fused [q; k; v] rows reordered so that tp contiguous slices each hold one rank's
    heads of q, k and v."""
    q, k, v = (part.chunk(tp) for part in qkv_weight.chunk(3))
    return torch.cat([torch.cat([q[r], k[r], v[r]]) for r in range(tp)])


def tensor_parallel_plan(model) -> dict:
    llama = model.cfg.arch == "llama"
    gathered_for_compute = PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    # attention is called with (x, cache): the cache (None in training) is no tensor to lay out
    gathered_attention = PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None))
    plan = {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "ln_f": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    }
    if not llama:  # llama's positions are rotary: no weights
        plan["pos_emb"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(0))
    columns = ["attn.q", "attn.k", "attn.v", "mlp.gate", "mlp.up"] if llama else ["attn.qkv", "mlp.fc"]
    for key in model.blocks:
        plan.update({
            f"blocks.{key}.ln_attn": SequenceParallel(),
            f"blocks.{key}.attn": gathered_attention,
            f"blocks.{key}.attn.proj": RowwiseParallel(output_layouts=Shard(1)),
            f"blocks.{key}.ln_mlp": SequenceParallel(),
            f"blocks.{key}.mlp": gathered_for_compute,
            f"blocks.{key}.mlp.proj": RowwiseParallel(output_layouts=Shard(1)),
        })
        plan.update({f"blocks.{key}.{name}": ColwiseParallel() for name in columns})
    return plan


def split_heads(model, tp: int) -> None:
    """Each rank's attention computes its heads: gpt2's fused qkv reordered first (see above)."""
    with torch.no_grad():
        for block in model.blocks.values():
            if model.cfg.arch == "llama":
                block.attn.n_kv_heads //= tp
            else:
                block.attn.qkv.weight.copy_(heads_by_rank(block.attn.qkv.weight, tp))
                if block.attn.qkv.bias is not None:
                    block.attn.qkv.bias.copy_(heads_by_rank(block.attn.qkv.bias, tp))
            block.attn.n_heads //= tp  # the heads this rank computes


def main() -> None:
    args, recipe = parse_args()
    device = join_process_group(recipe)
    tp = dist.get_world_size()
    mesh = init_device_mesh(device.type, (tp,), mesh_dim_names=("tp",))
    model = build_model(recipe, device)
    split_heads(model, tp)
    parallelize_module(model, mesh, tensor_parallel_plan(model))
    if model.cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight  # one sharded matrix, still tied
    # the cross-entropy and its backward over vocabulary shards, inside loss_parallel
    train_plain(model, recipe, args, device, sync=lambda last: loss_parallel())
    leave_process_group()


if __name__ == "__main__":
    main()
