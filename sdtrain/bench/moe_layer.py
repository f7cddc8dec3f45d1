"""One MoE layer, sdtrain's against DeepSpeed's, forward and backward, side by side:

    python -m sdtrain.bench.moe_layer [--tokens 512] [--d-model 256] [--experts 8] ...
    torchrun --nproc-per-node 2 -m sdtrain.bench.moe_layer     # expert parallel over 2 ranks

The model-level bench (`sdtrain bench --peers deepspeed-moe`) mixes the MoE layers with the
dense half of the model, which is the same code in both; this isolates the layer. Both get
the same router and expert weights, so they route the same tokens and drop the same ones;
the two alternate step by step (a shared machine's speed moves within seconds) and each
round's ratio is kept. Under torchrun the experts are split over the ranks (EP = world size),
each rank routes its own tokens, and a step is timed from a barrier to a barrier, so it is the
slowest rank's. Without DeepSpeed it times sdtrain's layer alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import time

import torch
import torch.distributed as dist

from sdtrain.parallel.mesh import leave_process_group


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sdtrain.bench.moe_layer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens in the routing group (one micro-batch)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--min-capacity", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=40, help="timed steps of each layer, after 3 untimed")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as one of 2 workers on 2 cores)")
    args = parser.parse_args(argv)
    ep = expert_parallel_size()
    for wrong, why in [
        (min(args.tokens, args.d_model, args.experts, args.rounds, args.threads) < 1,
         "--tokens, --d-model, --experts, --rounds and --threads must be at least 1"),
        (not 1 <= args.top_k <= args.experts, f"--top-k must be between 1 and --experts ({args.experts})"),
        (args.capacity_factor <= 0, "--capacity-factor must be above 0 (1.25: a quarter to spare)"),
        (args.experts % ep, f"--experts {args.experts} must divide over the {ep} torchrun ranks (expert parallel)"),
    ]:
        if wrong:
            parser.error(why)  # exit 2, before anything starts
    return args


def expert_parallel_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def sdtrain_layer(args):
    """The layer, the same on every rank, then holding this rank's share of the experts."""
    from sdtrain.model.moe.dispatch import AllToAllDispatch
    from sdtrain.model.moe.layer import MoEMLP, MoESettings

    settings = MoESettings(num_experts=args.experts, top_k=args.top_k, capacity_factor=args.capacity_factor,
                           min_capacity=args.min_capacity)
    layer = MoEMLP(args.d_model, 4 * args.d_model, settings)
    torch.nn.init.normal_(layer.experts.w1, std=0.02)
    torch.nn.init.normal_(layer.experts.w2, std=0.02)
    ep = expert_parallel_size()
    if ep > 1:
        local = args.experts // ep
        layer.experts.keep(int(os.environ["RANK"]) * local, local)
        layer.dispatch = AllToAllDispatch(dist.new_group(list(range(ep))), ep)
    return layer


def join(deepspeed_too: bool) -> None:
    """A gloo group of the torchrun ranks, or of this process alone (DeepSpeed's layer wants one)."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        from sdtrain.launch.plan import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    if dist.is_initialized():
        return
    if deepspeed_too:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")


def deepspeed_layer(args, ours):
    """DeepSpeed's MoE at the same E, k, capacity and EP, routing as sdtrain's gating
    defines, holding a copy of `ours`'s weights."""
    from sdtrain.bench.peer_deepspeed_moe import deepspeed_moe

    layer = deepspeed_moe(args.d_model, 4 * args.d_model, dataclasses.asdict(ours.moe), expert_parallel_size())
    with torch.no_grad():  # both hold the same global experts on a rank: rank x E / EP onwards
        layer.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(layer.deepspeed_moe.experts.deepspeed_experts):
            expert.fc.weight.copy_(ours.experts.w1[e].t())
            expert.proj.weight.copy_(ours.experts.w2[e].t())
    return layer


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with_deepspeed = importlib.util.find_spec("deepspeed") is not None
    join(with_deepspeed)
    torch.manual_seed(0)
    ours = sdtrain_layer(args)
    torch.manual_seed(1 + dist.get_rank())  # each rank routes its own tokens
    x = torch.randn(args.tokens, args.d_model, requires_grad=True)

    def sdtrain_step():
        ours(x).sum().backward()

    steps = {"sdtrain": sdtrain_step}
    if with_deepspeed:
        theirs = deepspeed_layer(args, ours)

        def deepspeed_step():  # with the balancing loss, which sdtrain's layer adds itself
            out, aux, _ = theirs(x)
            (out.sum() + ours.moe.aux_loss_coef * aux).backward()

        steps["deepspeed"] = deepspeed_step
    say = print if dist.get_rank() == 0 else (lambda *_: None)
    if not with_deepspeed:
        say("deepspeed not installed: sdtrain's layer alone")

    seconds = {name: [] for name in steps}
    for round_ in range(3 + args.rounds):
        for name, step in steps.items():
            dist.barrier()
            started = time.perf_counter()
            step()
            dist.barrier()  # the slowest rank's time
            if round_ >= 3:
                seconds[name].append(time.perf_counter() - started)
    say(f"one MoE layer forward + backward: {args.tokens} tokens a rank, d {args.d_model}, E {args.experts}, "
        f"top-{args.top_k}, capacity factor {args.capacity_factor}, EP {expert_parallel_size()}, "
        f"{args.threads} thread(s) a rank, {args.rounds} rounds")
    for name, times in seconds.items():
        say(f"  {name:9} median {statistics.median(times) * 1e3:7.1f} ms   min {min(times) * 1e3:7.1f} ms")
    if "deepspeed" in seconds:
        paired = [d / s for s, d in zip(seconds["sdtrain"], seconds["deepspeed"])]
        say(f"  deepspeed / sdtrain: {statistics.median(paired):.2f}x (median of the paired rounds), "
            f"{min(seconds['deepspeed']) / min(seconds['sdtrain']):.2f}x (min against min)")


if __name__ == "__main__":
    main()
    leave_process_group()
