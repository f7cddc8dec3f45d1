"""Tensor parallelism's building blocks against the one-process model, on real gloo processes.

Each spawned rank builds the one-process GPT and the same GPT split over the tp ranks, runs
the same batches through both, and reports: the losses, every gradient (pieces gathered to
whole tensors), the weights after a few AdamW steps on the local pieces, the bytes the tp
collectives moved, and the vocabulary-parallel cross-entropy against F.cross_entropy. The
ranks of one size run once per module (the comparisons are several tests over one run).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from conftest import spawned_rank
from sdtrain.errors import RecipeError
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.parallel.placement import squares_over_axes
from sdtrain.parallel.strategy import base_name
from sdtrain.parallel.tensor_parallel import apply_tensor_parallel, initial_shard, tp_piece, tp_whole
from sdtrain.parallel.tp_checks import check_tensor_parallel
from sdtrain.parallel.tp_collectives import TensorParallel
from sdtrain.parallel.tp_linear import ColumnParallelLinear
from sdtrain.parallel.tp_volume import tp_step_bytes
from sdtrain.parallel.vocab_parallel import SequencePartPositions, vocab_parallel_cross_entropy

CFG = GPTConfig(n_layers=2, d_model=32, n_heads=4, seq_len=16, vocab_size=64)
BATCH, STEPS, SEED, LR = 2, 3, 7, 1e-3
CHUNK = 12  # the head and loss 12 tokens at a time: chunks that do not divide the 32 tokens
TOLERANCE = 1e-5


def relative_error(got: torch.Tensor, want: torch.Tensor, scale: float) -> float:
    """Largest difference over the larger of the tensor's own largest value and `scale` (a
    gradient that is zero in exact arithmetic, such as the key bias's, is rounding noise that
    no two summation orders share)."""
    return ((got - want).abs().max() / max(want.abs().max().item(), scale)).item()


def beyond_tolerance(got: torch.Tensor, want: torch.Tensor) -> float:
    """torch.testing.assert_close's measure at rtol = atol = TOLERANCE (as test_ddp.py
    compares weights): at most 1 where close. The absolute part is for the key bias: its
    gradient is zero in exact arithmetic (softmax ignores a shift shared by all keys), so
    AdamW turns rounding noise into ~1e-6 moves there, different in each summation order."""
    return ((got - want).abs() / (TOLERANCE + TOLERANCE * want.abs())).max().item()


def gathered(tensor: torch.Tensor, shard) -> tuple[torch.Tensor, float]:
    """The whole tensor from every rank's piece, and for a whole one the spread between ranks."""
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.contiguous())
    if shard is not None:
        return tp_whole(pieces, shard), 0.0
    return pieces[0], max((p - pieces[0]).abs().max().item() for p in pieces)


def batches(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, CFG.vocab_size, (BATCH, CFG.seq_len + 1), generator=torch.Generator().manual_seed(step))
    return ids[:, :-1], ids[:, 1:]


