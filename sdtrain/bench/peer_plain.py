"""Peer: a plain PyTorch DDP loop around a llama written plainly in PyTorch (plain_llama.py),
not sdtrain's model (`sdtrain bench RECIPE --peers plain`, for `model.arch: llama`): the ratio
to it counts sdtrain's model code as well as its trainer. One worker: no DDP, the loop alone.

    torchrun --nproc-per-node 2 -m sdtrain.bench.peer_plain --recipe-json '{...}' --out t.json
"""

from __future__ import annotations

from sdtrain.bench.peer_common import join_process_group, parse_args, train_data_parallel
from sdtrain.bench.plain_llama import PlainLlama
from sdtrain.parallel.mesh import leave_process_group


def main() -> None:
    args, recipe = parse_args()
    device = join_process_group(recipe)
    with device:  # made where it trains
        model = PlainLlama(recipe["model"])
    train_data_parallel(model, recipe, args, device)
    leave_process_group()


if __name__ == "__main__":
    main()
