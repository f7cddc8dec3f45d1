"""`sdtrain import-deepspeed` on ds_config files of the kinds DeepSpeed's docs and the HF
Trainer use (tests/data/deepspeed/): what is carried, what is listed, and exit 2 where a key
left out would change what training computes."""

import json
import math

import pytest
import yaml

from conftest import REPO, sdtrain
from sdtrain.recipe import load_recipe

DATA = REPO / "tests" / "data" / "deepspeed"


def run_import(tmp_path, name, *args, config=None):
    """Import a file of tests/data/deepspeed (or `config`, written to tmp) into tmp_path/recipe.yaml."""
    source = DATA / name
    if config is not None:
        source = tmp_path / name
        source.write_text(json.dumps(config))
    out = tmp_path / "recipe.yaml"
    return sdtrain("import-deepspeed", source, "--out", out, *args), out


def ds(name):
    return json.loads((DATA / name).read_text())


def test_zero2_bf16_carries_batch_precision_zero_optimizer_and_cosine(tmp_path):
    result, out = run_import(tmp_path, "zero2_bf16.json")
    assert result.returncode == 0, result.stderr
    recipe = load_recipe(out)
    t, z = recipe.train, recipe.parallel
    assert (t.global_batch_size, t.micro_batch_size, t.grad_accum_steps) == (32, 4, 4)
    assert t.precision == "bf16" and z.zero_stage == 2 and z.zero.overlap_comm is True
    # 2e8 gradient elements of 2 bytes (bf16), in MB of 2^20 bytes.
    assert z.zero.reduce_bucket_mb == pytest.approx(2e8 * 2 / 2**20, rel=1e-6)
    assert (t.lr, t.beta1, t.beta2, t.eps, t.weight_decay, t.grad_clip) == (3e-4, 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (t.decay, t.warmup_steps, t.steps, t.min_lr_ratio) == ("cosine", 100, 1000, 0.1)
    assert recipe.log.every == 10
    # Every key not carried is listed with its reason, in the output and in the recipe file.
    for key in ("allgather_bucket_size", "contiguous_gradients", "reduce_scatter", "wall_clock_breakdown"):
        assert key in result.stdout and key in out.read_text()
    # The three batch values fix the world size at 32 / (4 x 4) = 2, as in DeepSpeed.
    launch = sdtrain("launch", out, "--nproc-per-node", 2, "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert launch.returncode == 0, launch.stderr
    assert json.loads(launch.stdout)["batch"] == {"global": 32, "micro": 4, "grad_accum": 4, "data_parallel": 2}


def test_zero3_with_offload_lists_offload_and_keeps_stage3_settings(tmp_path):
    result, out = run_import(tmp_path, "zero3_offload.json")
    assert result.returncode == 0, result.stderr  # offload moves memory, not the numbers: listed only
    recipe = load_recipe(out)
    zero = recipe.parallel.zero
    assert recipe.parallel.zero_stage == 3 and recipe.train.activation_checkpointing is True
    assert zero.persistence_threshold == 100_000
    assert 1 <= zero.prefetch_blocks <= recipe.model.n_layers - 1  # 5e7 elements: many blocks, capped
    assert (recipe.train.decay, recipe.train.warmup_steps, recipe.train.lr) == ("constant", 50, 1e-4)
    for key in ("offload_optimizer", "offload_param", "stage3_max_live_parameters", "sub_group_size",
                "stage3_gather_16bit_weights_on_model_save", "cpu_checkpointing"):
        assert f"zero_optimization.{key}" in result.stdout or f"activation_checkpointing.{key}" in result.stdout
    assert "approximate" in result.stdout  # the prefetch conversion says what it is
    launch = sdtrain("launch", out, "--nproc-per-node", 2, "--dry-run", "--run-dir", tmp_path / "run")
    assert launch.returncode == 0, launch.stderr


def test_fp16_with_warmup_decay(tmp_path):
    result, out = run_import(tmp_path, "fp16_warmup_decay.json")
    assert result.returncode == 0, result.stderr
    t = load_recipe(out).train
    # DeepSpeed's "Adam" decouples weight decay (adam_w_mode defaults to true): sdtrain's AdamW.
    assert t.precision == "fp16" and (t.beta1, t.beta2, t.weight_decay) == (0.9, 0.98, 0.01)
    # WarmupDecayLR: warmup_max_lr is the peak, linear decay to 0 at total_num_steps.
    assert (t.lr, t.decay, t.min_lr_ratio, t.warmup_steps, t.steps) == (1.5e-4, "linear", 0.0, 200, 2000)
    for key in ("loss_scale_window", "hysteresis", "min_loss_scale"):
        assert f"fp16.{key}" in result.stdout
    assert sdtrain("launch", out, "--nproc-per-node", 2, "--dry-run", "--run-dir", tmp_path / "run").returncode == 0


def test_pipeline_section_carries_stages_and_partition(tmp_path):
    result, out = run_import(tmp_path, "pipeline_bf16.json")
    assert result.returncode == 0, result.stderr
    recipe = load_recipe(out)
    pipeline = recipe.parallel.pipeline
    assert (pipeline.stages, pipeline.partition, pipeline.schedule) == (2, "parameters", "1f1b")
    assert recipe.train.activation_checkpointing is True and recipe.train.precision == "bf16"
    assert "pipeline.seed_layers" in result.stdout
    # 4 workers as 2 stages x 2 replicas: grad_accum_steps (the micro-batches of a step) = 16 / (2 x 2).
    launch = sdtrain("launch", out, "--nproc-per-node", 4, "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert launch.returncode == 0, launch.stderr
    assert json.loads(launch.stdout)["batch"] == {"global": 16, "micro": 2, "grad_accum": 4, "data_parallel": 2}


def test_hf_trainer_auto_needs_a_batch_and_lists_every_auto(tmp_path):
    result, out = run_import(tmp_path, "hf_trainer_auto.json")
    assert result.returncode == 2 and "--set train.micro_batch_size" in result.stderr and not out.exists()
    # The template's WarmupLR warms up logarithmically (DeepSpeed's default warmup_type): a
    # schedule sdtrain lacks, so the import stops until --lenient.
    result, out = run_import(tmp_path, "hf_trainer_auto.json", "--set", "train.micro_batch_size=4")
    assert result.returncode == 2 and "scheduler.params.warmup_type" in result.stderr and not out.exists()
    result, out = run_import(tmp_path, "hf_trainer_auto.json", "--set", "train.micro_batch_size=4", "--lenient")
    assert result.returncode == 0, result.stderr
    recipe = load_recipe(out)
    assert recipe.train.micro_batch_size == 4 and recipe.parallel.zero_stage == 2
    # "auto" bucket: the HF Trainer's d_model^2 elements for this model, fp32 (precision is auto too).
    assert recipe.parallel.zero.reduce_bucket_mb == pytest.approx(recipe.model.d_model**2 * 4 / 2**20, rel=1e-3)
    for key in ("optimizer.params.lr", "optimizer.params.betas", "fp16.enabled", "bf16.enabled",
                "gradient_clipping", "train_batch_size", "scheduler.params.warmup_num_steps"):
        assert f"? {key}" in result.stdout
    assert sdtrain("launch", out, "--nproc-per-node", 2, "--dry-run", "--run-dir", tmp_path / "run").returncode == 0


@pytest.mark.parametrize("change, key", [
    (lambda c: c["optimizer"].update(type="Lamb"), "optimizer.type"),
    (lambda c: c["optimizer"].update(type="OneBitAdam"), "optimizer.type"),
    (lambda c: c["scheduler"].update(type="OneCycle"), "scheduler.type"),
    (lambda c: c["optimizer"]["params"].update(adam_w_mode=False), "optimizer.params.adam_w_mode"),
    (lambda c: c.update(zero_optimisation={"stage": 2}), "zero_optimisation"),  # a typo DeepSpeed would ignore
    (lambda c: c["zero_optimization"].update(zero_quantized_gradients=True), "zero_optimization.zero_quantized_gradients"),
])
def test_keys_that_change_numerics_exit_2_unless_lenient(tmp_path, change, key):
    config = ds("zero2_bf16.json")
    config["optimizer"]["type"] = "Adam"
    change(config)
    result, out = run_import(tmp_path, "changed.json", config=config)
    assert result.returncode == 2 and key in result.stderr and not out.exists()
    result, out = run_import(tmp_path, "changed.json", "--lenient", config=config)
    assert result.returncode == 0, result.stderr
    assert f"! {key}" in result.stdout and key in out.read_text()  # still listed, in the file too
    load_recipe(out)


def test_fp16_static_loss_scale_and_fp16_with_zero(tmp_path):
    config = ds("fp16_warmup_decay.json")
    config["fp16"]["loss_scale"] = 128
    result, _ = run_import(tmp_path, "static.json", config=config)
    assert result.returncode == 2 and "fp16.loss_scale" in result.stderr
    config = ds("fp16_warmup_decay.json")
    config["zero_optimization"] = {"stage": 2}
    result, out = run_import(tmp_path, "fp16_zero.json", "--lenient", config=config)
    assert result.returncode == 0 and "fp16 with ZeRO stage 2" in result.stdout
    assert load_recipe(out).train.precision == "bf16"


def test_defaults_where_deepspeed_and_sdtrain_differ(tmp_path):
    """No gradient_clipping means no clipping in DeepSpeed; optimizer params left out take
    FusedAdam's defaults (betas 0.9/0.999, no weight decay), not sdtrain's."""
    config = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    result, out = run_import(tmp_path, "minimal.json", config=config)
    assert result.returncode == 0, result.stderr
    t = load_recipe(out).train
    assert (t.grad_clip, t.beta2, t.weight_decay, t.lr) == (0.0, 0.999, 0.0, 1e-3)
    assert "scheduler" in result.stdout  # left to the script: listed, sdtrain's schedule stays


def test_without_out_prints_the_recipe_to_stdout_and_the_account_to_stderr(tmp_path):
    result = sdtrain("import-deepspeed", DATA / "zero2_bf16.json")
    assert result.returncode == 0
    assert yaml.safe_load(result.stdout)["parallel"]["zero_stage"] == 2
    assert "carried over (" in result.stderr and "carried over (" not in result.stdout


@pytest.mark.parametrize("content, expected", [
    ('{"train_batch_size": 8,\n "bf16": {"enabled": true},\n}', "not valid JSON: Expecting property name enclosed in double quotes at line 3 column 1"),
    ('[1, 2]', "must hold a JSON object"),
    ('{"train_batch_size": 8, "train_batch_size": 16}', "appears twice"),
    ('{"train_batch_size": "eight"}', "train_batch_size must be a number"),
    (b"\xff\xfe{}", "is not UTF-8"),
])
def test_bad_config_exits_2_naming_the_file(tmp_path, content, expected):
    path = tmp_path / "ds_config.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = sdtrain("import-deepspeed", path)
    assert result.returncode == 2
    assert expected in result.stderr.replace("\n", " ") and "ds_config.json" in result.stderr


def test_unreadable_config_exits_2(tmp_path):
    assert "cannot read DeepSpeed config" in sdtrain("import-deepspeed", tmp_path / "missing.json").stderr
    result = sdtrain("import-deepspeed", tmp_path)
    assert result.returncode == 2 and "Is a directory" in result.stderr


def test_reduce_bucket_conversion_is_stated_per_dtype(tmp_path):
    config = {"train_batch_size": 8, "zero_optimization": {"stage": 1, "reduce_bucket_size": 5e8}}
    result, out = run_import(tmp_path, "fp32.json", config=config)
    assert result.returncode == 0 and "x 4 bytes (fp32)" in result.stdout
    assert math.isclose(load_recipe(out).parallel.zero.reduce_bucket_mb, 5e8 * 4 / 2**20, rel_tol=1e-6)