def compare_with_one_process(sequence_parallel: bool, by_ring: bool = True,
                             checkpointed: bool = False) -> dict:
    one = GPT(CFG, seed=SEED, loss_chunk_tokens=CHUNK)
    model = GPT(CFG, seed=SEED, loss_chunk_tokens=CHUNK)
    tp = TensorParallel.of(dist.group.WORLD, sequence_parallel)
    tp.by_ring = by_ring  # False: NCCL's path, torch's own all-gather and reduce-scatter (on gloo here)
    plan = apply_tensor_parallel(model, tp)
    if checkpointed:  # as parallelize does, after tensor parallelism: each block's forward runs again in backward
        for key, block in model.blocks.items():
            model.blocks[key] = checkpoint_wrapper(block)
    # eps above the gradients' rounding noise: at the default 1e-8 Adam divides an entry of
    # ~5e-9 (there is one in fc) by its own size, and a 10% difference there in the last bits
    # of a sum becomes a 4e-5 difference in the step; no other entry is near it.
    one_opt = torch.optim.AdamW(one.parameters(), lr=LR, eps=1e-6)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, eps=1e-6)
    mine = {base_name(name): p for name, p in model.named_parameters()}
    report = {"losses": [], "weights": [], "partial": plan.partial_grads}
    for step in range(STEPS):
        x, y = batches(step)
        one_loss = one.loss(one(x), y)
        one_loss.backward()
        tp.take_bytes()
        loss = model.loss(model(x), y)
        loss.backward()
        if step == 0:
            report["bytes"] = tp.take_bytes()
        plan.sum_partial_grads(model)
        if step == 0:
            report["grad_bytes"] = tp.take_bytes()
            report["grad_norm"] = [global_grad_norm(model, plan), torch.nn.utils.get_total_norm(
                [p.grad for p in one.parameters()]).item()]
        report["losses"].append([loss.item(), one_loss.item()])
        if step == 0:
            scale = 1e-3 * max(p.grad.abs().max().item() for p in one.parameters())
            report["grads"] = {}
            for name, p in one.named_parameters():
                whole, spread = gathered(mine[name].grad, plan.shards[name])
                report["grads"][name] = [relative_error(whole, p.grad, scale), spread]
        one_opt.step(), opt.step()
        one_opt.zero_grad(), opt.zero_grad()
        with torch.no_grad():
            report["weights"].append(max((beyond_tolerance(gathered(mine[n], plan.shards[n])[0], p), n)
                                         for n, p in one.named_parameters()))
    return report


def global_grad_norm(model, plan) -> float:
    """As the strategies count it from placements: squares summed over the axes a parameter
    is sharded over (each tp piece once), a whole one counted once."""
    placements = plan.placements()
    squares: dict = {}
    for name, p in model.named_parameters():
        axes = placements[base_name(name)].sharded_over
        squares[axes] = squares.get(axes, 0) + p.grad.pow(2).sum()
    return squares_over_axes(list(squares.items()), {"tp": dist.group.WORLD}).sqrt().item()


