"""Tensor parallelism and experts with llama blocks: q by query heads, k and v by key/value
heads, SwiGLU's gate and up column-parallel, RMSNorm whole, the untied head and the embedding
vocabulary-parallel; Mixtral-style SwiGLU experts. Real runs through `sdtrain launch`, each
against the one-process run of the same recipe (losses and weights 1e-5, the grad norm 5e-5)."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, launch_run, merge, metrics, sdtrain
from sdtrain.model.gpt import GPT, GPTConfig
from sdtrain.model.moe.experts import GroupedExperts
from sdtrain.model.moe.layer import MoESettings
from sdtrain.model.size import count_params
from sdtrain.estimate.plan import estimate_recipe
from sdtrain.parallel.tensor_parallel import apply_tensor_parallel
from sdtrain.parallel.tp_collectives import TensorParallel
from sdtrain.parallel.tp_volume import tp_step_bytes
from sdtrain.recipe import validate_recipe
from test_tp_training import STEPS, assert_same_run, assert_same_weights

# 2 blocks of 4 query heads over 2 key/value heads, a SwiGLU 64 wide: tp 2 leaves a rank 2
# query heads over 1 key/value head and 32 of the width. Micro-batches of 2, 4 per step.
LLAMA = {"name": "llama", "model": {"arch": "llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2,
                                    "ffn_hidden": 64},
         "train": {"steps": STEPS}, "checkpoint": {"at_end": True, "every": 10, "keep": 3}}
EXPERTS = ["model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.every_n_layers=1"]


def launch(tmp, name, nproc, *overrides):
    return launch_run(tmp, name, nproc, merge(TINY, LLAMA), *overrides)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("llama-ref"), "single", 1)


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """tp 2 without sequence parallelism: the attention's and the MLP's inputs whole on both ranks."""
    return launch(tmp_path_factory.mktemp("llama-tp2"), "tp2", 2, "parallel.tensor_parallel=2",
                  "parallel.sequence_parallel=false")


def assert_llama_tp_bytes_per_step(run_dir, sequence_parallel: bool):
    """Megatron's count for 2 layers (tp_volume.py), with no re-gather in backward: q, k and v
    (gate and up) share one way into the tp region, whose saved whole input serves all three."""
    expected = tp_step_bytes(2, 4 * 2 * 32, 32, sequence_parallel, regathered=False)
    for row in [row for row in metrics(run_dir) if "tp_bytes" in row][1:]:  # step 1 holds the step-0 eval's too
        tp_bytes = dict(row["tp_bytes"])
        assert (tp_bytes.pop("all_reduce_grads", 0) > 0) == sequence_parallel  # RMSNorm weights' partial sums
        assert tp_bytes == expected, row["step"]


def test_tp2_with_sequence_parallelism_matches_one_process(reference, tmp_path):
    """Each rank's rotary tables turn its local heads at the tokens' places in the whole
    sequence (the attention sees it gathered); RMSNorm weights' partial gradients summed."""
    run_dir = launch(tmp_path, "tp2-sp", 2, "parallel.tensor_parallel=2")
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)
    assert_llama_tp_bytes_per_step(run_dir, sequence_parallel=True)


def test_tp2_without_sequence_parallelism_matches_one_process(reference, tp2):
    assert_same_run(reference, tp2)
    assert_same_weights(reference, tp2)
    assert_llama_tp_bytes_per_step(tp2, sequence_parallel=False)


def test_a_tp2_checkpoint_continues_in_one_process(reference, tp2, tmp_path):
    """The pieces of q, k, v, gate, up, proj, the embedding and the untied head read back whole."""
    resumed = tmp_path / "resumed"
    shutil.copytree(tp2, resumed)
    shutil.rmtree(resumed / "checkpoints" / f"step_{STEPS}")
    (resumed / "checkpoints" / "latest").write_text("step_10")
    assert launch(tmp_path, "resumed", 1, "train.resume=auto") == resumed
    assert_same_run(reference, resumed, steps=range(11, STEPS + 1))
    assert_same_weights(reference, resumed)


@pytest.mark.slow  # ZeRO over tp pieces is make test's in test_tp_zero
def test_tp2_under_zero3_matches_one_process(reference, tmp_path):
    """4 ranks: each tp rank's pieces sharded over its 2 data-parallel replicas, first values
    sliced from the whole name-seeded tensors of a meta-device model."""
    run_dir = launch(tmp_path, "tp2-zero3", 4, "parallel.tensor_parallel=2", "parallel.zero_stage=3")
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)


@pytest.mark.parametrize("schedule", [
    # 4 ranks, 28 s on 2 shared cores; pp x tp is make test's in test_tp_pipeline
    pytest.param("1f1b", marks=pytest.mark.slow),
    pytest.param("zero_bubble", marks=pytest.mark.slow),  # RMSNorm's and the pieces' deferred weight grads
])
def test_pp2_by_tp2_matches_one_process(reference, tmp_path, schedule):
    """The head's stage holds its vocabulary rows of the untied head."""
    run_dir = launch(tmp_path, "pp2-tp2", 4, "parallel.tensor_parallel=2", "parallel.pipeline.stages=2",
                     f"parallel.pipeline.schedule={schedule}")
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("option", ["train.activation_checkpointing=true", "train.compile=true"])
def test_tp2_with_checkpointed_or_compiled_llama_blocks_matches_one_process(reference, tmp_path, option):
    """The pre-hooks taking q/k/v's and gate/up's input into the tp region run inside the
    checkpointed (recomputed) or compiled block."""
    run_dir = launch(tmp_path, "tp2", 2, "parallel.tensor_parallel=2", option)
    assert_same_run(reference, run_dir)
    assert_same_weights(reference, run_dir)


