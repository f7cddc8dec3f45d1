"""ZeRO's collectives on gloo (ring.py through comm.py), in real processes: the gathers and
reductions give gloo's own results bit for bit, several may be in flight at once, and stage 1
reduces its buckets during the last micro-batch's backward, not before and not in step()."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import spawned_rank
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.comm import ALL_GATHER, Comm
from sdtrain.parallel.join import STORE_FILE_VARIABLE
from sdtrain.parallel.mesh import init_distributed
from sdtrain.parallel.parallelize import place_parameters
from sdtrain.parallel.zero import Zero
from sdtrain.recipe_load import validate_recipe


def _ranks(world: int, tmp_path, check) -> None:
    mp.spawn(_join, args=(world, str(tmp_path / "store"), check), nprocs=world, join=True)


def _join(rank: int, world: int, store: str, check) -> None:
    """A worker's start (init_distributed, as the node agent leaves it to), then `check`."""
    os.environ.update({STORE_FILE_VARIABLE: store, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    env = init_distributed("gloo", 60)
    with spawned_rank():
        check(env)


def _data(rank: int, numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(rank))


def _collectives_match_gloo(env) -> None:
    rank, world = env.rank, env.world_size
    comm = Comm(dist.group.WORLD)
    assert comm.by_ring
    numels = [world * 3, world * 700_001]  # one piece per step, and several
    expected, works = [], []
    for numel in numels:  # all in flight at once, as stage 2 and 3 have them
        grads = _data(rank, numel)
        averaged = grads.clone()
        dist.all_reduce(averaged, op=dist.ReduceOp.AVG)
        expected.append(averaged.chunk(world)[rank])
        works.append(comm.reduce_scatter(grads, async_op=True))
    for (work, chunk), want in zip(works, expected):
        work.wait()
        if world == 2:  # a + b is b + a: gloo's all-reduce bit for bit
            assert torch.equal(chunk, want)
        else:
            torch.testing.assert_close(chunk, want, rtol=1e-6, atol=1e-6)
    assert len(comm.spare) == len(numels)  # their receive buffers are kept for the next ones
    for numel in numels:
        full = torch.empty(numel)
        shard = _data(rank, numel // world)
        gathered = torch.empty(numel)
        getattr(dist, ALL_GATHER)(gathered, shard)
        assert comm.all_gather(full, shard) is None
        assert torch.equal(full, gathered)
        in_place = _data(rank, numel)  # this rank's chunk already where it belongs
        mine = in_place.chunk(world)[rank]
        comm.all_gather(in_place, mine, async_op=True).wait()
        assert torch.equal(in_place, _every_chunk(numel, world))
    assert comm.take_bytes() == {"reduce_scatter": 4 * sum(numels), "all_gather": 2 * 4 * sum(numels)}


def _every_chunk(numel: int, world: int) -> torch.Tensor:
    return torch.cat([_data(r, numel).chunk(world)[r] for r in range(world)])


@pytest.mark.parametrize("world", [2, 3])
def test_ring_collectives_equal_gloos(tmp_path, world):
    _ranks(world, tmp_path, _collectives_match_gloo)


def _stage1_reduces_in_last_backward(env) -> None:
    recipe = validate_recipe({"name": "t", "model": {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 16},
                              "train": {"global_batch_size": 4 * env.world_size, "grad_accum_steps": 2},
                              "parallel": {"zero_stage": 1, "zero": {"reduce_bucket_mb": 0.01}}})
    with torch.device("meta"):
        model = GPT(GPTConfig(**recipe.model.model_dump()))
    zero = Zero(model, 1, recipe.parallel.zero, recipe.train, env, place_parameters(model, env))
    assert len(zero.units) > 2
    inputs = torch.randint(256, (2, 16), generator=torch.Generator().manual_seed(env.rank))
    issued = []
    for is_last in (False, True):
        with zero.micro_batch(is_last):
            zero.backward(zero.plain.loss(zero.model(inputs), inputs))
        issued.append(len(zero.pending))
    assert issued == [0, len(zero.units)]  # none after the first micro-batch, every bucket in the last
    zero.step(1e-3, 1.0)
    assert not zero.pending


def test_stage1_reduces_each_bucket_in_the_last_backward(tmp_path):
    _ranks(2, tmp_path, _stage1_reduces_in_last_backward)
