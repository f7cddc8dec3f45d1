"""Parameters' placements: what parallelize says of a MoE model at ep 2, and the strategies
doing what a placement says, whatever the parameter is called."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sdtrain.parallel.placement import DENSE, AxisShard, Placement, expert_placement
from sdtrain.recipe import TrainConfig, ZeroConfig


def test_an_expert_slice_sits_in_the_layers_whole_tensor_at_its_first_expert():
    placement = expert_placement(8, 4)  # experts 4..7 of 8
    assert placement == Placement("edp", (AxisShard("ep", 0, 8, 4),))
    assert placement.whole_shape((4, 3, 5)) == (8, 3, 5)
    assert placement.whole_offset((1, 2, 0)) == (5, 2, 0)
    assert placement.sharded_over == ("ep",) and placement.reduction == ("edp", ("ep",))
    assert DENSE.whole_shape((3, 5)) == (3, 5) and DENSE.whole_offset((1, 0)) == (1, 0)
    assert DENSE.reduction == ("dp", ())


# the recipe's own sections, so a key the strategies start reading is there
TRAIN = TrainConfig(lr=0.1, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, precision="fp32")
ZERO = ZeroConfig(overlap_comm=False, reduce_bucket_mb=25.0, persistence_threshold=0, prefetch_blocks=1)


def _toy_model():
    """A parameter named like an expert weight that is dense, and one named like nothing in
    particular that is an expert slice (rows = ep rank's experts); both outside the blocks
    (ZeRO-3's root), beside one block."""
    import torch
    import torch.nn as nn

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleDict({"0": nn.Linear(3, 3, bias=False)})
            self.layer = nn.Module()
            self.layer.experts = nn.Linear(3, 2, bias=False)  # "layer.experts.weight"
            self.router = nn.Linear(3, 2, bias=False)

        def forward(self, x):
            return self.blocks["0"](x).sum() + self.layer.experts(x).sum() + self.router(x).sum()

    torch.manual_seed(0)
    return Toy()


def _run_rank(rank: int, world: int, folder: str) -> None:
    import torch
    import torch.distributed as dist

    from sdtrain.model import GPT, GPTConfig
    from sdtrain.parallel.data_parallel import DataParallel
    from sdtrain.parallel.expert_parallel import apply_expert_parallel
    from sdtrain.parallel.join import STORE_FILE_VARIABLE
    from sdtrain.parallel.layout import Layout
    from sdtrain.parallel.mesh import init_distributed
    from sdtrain.parallel.parallelize import place_parameters
    from sdtrain.parallel.zero import Zero

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      **{STORE_FILE_VARIABLE: f"{folder}/store"})
    env = init_distributed("gloo", 60, Layout(world, ep=2))
    found = {}

    # What parallelize says of a MoE GPT (experts in block 1) at ep 2.
    cfg = GPTConfig(n_layers=2, d_model=16, n_heads=2, seq_len=8, vocab_size=32,
                    moe={"num_experts": 4, "top_k": 2, "every_n_layers": 2})
    model = GPT(cfg)
    apply_expert_parallel(model, env, micro_batches=1)
    found["gpt"] = {name: [p.replicated_over, [[s.axis, s.dim, s.whole, s.start] for s in p.shards]]
                    for name, p in place_parameters(model, env).items()}
    found["gpt_names"] = [n for n, _ in model.named_parameters()]

    # Strategies follow the placements, not the names.
    placements = {"layer.experts.weight": DENSE, "router.weight": expert_placement(2 * world, 2 * rank)}
    x = torch.ones(1, 3)
    placements["blocks.0.weight"] = DENSE
    for kind in ("ddp", "zero1", "zero3"):
        model = _toy_model()
        if kind == "ddp":
            strategy = DataParallel(model, TRAIN, env, placements)
        else:
            strategy = Zero(model, int(kind[-1]), ZERO, TRAIN, env, placements)
            found[f"{kind}_units"] = sorted((u.name, [e.name for e in u.entries], u.comm.world) for u in strategy.units)
            state = strategy.checkpoint_state()["model"]
            found[f"{kind}_saved_shapes"] = {n: list(t.shape) for n, t in state.items()}
        strategy.backward(strategy.model(x) * (rank + 1))
        if kind == "ddp":  # the gradients as averaged (or not) in backward and step
            found["ddp_grads_after_backward"] = {n: p.grad.flatten().tolist() for n, p in model.named_parameters()}
        norm = strategy.step(lr=0.0, grad_clip=0.0)
        found[f"{kind}_norm"] = norm.item()

    # A weight placed sharded over tp (as tensor parallelism will place them), at tp 2: the
    # same strategies, untouched, count it once in the norm and checkpoint it whole.
    dist.barrier()
    dist.destroy_process_group()
    os.environ[STORE_FILE_VARIABLE] = f"{folder}/store_tp"
    env = init_distributed("gloo", 60, Layout(world, tp=2))
    placements["router.weight"] = Placement(shards=(AxisShard("tp", 0, 2 * world, 2 * rank),))
    for kind in ("ddp", "zero1"):
        model = _toy_model()
        strategy = DataParallel(model, TRAIN, env, placements) if kind == "ddp" else \
            Zero(model, 1, ZERO, TRAIN, env, placements)
        state = strategy.checkpoint_state()["model"]
        found[f"tp_{kind}_saved_shapes"] = {n: list(t.shape) for n, t in state.items()}
        strategy.backward(strategy.model(x))
        found[f"tp_{kind}_norm"] = strategy.step(lr=0.0, grad_clip=0.0).item()
    Path(folder, f"rank{rank}.json").write_text(json.dumps(found))
    os._exit(0)  # no interpreter finalization with gloo threads about (mesh.leave_process_group)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("placement")
    mp.start_processes(_run_rank, args=(2, str(folder)), nprocs=2, start_method="spawn")
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]


