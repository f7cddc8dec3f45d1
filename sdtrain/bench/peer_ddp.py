"""Peer: a plain PyTorch DDP loop (`sdtrain bench --peers torch`), on the recipe's device
and backend (NCCL on GPUs, gloo on CPU).

    torchrun --nproc-per-node 2 -m sdtrain.bench.peer_ddp --recipe-json '{...}' --out t.json
"""

from __future__ import annotations

from sdtrain.bench.peer_common import build_model, join_process_group, parse_args, train_data_parallel
from sdtrain.parallel.mesh import leave_process_group


def main() -> None:
    args, recipe = parse_args()
    device = join_process_group(recipe)
    model = build_model(recipe, device)
    train_data_parallel(model, recipe, args, device)
    leave_process_group()


if __name__ == "__main__":
    main()