def test_kv_heads_not_divisible_by_tp_exit_2(write_recipe, tmp_path):
    recipe = write_recipe({"model": {**LLAMA["model"], "n_kv_heads": 1}})  # multi-query: one key/value head
    result = sdtrain("launch", recipe, "--run-dir", tmp_path / "run", "--nproc-per-node", 2,
                     "--set", "parallel.tensor_parallel=2")
    assert result.returncode == 2, result.stderr
    assert ("model.n_kv_heads 1 is not divisible by parallel.tensor_parallel 2" in result.stderr
            and "use parallel.tensor_parallel in [1]" in result.stderr), result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", [
    LLAMA["model"],
    {**LLAMA["model"], "tie_embeddings": True},
    {**LLAMA["model"], "moe": {"num_experts": 4, "every_n_layers": 2}},  # block 1's experts stay whole
], ids=["untied", "tied", "experts"])
def test_the_estimate_counts_what_a_llama_tp_rank_holds(model):
    """estimate's weights at tp 2 are 4 bytes times the parameters of a model split by
    apply_tensor_parallel (no collective runs while splitting: a group of none will do)."""
    recipe = validate_recipe(merge(TINY, {"model": model, "parallel": {"tensor_parallel": 2}, "train": {
        "global_batch_size": None, "micro_batch_size": 2, "grad_accum_steps": 4}}))
    held = GPT(GPTConfig(**recipe.model.model_dump()))
    apply_tensor_parallel(held, TensorParallel(None, 2, 0))
    estimate, = estimate_recipe(recipe, 2)
    assert {t.name: t.bytes for t in estimate.terms}["weights"] == 4 * sum(p.numel() for p in held.parameters())
    # SP: no backward re-gather (q, k, v share one gather): Megatron's four collectives a block,
    # and the two gathered norm outputs kept whole: 2 + 14 / 2 of gpt2's 16 values a token and channel
    assert estimate.tp_bytes == tp_step_bytes(2, 2 * 4 * 32, 32, True, regathered=False)
    activations = next(t for t in estimate.terms if t.name == "activations")
    assert "2 blocks x 9 (tp 2, sequence parallel) values/token/channel" in activations.detail


# --- Mixtral-style SwiGLU experts -------------------------------------------------------------


def test_swiglu_experts_compute_mixtrals_expert():
    """expert(x) = (silu(x @ w1) * (x @ w3)) @ w2, each expert on its own rows."""
    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 16, swiglu=True)
    for w in experts.weights:
        torch.nn.init.normal_(w)
    counts = torch.tensor([2, 0, 3])
    tokens = torch.randn(5, 8)
    rows = [0, 0, 2, 2, 2]
    expected = torch.stack([(F.silu(x @ experts.w1[e]) * (x @ experts.w3[e])) @ experts.w2[e]
                            for x, e in zip(tokens, rows)])
    torch.testing.assert_close(experts(tokens, counts), expected)
    experts.keep(1, 2)  # expert parallelism keeps w3 with w1 and w2
    assert [tuple(w.shape) for w in experts.weights] == [(2, 8, 16), (2, 16, 8), (2, 8, 16)]


def test_llama_experts_are_ffn_hidden_wide_and_seeded_per_expert():
    cfg = GPTConfig(arch="llama", n_layers=2, d_model=32, n_heads=4, ffn_hidden=48,
                    moe=MoESettings(num_experts=4, every_n_layers=2))
    model = GPT(cfg, seed=3)
    experts = model.blocks["1"].mlp.experts
    assert experts.w3.shape == experts.w1.shape == (4, 32, 48) and experts.w2.shape == (4, 48, 32)
    assert not torch.equal(experts.w1, experts.w3)  # each weight its own generator
    # the same expert starts the same wherever it is made (expert parallelism's slice of them)
    out = torch.empty(2, 32, 48)
    model.first_expert["blocks.1.mlp.experts"] = 2
    model.initial_value("blocks.1.mlp.experts.w3", out)
    assert torch.equal(out, experts.w3[2:])
    assert model.num_params() == count_params(cfg)  # size.py's closed form counts w3


@pytest.fixture(scope="module")
def experts_reference(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("llama-moe-ref"), "single", 1, *EXPERTS)


def test_llama_experts_split_over_ep2_match_one_process(experts_reference, tmp_path):
    run_dir = launch(tmp_path, "ep2", 2, *EXPERTS, "parallel.expert_parallel=2")
    assert_same_run(experts_reference, run_dir)
    assert_same_weights(experts_reference, run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["parallel.tensor_parallel=2", "parallel.expert_parallel=2"],  # 4 ranks: tp 2 x dp 2, experts over ep
    ["parallel.expert_parallel=2", "parallel.zero_stage=3"],  # experts' shards over edp 1, dense over dp 2
], ids=["tp2-ep2", "ep2-zero3"])
def test_llama_experts_with_other_axes_match_one_process(experts_reference, tmp_path, overrides):
    nproc = 4 if "parallel.tensor_parallel=2" in overrides else 2
    run_dir = launch(tmp_path, "run", nproc, *EXPERTS, *overrides)
    assert_same_run(experts_reference, run_dir)
    assert_same_weights(experts_reference, run_dir)