def test_parallelize_places_a_moe_models_experts_over_ep_and_the_rest_dense(ranks):
    for rank, found in enumerate(ranks):
        experts = {"blocks.1.mlp.experts.w1", "blocks.1.mlp.experts.w2"}
        assert set(found["gpt"]) == set(found["gpt_names"])  # every parameter, by base name
        for name, (replicated_over, shards) in found["gpt"].items():
            if name in experts:  # this rank's 2 of the layer's 4, from expert 2 x ep rank
                assert (replicated_over, shards) == ("edp", [["ep", 0, 4, 2 * rank]]), name
            else:
                assert (replicated_over, shards) == ("dp", []), name


def test_a_weight_named_like_an_expert_but_placed_dense_is_treated_as_dense(ranks):
    """DDP averages the one placed dense (whatever its name) and leaves the one placed as
    an expert slice to its edp group (here one rank: not averaged); the global norm counts
    the dense one once and sums the expert slices' squares over ep; ZeRO gives each its own
    group and checkpoints the expert slice as a piece of the whole tensor."""
    g0, g1 = ranks[0]["ddp_grads_after_backward"], ranks[1]["ddp_grads_after_backward"]
    assert g0["layer.experts.weight"] == g1["layer.experts.weight"] == [1.5] * 6  # mean of 1x and 2x
    assert g0["router.weight"] == [1.0] * 6 and g1["router.weight"] == [2.0] * 6  # each rank's own
    expected = ((6 + 9) * 1.5**2 + 6 * 1.0**2 + 6 * 2.0**2) ** 0.5
    shapes = {"blocks.0.weight": [3, 3], "layer.experts.weight": [2, 3], "router.weight": [4, 3]}
    for found in ranks:
        for kind in ("ddp", "zero1", "zero3"):
            assert found[f"{kind}_norm"] == pytest.approx(expected, rel=1e-6), kind
        # ZeRO shards each over its own group: one unit per placement's reduction
        assert [units for _, *units in found["zero1_units"]] == [
            [["layer.experts.weight", "blocks.0.weight"], 2], [["router.weight"], 1]]
        assert found["zero3_units"] == [["blocks.0", ["blocks.0.weight"], 2], ["root", ["layer.experts.weight"], 2],
                                        ["root.edp.ep", ["router.weight"], 1]]
    for kind in ("zero1", "zero3"):  # each parameter saved by the ranks holding some of it, as a whole tensor
        assert {n: shape for found in ranks for n, shape in found[f"{kind}_saved_shapes"].items()} == shapes


def test_a_weight_placed_sharded_over_tp_counts_once_and_saves_whole(ranks):
    expected = (9 + 6 + 2 * 6) ** 0.5  # the block and the dense weight once, both pieces of the other
    for found in ranks:
        for kind in ("ddp", "zero1"):
            assert found[f"tp_{kind}_norm"] == pytest.approx(expected, rel=1e-6), kind
            assert found[f"tp_{kind}_saved_shapes"] == {"blocks.0.weight": [3, 3], "layer.experts.weight": [2, 3],
                                                        "router.weight": [4, 3]}, kind
