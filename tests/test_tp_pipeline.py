"""Tensor parallelism inside a pipeline (TP x PP) against the one-process run of the same
recipe: TP=2 x PP=2 on 4 ranks with 1F1B and interleaved, a TP=2 x DP=2 checkpoint continued
at TP=2 x PP=2, and (slow) gpipe, zero bubble with and without sequence parallelism, and
ZeRO. Real processes through `sdtrain launch` on gloo, fp32, 20 steps."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import TINY, assert_losses_match, launch_run, merge, metrics, spawned_rank
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.tensor_parallel import apply_tensor_parallel
from sdtrain.parallel.tp_collectives import TensorParallel
from sdtrain.parallel.tp_volume import tp_step_bytes
from sdtrain.parallel.weight_grads import DEFERRED, DeferredWeightGrads
from sdtrain.train.export import load_model_weights

REL_TOL = 1e-5  # fp32 on CPU: only the order of the sums differs
STEPS = 20
# 4 blocks: P = 2 with V = 2 still has one per chunk; 4 micro-batches of 2 per step at dp 1
RUN = {"model": {"n_layers": 4}, "train": {"steps": STEPS},
       "checkpoint": {"at_end": True, "every": 10, "keep": 3}}
TP2_PP2 = ("parallel.tensor_parallel=2", "parallel.pipeline.stages=2")
TOKENS = 8 * 32  # a rank's tokens per step at dp 1: the global batch of 8 sequences of 32


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, RUN), *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("ref"), "single", 1)


def assert_same_run(reference, run_dir, steps=range(1, STEPS + 1)):
    """Losses and global gradient norms (clipping at 1.0 is active: each tp piece and each
    whole parameter of each stage counted once), step by step."""
    assert_losses_match(reference, run_dir, REL_TOL, STEPS, steps)
    norms = [{m["step"]: m["grad_norm"] for m in metrics(run)} for run in (reference, run_dir)]
    for step in steps:
        assert abs(norms[0][step] - norms[1][step]) <= REL_TOL * norms[0][step], f"step {step}: grad norm"


def assert_same_weights(reference, run_dir):
    """The final checkpoints loaded whole: every stage's tp pieces where the one-process tensors
    are, the tied head stored once (the first stage's embedding)."""
    ours, theirs = load_model_weights(run_dir)[0], load_model_weights(reference)[0]
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name].shape == theirs[name].shape, name
        # atol: Adam moves an element whose gradient is near zero by its normalised step whatever
        # the gradient's size, so the tp split's last-bit differences show there: the key bias
        # (zero gradient) by ~1e-6 (see test_ddp), and on an AVX-512/AMX CPU one MLP weight of 4,096
        # by 1.1e-5 after 20 steps. 3e-5 is 1% of one step at the recipe's lr (3e-3).
        torch.testing.assert_close(ours[name], theirs[name], rtol=REL_TOL, atol=3e-5,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


def partial_grad_bytes(blocks: int, position_embedding: bool, final_norm: bool) -> int:
    """The sequence-parallel partial gradients a stage sums over tp (fp32): per block two
    norms (weight and bias of 32) and the two row-parallel biases (32 each); the position
    embedding (32 x 32) on the first stage, the final norm on the last."""
    return 4 * (blocks * (2 * 64 + 2 * 32) + position_embedding * 32 * 32 + final_norm * 64)


def assert_metrics_per_stage(run_dir, schedule):
    """Each stage's bubble, memory, and bytes: the tp collectives of its own layers (the
    embedding's on the first, the head's on the last, Megatron's count) and its partial sums."""
    rows = metrics(run_dir)
    expected = [sum(tp_step_bytes(2, TOKENS, 32, True, embedding=True, head=False).values())
                + partial_grad_bytes(2, True, False),
                sum(tp_step_bytes(2, TOKENS, 32, True, embedding=False, head=True).values())
                + partial_grad_bytes(2, False, True)]
    for row in rows[1:]:  # step 1's count holds the step-0 eval's forward too
        assert len(row["bubble_per_stage"]) == len(row["mem_gib_per_stage"]) == 2, schedule
        assert 0.0 <= row["bubble"] < 1.0
        assert row["tp_bytes_per_stage"] == expected, row["step"]
        # DDP at dp 1 reduces nothing: a stage's bytes are its tp bytes
        assert row["comm_bytes_per_stage"] == expected, row["step"]
        assert row["comm_bytes"] == expected[0]  # rank 0's: the first stage's


@pytest.mark.parametrize("schedule, virtual", [("1f1b", 1), pytest.param("interleaved", 2, marks=pytest.mark.slow)])
def test_tp2_pp2_matches_one_process(reference, tmp_path, schedule, virtual):
    run_dir = launch(tmp_path, f"tp2-pp2-{schedule}", 4, *TP2_PP2, f"parallel.pipeline.schedule={schedule}",
                     f"parallel.pipeline.virtual_stages={virtual}")
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)
    assert_metrics_per_stage(run_dir, schedule)