def compare_under_autocast() -> dict:
    """bf16 autocast: the loss and the gradients near the one-process model's under autocast
    (the partial sums of a row-parallel layer are added in bf16, one rounding more)."""
    one = GPT(CFG, seed=SEED, loss_chunk_tokens=CHUNK)
    model = GPT(CFG, seed=SEED, loss_chunk_tokens=CHUNK)
    plan = apply_tensor_parallel(model, TensorParallel.of(dist.group.WORLD, sequence_parallel=True))
    x, y = batches(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        one_loss, loss = one.loss(one(x), y), model.loss(model(x), y)
    one_loss.backward(), loss.backward()
    plan.sum_partial_grads(model)
    mine = dict(model.named_parameters())
    scale = max(p.grad.abs().max().item() for p in one.parameters())
    worst = max(relative_error(gathered(mine[n].grad, plan.shards[n])[0], p.grad, scale) for n, p in one.named_parameters())
    return {"losses": [loss.item(), one_loss.item()], "grads": worst}


def saved_bytes_and_grads(kept_gathered: bool) -> tuple[int, dict]:
    """The bytes autograd keeps for backward (parameters aside) and the gradients of one
    forward and backward under SP; `kept_gathered`: the column-parallel layers keep their
    gathered input, as under the zero-bubble schedule (a `record_local` hook set)."""
    model = GPT(CFG, seed=SEED, loss_chunk_tokens=CHUNK)
    apply_tensor_parallel(model, TensorParallel.of(dist.group.WORLD, sequence_parallel=True))
    if kept_gathered:
        for module in model.modules():
            if isinstance(module, ColumnParallelLinear):
                module.record_local = lambda *recorded: None
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    x, y = batches(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.loss(model(x), y)
    loss.backward()
    return sum(saved.values()), {name: p.grad for name, p in model.named_parameters()}


def compare_regathered_with_kept() -> dict:
    """The column-parallel layers' backward re-gather against keeping the gathered input."""
    kept, kept_grads = saved_bytes_and_grads(kept_gathered=True)
    regathered, grads = saved_bytes_and_grads(kept_gathered=False)
    return {"saved": [regathered, kept], "bitwise": all(torch.equal(grads[n], kept_grads[n]) for n in grads)}


def compare_vocab_loss() -> dict:
    """vocab_parallel_cross_entropy against F.cross_entropy, ignored targets among them."""
    tp = TensorParallel.of(dist.group.WORLD)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, CFG.d_model, generator=g)
    weight = torch.randn(CFG.vocab_size, CFG.d_model, generator=g)
    targets = torch.randint(0, CFG.vocab_size, (37,), generator=g)
    targets[::5] = -100
    hidden_one, weight_one = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    want = F.cross_entropy(F.linear(hidden_one, weight_one), targets)
    want.backward()
    rows = CFG.vocab_size // tp.size
    errors = {}
    for chunk in (0, 5, 37):
        h = hidden.clone().requires_grad_()
        w = weight[tp.rank * rows:(tp.rank + 1) * rows].clone().requires_grad_()
        loss = vocab_parallel_cross_entropy(h, w, targets, tp.rank * rows, tp, chunk)
        loss.backward()
        grad_hidden = tp.all_reduce(h.grad)  # each rank's rows give a part of it
        grad_weight = gathered(w.grad, None)[0] if tp.size == 1 else torch.cat(_all(w.grad))
        errors[chunk] = [relative_error(loss.detach(), want.detach(), 0.0),
                         relative_error(grad_hidden, hidden_one.grad, 0.0),
                         relative_error(grad_weight, weight_one.grad, 0.0)]
    return errors


def _all(tensor: torch.Tensor) -> list[torch.Tensor]:
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, tensor.contiguous())
    return pieces


