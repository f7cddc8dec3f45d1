"""ZeRO-3 keeps the forward's last 1 + prefetch_blocks blocks whole into backward (zero3.py),
in real processes on gloo: those blocks are not gathered again, every other one is, nothing
is left whole after backward, in evaluation or across an update, and the run is bitwise the
one that frees and gathers them again."""

import contextlib

import torch

from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.parallelize import place_parameters
from sdtrain.parallel.zero import Zero
from sdtrain.recipe_load import validate_recipe
from test_ring import _ranks

LAYERS = 4


def _zero(env, prefetch: int) -> Zero:
    recipe = validate_recipe({"name": "t", "model": {"n_layers": LAYERS, "d_model": 32, "n_heads": 2, "seq_len": 16},
                              "train": {"global_batch_size": 2 * env.world_size},
                              "parallel": {"zero_stage": 3, "zero": {"prefetch_blocks": prefetch}}})
    with torch.device("meta"):
        model = GPT(GPTConfig(**recipe.model.model_dump()))
    return Zero(model, 3, recipe.parallel.zero, recipe.train, env, place_parameters(model, env))


def _batch(env, step: int) -> list:
    tokens = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(100 * step + env.rank))
    return [(tokens, tokens)]


def _whole_blocks(zero: Zero) -> list[int]:
    return [i for i, block in enumerate(zero.block_units) if zero.gatherer.gathered(block[0])]


def _padded(units) -> int:
    return sum(u.padded for u in units) * 4  # bytes, fp32


def _kept_blocks_are_not_gathered_again(env) -> None:
    for prefetch in (0, 1, 2):
        zero = _zero(env, prefetch)
        kept = list(range(LAYERS - 1 - prefetch, LAYERS))
        blocks = [block[0] for block in zero.block_units]
        inputs, targets = _batch(env, 0)[0]
        zero.comm_bytes()
        loss = zero.plain.loss(zero.model(inputs), targets)
        assert _whole_blocks(zero) == kept, prefetch  # after the forward: the ones backward needs first
        zero.backward(loss)
        assert _whole_blocks(zero) == []
        gathered = zero.comm_bytes()["all_gather"]
        # the root once, every block in forward, the blocks not kept again in backward
        again = [b for i, b in enumerate(blocks) if i not in kept]
        assert gathered == _padded(zero.root_units) + _padded(blocks) + _padded(again), prefetch
        zero.step(1e-3, 1.0)
        zero.evaluate(_batch(env, 1), contextlib.nullcontext)
        assert _whole_blocks(zero) == []  # no backward follows an evaluation


def _an_update_frees_what_no_backward_came_for(env) -> None:
    zero = _zero(env, 1)
    inputs, targets = _batch(env, 0)[0]
    zero.plain.loss(zero.model(inputs), targets)  # a forward with gradients, and no backward
    assert _whole_blocks(zero) == [LAYERS - 2, LAYERS - 1]
    weight = zero.plain.blocks[str(LAYERS - 1)].mlp.fc.weight
    before = zero.full_weight(weight).clone()
    zero.step(1e-2, 1.0)  # no gradients: weight decay alone changes the weights
    assert _whole_blocks(zero) == []  # else the next forward would run on the old weights
    assert not torch.equal(zero.full_weight(weight), before)


def _same_run_as_gathering_again(env) -> None:
    kept, again = _zero(env, 1), _zero(env, 1)
    again.gatherer.kept_for_backward = range(0)  # the behaviour before: free after forward, gather in backward
    for step in range(3):
        losses = [z.forward_backward(_batch(env, step), contextlib.nullcontext) for z in (kept, again)]
        norms = [z.step(1e-2, 1.0) for z in (kept, again)]
        assert torch.equal(losses[0], losses[1]) and torch.equal(norms[0], norms[1]), step
    for a, b in zip(kept.units, again.units):
        assert torch.equal(a.shard, b.shard), a.name


def _keeping_blocks(env) -> None:
    _kept_blocks_are_not_gathered_again(env)
    _an_update_frees_what_no_backward_came_for(env)
    _same_run_as_gathering_again(env)


def test_the_last_blocks_stay_whole_into_backward_and_no_longer(tmp_path):
    # one spawn for the three: starting torch in two processes is most of the time
    _ranks(2, tmp_path, _keeping_blocks)
