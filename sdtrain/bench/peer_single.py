"""Peers on one device, no torch.distributed: nanoGPT's train.py loop on the same model and
batch. `--option eager` runs it as plain PyTorch (`sdtrain bench --peers eager`); `--option
compile` runs the model and its loss through torch.compile (`--peers compile`), as nanoGPT
does with compile=True. Compared with sdtrain's `single` run: the speed of one device with
nothing distributed in the way.

    python -m sdtrain.bench.peer_single --recipe-json '{...}' --out t.json --option compile
"""

from __future__ import annotations

import torch

from sdtrain.bench.peer_common import build_model, device_and_backend, parse_args, plain_loss, train_plain

OPTIONS = ("eager", "compile")


def main() -> None:
    args, recipe = parse_args()
    if args.option not in OPTIONS:
        raise SystemExit(f"--option {args.option!r}: one of {', '.join(OPTIONS)}")
    device, _ = device_and_backend(recipe)
    model = build_model(recipe, device)
    loss_fn = plain_loss(model)
    if args.option == "compile":
        # the first call compiles: inside the first (warm-up) interval, which the bench drops
        loss_fn = torch.compile(loss_fn)
    train_plain(model, recipe, args, device, loss_fn=loss_fn)


if __name__ == "__main__":
    main()
