"""Tensor parallelism before anything starts: the recipe keys, every refusal, the batch and
data arithmetic with tp, the warning when a tp group spans nodes, and what `estimate` says
a tp rank holds and moves (checked against numbers worked out by hand for the tiny model)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from conftest import TINY, merge, sdtrain
from sdtrain.batch import derive_batch
from sdtrain.errors import RecipeError
from sdtrain.estimate.plan import estimate_recipe
from sdtrain.launch.job import tp_across_nodes
from sdtrain.launch.plan import LaunchPlan, Node
from sdtrain.parallel.layout import Layout
from sdtrain.recipe import load_recipe, validate_recipe
from sdtrain.train.data import TRAIN, Batches


def recipe_of(extra: dict | None = None, **parallel):
    return validate_recipe(merge(TINY, {"parallel": parallel, **(extra or {})}))


# --- the keys ---------------------------------------------------------------------------------

def test_sequence_parallel_resolves_to_true_with_tp_and_the_run_directory_shows_it():
    assert (recipe_of().parallel.tensor_parallel, recipe_of().parallel.sequence_parallel) == (1, False)
    tp2 = recipe_of(tensor_parallel=2)
    assert tp2.parallel.sequence_parallel is True
    assert yaml.safe_load(tp2.to_yaml())["parallel"]["sequence_parallel"] is True  # recipe.yaml says what ran
    assert recipe_of(tensor_parallel=2, sequence_parallel=False).parallel.sequence_parallel is False
    # at T = 1 there is nothing to split: an explicit true is accepted and resolves to false
    assert recipe_of(sequence_parallel=True).parallel.sequence_parallel is False
    # the resolved recipe, sent to the workers as JSON, validates to the same
    assert validate_recipe(json.loads(json.dumps(tp2.model_dump(mode="json")))) == tp2


@pytest.mark.parametrize("word, value", [("on", True), ("yes", True), ("true", True),
                                         ("off", False), ("no", False), ("false", False)])
def test_yaml_booleans_work_unquoted_in_a_recipe_and_in_set(tmp_path, word, value):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, {"parallel": {"tensor_parallel": 2}})).replace(
        "tensor_parallel: 2", f"tensor_parallel: 2\n  sequence_parallel: {word}"))
    assert load_recipe(path).parallel.sequence_parallel is value
    path.write_text(yaml.safe_dump(TINY))
    assert load_recipe(path, ["parallel.tensor_parallel=2", f"parallel.sequence_parallel={word}"]) \
        .parallel.sequence_parallel is value


def test_a_misspelt_or_mistyped_key_is_refused_with_the_fix():
    with pytest.raises(RecipeError, match=r"unknown key parallel.tensor_paralel \(did you mean 'tensor_parallel'\?\)"):
        validate_recipe(merge(TINY, {"parallel": {"tensor_paralel": 2}}))
    with pytest.raises(RecipeError, match="parallel.tensor_parallel: Input should be greater than or equal to 1"):
        recipe_of(tensor_parallel=0)
    with pytest.raises(RecipeError, match="parallel.sequence_parallel: Input should be a valid boolean"):
        recipe_of(tensor_parallel=2, sequence_parallel="sometimes")


# --- what the model must allow: refused at load, before anything launches ----------------------

@pytest.mark.parametrize("model, parallel, message", [
    ({"n_heads": 2}, {"tensor_parallel": 4},
     "model.n_heads 2 is not divisible by parallel.tensor_parallel 4: each rank computes n_heads / 4 heads; use "
     "parallel.tensor_parallel in [1, 2], or n_heads a multiple of 4"),
    ({"vocab_size": 257}, {"tensor_parallel": 2},
     "model.vocab_size 257 is not divisible by parallel.tensor_parallel 2: each rank holds vocab_size / 2 rows of the "
     "embedding and head; pad it: model.vocab_size=258"),
    ({"seq_len": 33}, {"tensor_parallel": 2},
     "model.seq_len 33 is not divisible by parallel.tensor_parallel 2: parallel.sequence_parallel splits every "
     "sequence over the ranks; use seq_len a multiple of 2, or parallel.sequence_parallel=false"),
])
def test_a_model_tp_cannot_split_is_refused_with_the_fix(model, parallel, message):
    with pytest.raises(RecipeError) as error:
        recipe_of({"model": model}, **parallel)
    assert str(error.value).startswith("recipe: recipe: " + message)


def test_without_sequence_parallel_any_seq_len_splits():
    assert recipe_of({"model": {"seq_len": 33}}, tensor_parallel=2, sequence_parallel=False).model.seq_len == 33


def test_launch_refuses_bad_tp_with_exit_2_and_launches_nothing(write_recipe, tmp_path):
    recipe = write_recipe({"model": {"vocab_size": 257}, "parallel": {"tensor_parallel": 2}})
    result = sdtrain("launch", recipe, "--nproc-per-node", 2, "--run-dir", tmp_path / "run")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "model.vocab_size 257 is not divisible by parallel.tensor_parallel 2" in " ".join(result.stderr.split())
    assert not (tmp_path / "run").exists()
    result = sdtrain("launch", write_recipe({"parallel": {"tensor_parallel": 2}}), "--nproc-per-node", 3, "--dry-run")
    assert result.returncode == 2
    assert ("parallel.tensor_parallel 2 x parallel.pipeline.stages 1 = 2 does not divide the world size 3: every stage "
            "needs whole tensor-parallel groups; use tensor_parallel in [1, 3], or 4 workers") in " ".join(result.stderr.split())


# --- batch and data: dp = world / (pp x tp), and one tp group reads the same samples ------------

def test_dry_run_takes_dp_as_world_over_pp_times_tp(write_recipe, tmp_path):
    recipe = write_recipe({"parallel": {"tensor_parallel": 2}, "train": {"global_batch_size": 8, "micro_batch_size": 2}})
    result = sdtrain("launch", recipe, "--nproc-per-node", 4, "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["parallel"] == {"pp": 1, "dp": 2, "tp": 2, "ep": 1}
    assert plan["batch"] == {"global": 8, "micro": 2, "grad_accum": 2, "data_parallel": 2}
    assert plan["recipe"]["parallel"]["sequence_parallel"] is True
    assert plan["stages"][0]["state_bytes_per_rank"] == 16 * TP2_HELD  # fp32 DDP: 16 bytes per parameter of its piece
    text = sdtrain("launch", recipe, "--nproc-per-node", 4, "--dry-run", "--run-dir", tmp_path / "run").stdout
    assert "parallel: world 4 = pipeline stages 1 x data_parallel 2 x tensor_parallel 2, sequence parallel\n" in text
    assert "batch: global_batch_size 8 = micro_batch_size 2 x grad_accum_steps 2 x data_parallel 2" in text


def test_the_ranks_of_one_tp_group_read_the_same_micro_batches():
    layout = Layout(8, pp=2, tp=2)  # dp 2
    plan = derive_batch(8, 2, None, layout.dp)
    batches = Batches(np.arange(10_000, dtype=np.uint16), 16, 1337, plan, TRAIN)

    def samples(rank: int) -> list:
        return [x.tolist() for x, _ in batches.micro_batches(3, layout.dp_rank_of(rank), torch.device("cpu"))]

    for stage in range(2):
        for dp_rank in range(2):
            group = layout.tp_ranks(stage, dp_rank)
            assert all(samples(rank) == samples(group[0]) for rank in group)
    assert samples(0) != samples(2)  # the dp ranks split the global batch
    every = sorted(row[0] for rank in layout.pipeline_ranks(0) + layout.pipeline_ranks(1) for m in samples(rank) for row in m)
    assert len(every) == 2 * 2 * plan.per_rank  # both dp ranks' halves, over both stages: the whole batch twice
    assert sorted(set(every)) == sorted(int(s) for s in batches.global_starts(3))


# --- a tp group across nodes: a warning --------------------------------------------------------

def test_a_tp_group_across_nodes_is_warned_about():
    model = recipe_of().model  # n_heads 2, vocab 256
    across = LaunchPlan([Node("a", (0, 1, 2), 0), Node("b", (0, 1, 2), 1)], "a", 29500, "gloo", "run")
    warning, = tp_across_nodes(across, Layout(6, tp=2), model)
    assert warning.startswith("parallel.tensor_parallel 2: 1 of 3 tensor-parallel groups span nodes (ranks 2-3 on a "
                              "and b): their all-reduces run in every layer")
    assert warning.endswith("use nodes whose worker counts are multiples of 2")  # 3 would split no head pair
    inside = LaunchPlan([Node("a", (0, 1, 2, 3), 0), Node("b", (0, 1, 2, 3), 1)], "a", 29500, "gloo", "run")
    assert tp_across_nodes(inside, Layout(8, tp=2), model) == tp_across_nodes(inside, Layout(8), model) == []
    warning, = tp_across_nodes(inside, Layout(8, tp=8), recipe_of({"model": {"n_heads": 8}}).model)
    assert "1 of 1 tensor-parallel groups span nodes (ranks 0-7 on a and b)" in warning
    assert warning.endswith("use parallel.tensor_parallel in [2, 4], or nodes whose worker counts are multiples of 8")


# --- estimate: a tp rank's memory and traffic, by hand for the tiny model -----------------------
# d 32, MLP width 128, 2 blocks, vocabulary 256, seq_len 32, micro-batch 2 (64 tokens), fp32.
BLOCK_SPLIT = 3 * 32 * 32 + 3 * 32 + 32 * 32 + 32 * 128 + 128 + 128 * 32  # qkv, proj weight, fc, proj weight
WHOLE_MODEL = 34_688
TP2_HELD = WHOLE_MODEL - (2 * BLOCK_SPLIT + 256 * 32) // 2  # norms, position embedding, proj biases whole
ACTIVATION = 64 * 32 * 4  # one fp32 value per token and channel of a micro-batch


def terms(recipe, world: int) -> dict:
    estimate, = estimate_recipe(recipe, world)
    return {t.name: t.bytes for t in estimate.terms} | {"tp": estimate.tp_bytes, "wire": estimate.tp_wire_bytes}


def batch(micro: int = 2, accum: int = 4) -> dict:
    return {"train": {"global_batch_size": None, "micro_batch_size": micro, "grad_accum_steps": accum}}


def test_a_tp_rank_holds_its_piece_of_the_model_state_and_zero_shards_it_over_dp():
    assert TP2_HELD == 18_080
    assert terms(recipe_of(batch(), tensor_parallel=2), 2)["weights"] == 4 * TP2_HELD  # DDP: fp32 weights
    assert terms(recipe_of(batch()), 1)["weights"] == 4 * WHOLE_MODEL
    assert terms(recipe_of(batch(), tensor_parallel=2, zero_stage=3), 4)["weights"] == 4 * TP2_HELD / 2  # dp 2


def test_activations_split_by_tp_and_by_sequence_parallel():
    # per block 16 values/token/channel: 12 split by heads / features, 4 whole without SP; with SP
    # all 16 split (the column-parallel layers keep their sequence part, gathered again in
    # backward); the embedding's output is split along the sequence only under SP
    assert terms(recipe_of(batch()), 1)["activations"] == 2 * 16 * ACTIVATION + ACTIVATION
    assert terms(recipe_of(batch(), tensor_parallel=2, sequence_parallel=False), 2)["activations"] == \
        2 * (4 + 12 / 2) * ACTIVATION + ACTIVATION
    assert terms(recipe_of(batch(), tensor_parallel=2), 2)["activations"] == 2 * 16 / 2 * ACTIVATION + ACTIVATION / 2
    # the vocabulary-parallel head: a 128-row slice of the head gradient and of each logits chunk
    assert terms(recipe_of(batch(), tensor_parallel=2), 2)["logits and loss"] == 4 * 128 * 32 + ACTIVATION + 2 * 4 * 64 * 128


def test_tp_traffic_per_step_is_megatrons_four_collectives_per_block():
    tokens = 2 * 4 * 32  # micro-batch 2 x 4 micro-batches x seq_len 32, every one through both blocks
    tensor = tokens * 32 * 4  # B·T·d fp32
    loss = 3 * tokens * 4  # max, sum of exponentials, target logit per token
    collectives = 4 * 2 + 2  # four per block, the embedding's forward and the head's backward
    plain = terms(recipe_of(batch(), tensor_parallel=2, sequence_parallel=False), 2)
    assert plain["tp"] == {"all_reduce": collectives * tensor + loss}
    sequence = terms(recipe_of(batch(), tensor_parallel=2), 2)
    regathers = 2 * 2  # SP: the two column-parallel layers' inputs of each block, gathered again in backward
    assert sequence["tp"] == {"all_reduce": loss, "all_gather": (collectives + regathers) * tensor,
                              "reduce_scatter": collectives * tensor}
    assert plain["wire"] == collectives * tensor + loss  # a ring all-reduce = RS + AG, 2(T-1)/T
    assert sequence["wire"] == plain["wire"] + regathers * tensor // 2  # an all-gather (T-1)/T
    recomputed = terms(recipe_of(merge(batch(), {"train": {"activation_checkpointing": True}}), tensor_parallel=2), 2)
    assert recomputed["tp"] == {"all_reduce": loss, "all_gather": (collectives + regathers + 2 * 2) * tensor,
                                "reduce_scatter": (collectives + 2 * 2) * tensor}  # each block's forward again
    recomputed = terms(recipe_of(merge(batch(), {"train": {"activation_checkpointing": True}}), tensor_parallel=2,
                                 sequence_parallel=False), 2)
    assert recomputed["tp"] == {"all_reduce": (collectives + 2 * 2) * tensor + loss}  # each block's forward again
    assert terms(recipe_of(batch()), 1)["tp"] == {}


def test_estimate_json_adds_the_tp_fields_and_keeps_its_contract(write_recipe):
    recipe = write_recipe({"parallel": {"tensor_parallel": 2}})
    result = sdtrain("estimate", recipe, "--gpus", 4, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert {"params", "gpus", "per_device_bytes"} <= out.keys() and out["params"] == WHOLE_MODEL
    rank, = out["ranks"]
    assert set(rank["tp_bytes_per_step"]) == {"all_reduce", "all_gather", "reduce_scatter"}
    assert rank["tp_wire_bytes_per_step"] > 0
    weights = next(t for t in rank["terms"] if t["name"] == "weights")
    assert weights["bytes"] == 4 * TP2_HELD
    result = sdtrain("estimate", write_recipe({"parallel": {"tensor_parallel": 4}}), "--gpus", 4)
    assert result.returncode == 2 and "model.n_heads 2 is not divisible by parallel.tensor_parallel 4" in \
        " ".join(result.stderr.split())


def test_sequence_parallel_is_the_first_change_suggested_to_a_tp_plan_that_does_not_fit():
    from sdtrain.estimate.suggest import apply, candidate_changes

    recipe = recipe_of(batch(), tensor_parallel=2, sequence_parallel=False)
    first = candidate_changes(recipe)[0]
    assert first == {"parallel.sequence_parallel": True}
    assert terms(apply(recipe, first), 2)["activations"] < terms(recipe, 2)["activations"]
    assert {"parallel.sequence_parallel": True} not in candidate_changes(recipe_of(batch(), tensor_parallel=2))
    assert {"parallel.sequence_parallel": True} not in candidate_changes(
        recipe_of(merge(batch(), {"model": {"seq_len": 33}}), tensor_parallel=2, sequence_parallel=False))


def test_the_estimate_table_shows_the_tp_traffic(write_recipe):
    result = sdtrain("estimate", write_recipe({"parallel": {"tensor_parallel": 2}}), "--gpus", 2)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "tensor-parallel traffic" in text and "all-gather" in text and "reduce-scatter" in text
