"""Peer: PyTorch FSDP2 (`fully_shard` on every block, then the root).

`--option reshard` frees each block's gathered weights after forward (like ZeRO-3);
`--option keep` keeps them until backward (like ZeRO-2).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from sdtrain.bench.peer_common import build_model, micro_batches, parse_args, timed_loop


def main() -> None:
    args, recipe = parse_args()
    t = recipe["train"]
    dist.init_process_group("gloo")
    model = build_model(recipe)
    reshard = args.option != "keep"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) if t["precision"] == "bf16" else MixedPrecisionPolicy()
    for block in model.blocks:
        fully_shard(block, reshard_after_forward=reshard, mp_policy=policy)
    fully_shard(model, reshard_after_forward=reshard, mp_policy=policy)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t["lr"], betas=(t["beta1"], t["beta2"]),
                                  weight_decay=t["weight_decay"])
    generator = torch.Generator().manual_seed(t["seed"] + dist.get_rank())
    accum = t["grad_accum_steps"]

    def train_step(step):
        for i, (inputs, targets) in enumerate(micro_batches(recipe, generator)):
            model.set_requires_gradient_sync(i == accum - 1)
            logits, _ = model(inputs)
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"] or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    timed_loop(recipe, args, train_step)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
