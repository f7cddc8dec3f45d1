"""Stage 3's gathers with the weight shards offloaded (offload/params.py, zero3.py), in real
processes on gloo: each block's shard is read ahead of its gather (only the root's, at a
forward's start, is read when needed), no shard stays in memory between gathers, a read ahead
of an update is not used after it, and the run is bitwise the one without offload."""

import contextlib
import functools

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.offload.store import OffloadStore
from sdtrain.parallel.parallelize import place_parameters
from sdtrain.parallel.zero import Zero
from sdtrain.recipe_load import validate_recipe
from test_ring import _ranks

LAYERS = 4


def _zero(env, offload: str, folder: str, precision: str, optimizer: str = "none", recompute: bool = False) -> Zero:
    zero = {"offload_params": offload, "offload_optimizer": optimizer, "sub_group_mb": 0.015625}
    recipe = validate_recipe({"name": "t", "model": {"n_layers": LAYERS, "d_model": 32, "n_heads": 2, "seq_len": 16},
                              "train": {"global_batch_size": 2 * env.world_size, "precision": precision},
                              "parallel": {"zero_stage": 3, "zero": zero}})
    with torch.device("meta"):
        model = GPT(GPTConfig(**recipe.model.model_dump()))
    if recompute:  # as parallelize wraps blocks for train.activation_checkpointing
        for key, block in model.blocks.items():
            model.blocks[key] = checkpoint_wrapper(block)
    store = OffloadStore(folder, env.rank) if "nvme" in (offload, optimizer) else None
    return Zero(model, 3, recipe.parallel.zero, recipe.train, env, place_parameters(model, env), offload_store=store)


def _batch(env, step: int) -> list:
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(100 * step + env.rank))
    return [(tokens, tokens)]


def _reads_ahead_and_equals_no_offload(folder: str, precision: str, optimizer: str, recompute: bool, env) -> None:
    offloaded = _zero(env, "nvme", folder, precision, optimizer, recompute)
    plain = _zero(env, "none", folder, precision, recompute=recompute)
    shards = offloaded.weight_shards
    assert len(shards.units) == len(offloaded.units) and shards.resident() == []
    for step in range(3):
        losses = [z.forward_backward(_batch(env, step), contextlib.nullcontext) for z in (offloaded, plain)]
        # the root unit's read, when the forward starts; every block's was started a block ahead
        assert shards.reads_on_demand == step + 1, step
        norms = [z.step(1e-2, 1.0) for z in (offloaded, plain)]
        assert torch.equal(losses[0], losses[1]) and torch.equal(norms[0], norms[1]), step
        assert shards.resident() == [], step  # nothing staged between steps
    # a forward whose reads ran ahead of an update (no backward came): not used after it (nor,
    # under fp32 with the optimizer offloaded too, written over the master it stepped on disk)
    inputs, targets = _batch(env, 9)[0]
    for zero in (offloaded, plain):
        zero.plain.loss(zero.model(inputs), targets)
        zero.step(1e-2, 1.0)
    for z in (offloaded, plain):
        z.evaluate(_batch(env, 10), contextlib.nullcontext)
    weight = offloaded.plain.blocks["1"].mlp.fc.weight
    assert torch.equal(offloaded.full_weight(weight), plain.full_weight(plain.plain.blocks["1"].mlp.fc.weight))
    assert shards.resident() == []
    offloaded.weight_shards.store.close()


def _both_precisions(folder: str, env) -> None:
    _reads_ahead_and_equals_no_offload(folder, "bf16", "none", False, env)
    # the masters stepped in the shards' files; blocks recomputed in backward
    _reads_ahead_and_equals_no_offload(folder, "fp32", "nvme", True, env)


def test_shards_are_read_a_block_ahead_and_the_run_is_unchanged(tmp_path):
    folder = tmp_path / "offload"
    folder.mkdir()
    _ranks(2, tmp_path, functools.partial(_both_precisions, str(folder)))
    assert list(folder.iterdir()) == []