def rank_main(rank: int, world: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
    with spawned_rank():
        report = {"sp_off": compare_with_one_process(False), "sp_on": compare_with_one_process(True),
                  "sp_on_reduce_scatter": compare_with_one_process(True, by_ring=False),
                  "sp_on_checkpointed": compare_with_one_process(True, checkpointed=True),
                  "bf16": compare_under_autocast(),
                  "regathered": compare_regathered_with_kept(),
                  "vocab_loss": compare_vocab_loss()}
        if rank == 0:
            with open(out, "w") as f:
                json.dump(report, f)


RUNS: dict[int, dict | Exception] = {}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    def ranks(world: int) -> dict:
        if world not in RUNS:
            folder = tmp_path_factory.mktemp(f"tp{world}")
            os.environ.setdefault("OMP_NUM_THREADS", "1")
            try:
                mp.spawn(rank_main, args=(world, str(folder / "store"), str(folder / "report.json")), nprocs=world)
                RUNS[world] = json.loads((folder / "report.json").read_text())
            except Exception as failed:  # noqa: BLE001 - one failed run fails its tests, not run again by each
                RUNS[world] = failed
        if isinstance(RUNS[world], Exception):
            raise RUNS[world]
        return RUNS[world]
    return ranks


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("setting", ["sp_off", "sp_on", "sp_on_reduce_scatter", "sp_on_checkpointed"])
def test_loss_and_every_gradient_equal_the_one_process_model(run, world, setting):
    report = run(world)[setting]
    first, one = report["losses"][0]
    assert abs(first - one) <= TOLERANCE * abs(one)
    assert len(report["grads"]) == len(dict(GPT(CFG).named_parameters()))
    worst = {name: err for name, (err, spread) in report["grads"].items() if err > TOLERANCE}
    assert not worst, worst
    spread = {name: s for name, (_, s) in report["grads"].items() if s > 0}
    assert not spread, f"whole parameters' gradients differ between tp ranks: {spread}"


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("setting", ["sp_off", "sp_on", "sp_on_reduce_scatter"])
def test_adamw_on_the_pieces_stays_on_the_one_process_trajectory(run, world, setting):
    report = run(world)[setting]
    for got, one in report["losses"]:
        assert abs(got - one) <= TOLERANCE * abs(one)
    assert max(report["weights"])[0] <= 1.0, report["weights"]


def test_bf16_autocast_stays_near_the_one_process_model(run):
    """Measured: loss 3e-5 relative, gradients 5e-3 of the largest one apart."""
    report = run(2)["bf16"]
    got, one = report["losses"]
    assert abs(got - one) <= 1e-3 * abs(one)
    assert report["grads"] <= 3e-2


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("setting", ["sp_off", "sp_on"])
def test_placements_give_the_one_process_gradient_norm(run, world, setting):
    got, one = run(world)[setting]["grad_norm"]
    assert abs(got - one) <= TOLERANCE * one


def test_sequence_parallel_names_the_partial_gradients(run):
    """Norms, row-parallel biases and the position embedding saw a part of the sequence."""
    assert run(2)["sp_off"]["partial"] == []
    partial = set(run(2)["sp_on"]["partial"])
    assert {"pos_emb.weight", "ln_f.weight", "ln_f.bias", "blocks.0.ln_attn.weight", "blocks.1.attn.proj.bias",
            "blocks.1.mlp.proj.bias"} <= partial
    assert not partial & {"tok_emb.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias",
                          "blocks.0.mlp.fc.bias", "blocks.0.mlp.proj.weight"}


@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_loss_equals_cross_entropy(run, world):
    for chunk, errors in run(world)["vocab_loss"].items():
        assert max(errors) <= TOLERANCE, (chunk, errors)


@pytest.mark.parametrize("world", [2, 4])
def test_counted_bytes_are_megatrons(run, world):
    tokens, d, layers, fp32 = BATCH * CFG.seq_len, CFG.d_model, CFG.n_layers, 4
    activations = (4 * layers + 2) * tokens * d * fp32  # 4 per layer, the embedding's and the head's
    regathers = 2 * layers * tokens * d * fp32  # the column-parallel layers' inputs, again in backward
    loss = 3 * tokens * fp32  # max, sum of exponentials, target logit
    assert run(world)["sp_off"]["bytes"] == {"all_reduce": activations + loss}
    for setting in ("sp_on", "sp_on_reduce_scatter"):
        assert run(world)[setting]["bytes"] == {"all_gather": activations + regathers,
                                                "reduce_scatter": activations, "all_reduce": loss}
    for setting, sp in (("sp_off", False), ("sp_on", True)):
        assert run(world)[setting]["bytes"] == tp_step_bytes(layers, tokens, d, sp)


@pytest.mark.parametrize("world", [2, 4])
def test_column_parallel_layers_keep_their_sequence_part_and_gather_it_again_in_backward(run, world):
    # the same gradients, to the bit; what backward keeps shrinks by the two gathered inputs
    # per block, less the two sequence parts kept in their place
    report = run(world)["regathered"]
    assert report["bitwise"]
    regathered, kept = report["saved"]
    whole_input = BATCH * CFG.seq_len * CFG.d_model * 4
    assert kept - regathered == 2 * CFG.n_layers * (whole_input - whole_input // world)


def test_the_partial_gradients_are_summed_in_one_all_reduce_counted_apart(run):
    partial = dict(GPT(CFG).named_parameters())
    numel = sum(partial[name].numel() for name in run(2)["sp_on"]["partial"])
    assert run(2)["sp_on"]["grad_bytes"] == {"all_reduce_grads": numel * 4}
    assert run(2)["sp_off"]["grad_bytes"] == {}


def test_sequence_parallel_positions_are_this_ranks_part():
    tp = TensorParallel(None, 4, 1, sequence_parallel=True)
    positions = SequencePartPositions(torch.nn.Embedding(16, 3), tp)
    assert torch.equal(positions(torch.arange(8)), positions.weight[2:4])
    with pytest.raises(ValueError, match="a sequence of 6 tokens does not split over 4 tensor-parallel ranks"):
        positions(torch.arange(6))


@pytest.mark.parametrize("cfg, problem, fix", [
    (GPTConfig(n_heads=6, d_model=48), "model.n_heads 6 is not divisible by parallel.tensor_parallel 4",
     "use parallel.tensor_parallel in [1, 2, 3, 6], or n_heads a multiple of 4"),
    (GPTConfig(vocab_size=250), "model.vocab_size 250 is not divisible by parallel.tensor_parallel 4",
     "pad it: model.vocab_size=252"),
    (GPTConfig(seq_len=30), "model.seq_len 30 is not divisible by parallel.tensor_parallel 4",
     "use seq_len a multiple of 4, or parallel.sequence_parallel=false"),
])
def test_sizes_that_do_not_split_are_refused_with_the_fix(cfg, problem, fix):
    model = GPT(cfg)
    with pytest.raises(RecipeError) as error:
        apply_tensor_parallel(model, TensorParallel(None, 4, 0, sequence_parallel=True))
    assert problem in str(error.value) and fix in str(error.value)
    assert "\n" not in str(error.value)
    assert model.blocks["0"].attn.n_heads == cfg.n_heads and model.tok_emb.weight.size(0) == cfg.vocab_size


def test_an_mlp_width_that_does_not_split_is_refused():
    """GPT-2's width is a multiple of d_model, so the heads' check comes first; not every
    architecture's is."""
    with pytest.raises(RecipeError, match=r"the MLP width 1000 \(model.mlp_ratio x model.d_model\) is not divisible "
                                          r"by parallel.tensor_parallel 16: .* use parallel.tensor_parallel in \[1, 2, 4, 5, 8, 10"):
        check_tensor_parallel(16, n_heads=16, mlp_width=1000, vocab_size=64, seq_len=16, sequence_parallel=True)


def test_pieces_of_a_meta_model_start_as_slices_of_the_whole():
    """A model made on the meta device (ZeRO's) gets each piece's first value from the whole
    name-seeded tensor: the same as the piece of a real model."""
    real = GPT(CFG, seed=SEED)
    real_plan = apply_tensor_parallel(real, TensorParallel(None, 4, 2))
    with torch.device("meta"):
        meta = GPT(CFG, seed=SEED)
    plan = apply_tensor_parallel(meta, TensorParallel(None, 4, 2))
    assert plan.shards == real_plan.shards
    qkv = plan.shards["blocks.0.attn.qkv.weight"]
    assert (qkv.dim, qkv.whole, qkv.start, qkv.pieces) == (0, 96, 16, 3)
    assert plan.shards["blocks.0.mlp.proj.weight"].dim == 1 and plan.shards["ln_f.weight"] is None
    for name, p in meta.named_parameters():
        out = torch.empty(p.shape)
        if plan.shards[name] is None:
            meta.initial_value(name, out)
        else:
            initial_shard(meta, name, out, plan.shards[name], 4)
        assert torch.equal(out, dict(real.named_parameters())[name]), name


def test_whole_from_pieces_inverts_the_cut():
    qkv = torch.arange(12 * 3).reshape(12, 3)
    plan = apply_tensor_parallel(GPT(CFG), TensorParallel(None, 2, 0))
    shard = plan.shards["blocks.0.attn.qkv.weight"]
    pieces = [tp_piece(qkv, shard.__class__("tp", 0, 12, rank * 2, 3), 2) for rank in (0, 1)]
    assert pieces[0].tolist() == qkv[[0, 1, 4, 5, 8, 9]].tolist()  # q, k and v: the first heads' rows of each
    assert torch.equal(tp_whole(pieces, shard.__class__("tp", 0, 12, 0, 3)), qkv)