@pytest.mark.slow
@pytest.mark.parametrize("world, overrides", [
    (4, ["parallel.pipeline.schedule=gpipe"]),
    (4, ["parallel.pipeline.schedule=zero_bubble"]),
    (4, ["parallel.pipeline.schedule=zero_bubble", "parallel.sequence_parallel=false"]),
    (4, ["parallel.zero_stage=1"]),
    (4, ["parallel.zero_stage=3", "parallel.pipeline.schedule=zero_bubble"]),
    # dp 2: the head's gradient averaged over its tp rank's replicas, added to ZeRO's shards
    (8, ["parallel.zero_stage=2"]),
    (8, []),
], ids=["gpipe", "zero-bubble-sp", "zero-bubble", "zero1", "zero3-zero-bubble", "dp2-zero2", "dp2"])
def test_tp2_pp2_with_every_schedule_and_zero_matches_one_process(reference, tmp_path, world, overrides):
    run_dir = launch(tmp_path, "tp2-pp2", world, *TP2_PP2, *overrides)
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)


@pytest.mark.slow  # the reshard across tp and pp; make test keeps tp's own (test_tp_training)
def test_a_tp2_dp2_checkpoint_continues_at_tp2_pp2(reference, tmp_path):
    """The checkpoint matrix: pieces saved as whole tensors by TP x DP load into TP x PP's
    stages, the head's copy on the last stage taken from the first stage's embedding."""
    first = launch(tmp_path, "tp2-dp2", 4, "parallel.tensor_parallel=2")
    resumed = tmp_path / "resumed"
    shutil.copytree(first, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    assert launch(tmp_path, "resumed", 4, *TP2_PP2, "train.resume=auto") == resumed
    assert_same_run(reference, first)
    assert_same_run(reference, resumed, steps=range(11, STEPS + 1))
    assert_same_weights(reference, resumed)


# --- the zero-bubble split backward of a tp-split model, on 2 real gloo processes ----------


def split_backward_error(sequence_parallel: bool) -> float:
    """Largest difference between the plain backward's gradients and B + W's, over every
    parameter W defers (the tp linears' pieces, their biases, the norms), on this rank."""
    cfg = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=64)
    ids = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    models = [GPT(cfg, seed=5) for _ in range(2)]
    for model in models:
        apply_tensor_parallel(model, TensorParallel.of(dist.group.WORLD, sequence_parallel))
    plain, split = models
    plain.loss(plain(ids[:, :-1]), ids[:, 1:]).backward()
    deferred = DeferredWeightGrads(split, skip=(split.lm_head,))
    deferred.start_recording()
    loss = split.loss(split(ids[:, :-1]), ids[:, 1:])
    records = deferred.stop_recording()
    embedding = split.tok_emb.weight  # keeps the plain backward (the first chunk's, here its input)
    (embedding_grad,), pending = deferred.input_grads(records, loss, None, [embedding])
    assert all(p.grad is None for p in split.parameters())  # B made no weight gradient
    touched = {id(p) for p in deferred.weight_grads(pending)}
    deferred_params = {id(p) for m in split.modules() if isinstance(m, DEFERRED) and m is not split.lm_head
                       for p in m.parameters(recurse=False)}
    assert touched == deferred_params and len(touched) == 4 * 2 * 2 + 2 * 2 * 2 + 2  # linears, norms, final norm
    errors = [(embedding_grad - plain.tok_emb.weight.grad).abs().max()]
    for (name, ours), (_, theirs) in zip(split.named_parameters(), plain.named_parameters()):
        if id(ours) in touched:
            errors.append((ours.grad - theirs.grad).abs().max() / theirs.grad.abs().max().clamp(min=1e-6))
    return max(e.item() for e in errors)


def split_backward_rank(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    with spawned_rank():
        report = {"sp_on": split_backward_error(True), "sp_off": split_backward_error(False)}
        with open(f"{out}.{rank}", "w") as f:
            json.dump(report, f)


def test_split_backward_of_tp_linears_equals_the_plain_backward(tmp_path):
    """Under sequence parallelism a column-parallel layer's outside input is this rank's part
    of the sequence and a row-parallel layer's outside output is reduce-scattered: W must use
    the local product's (record_local), or its weight gradients do not even have the shape."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(split_backward_rank, args=(2, str(tmp_path / "store"), str(tmp_path / "report")), nprocs=2)
    for rank in range(2):
        report = json.loads((tmp_path / f"report.{rank}").read_text())
        assert report["sp_on"] < 1e-5 and report["sp_off"] < 1e-5, (rank, report)
