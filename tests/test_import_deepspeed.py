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
    out.unlink(missing_ok=True)  # each import writes afresh (an existing --out is refused without --force)
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


def test_zero3_with_offload_carries_offload_and_keeps_stage3_settings(tmp_path):
    result, out = run_import(tmp_path, "zero3_offload.json")
    assert result.returncode == 0, result.stderr
    recipe = load_recipe(out)
    zero = recipe.parallel.zero
    assert (zero.offload_optimizer, zero.offload_params, zero.pin_memory) == ("cpu", "cpu", True)  # carried (issue 22)
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
    # the fp16 block: DeepSpeed's loss-scaler knobs, onto the same rule's keys
    s = t.loss_scale
    assert (s.static, s.initial_scale_power, s.window, s.hysteresis, s.min_scale) == (0, 16, 1000, 2, 1)
    carried = "\n".join(carried_lines(result.stdout))
    for key in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"):
        assert f"fp16.{key}" in carried
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
    """A static scale is carried over (DeepSpeed's loss_scale > 0), and fp16 with ZeRO, a
    pipeline and experts stays fp16, its scaler's knobs with it."""
    config = ds("fp16_warmup_decay.json")
    config["fp16"].update(loss_scale=128, initial_scale_power=12, loss_scale_window=500, hysteresis=3,
                          min_loss_scale=0.5, consecutive_hysteresis=False)
    config["zero_optimization"] = {"stage": 2}
    result, out = run_import(tmp_path, "fp16_zero.json", config=config)
    assert result.returncode == 0, result.stderr
    t = load_recipe(out).train
    assert t.precision == "fp16"
    assert (t.loss_scale.static, t.loss_scale.initial_scale_power, t.loss_scale.window, t.loss_scale.hysteresis,
            t.loss_scale.min_scale) == (128, 12, 500, 3, 0.5)
    assert "fp16.consecutive_hysteresis" in result.stdout
    config["fp16"]["consecutive_hysteresis"] = True  # a rule sdtrain's scaler does not follow: listed, not carried
    result, _ = run_import(tmp_path, "consecutive.json", "--lenient", config=config)
    assert result.returncode == 0 and "- fp16.consecutive_hysteresis" in result.stdout
    config["fp16"]["hysteresis"] = "two"
    result, _ = run_import(tmp_path, "bad.json", config=config)
    assert result.returncode == 2 and "fp16.hysteresis must be a number" in result.stderr


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


def carried_lines(stdout: str) -> list[str]:
    """The account's "carried over" block, one line per key."""
    block = stdout.split("carried over (", 1)[1].split("not carried over (", 1)[0]
    return block.splitlines()[1:]


def test_fp16_is_listed_once_when_set_precision_chooses_another(tmp_path):
    """--set train.precision=bf16 over an fp16 config: fp16 is not carried over, so neither
    are its loss-scaler keys (listed as not carried, never as carried)."""
    config = ds("fp16_warmup_decay.json")
    config["zero_optimization"] = {"stage": 2}
    config["fp16"]["loss_scale"] = 128
    result, out = run_import(tmp_path, "fp16_zero.json", "--set", "train.precision=bf16", config=config)
    assert result.returncode == 0, result.stderr
    assert load_recipe(out).train.precision == "bf16" and "--set train.precision=bf16 chooses instead" in result.stdout
    assert not [line for line in carried_lines(result.stdout) if "fp16" in line]
    assert "- fp16.initial_scale_power: fp16 is not carried over" in result.stdout


def test_every_key_deepspeed_reads_has_a_reason_and_a_typo_gets_a_suggestion():
    """The table of DeepSpeed's keys decides: none of them is "a key DeepSpeed does not read"."""
    from sdtrain.errors import UserInputError
    from sdtrain.migrate.deepspeed import convert_config
    from sdtrain.migrate.deepspeed_known import TOP_LEVEL, ZERO
    from sdtrain.migrate.deepspeed_parallel import convert_zero
    from sdtrain.migrate.deepspeed_values import Converter
    from sdtrain.recipe import ModelConfig

    for key in sorted(TOP_LEVEL):
        c = Converter("ds_config.json")
        try:
            convert_config(c, {key: {}}, ModelConfig())
        except UserInputError:
            continue  # a converter of its own read it (and wants another type than {})
        assert not [d for d in c.dropped if d.ds_key == key and "reads no key" in d.reason], key
    for key in sorted(ZERO - {"stage"}):
        c = Converter("ds_config.json")
        try:
            convert_zero(c, {"stage": 3, key: 1}, "bf16", ModelConfig())
        except UserInputError:
            continue
        assert not [d for d in c.dropped if "not a key of DeepSpeed's" in d.reason], key
    c = Converter("ds_config.json")
    convert_config(c, {"zero_optimisation": {"stage": 2}, "torch_autocast": {"enabled": True}}, ModelConfig())
    reasons = {d.ds_key: d for d in c.dropped}
    assert "did you mean 'zero_optimization'" in reasons["zero_optimisation"].reason
    assert "typo" not in reasons["torch_autocast"].reason and reasons["torch_autocast"].numerics


def test_documented_keys_are_listed_with_their_reason(tmp_path):
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 1},
              "torch_autocast": {"enabled": True, "dtype": "bfloat16"}, "graph_harvesting": False}
    result, _ = run_import(tmp_path, "documented.json", config=config)
    assert result.returncode == 2 and "torch_autocast" in result.stderr and "tensor_parallel" not in result.stderr
    assert "- tensor_parallel: AutoTP" in result.stdout and "- graph_harvesting" in result.stdout
    assert "typo" not in result.stdout
    result, out = run_import(tmp_path, "documented.json", "--set", "train.precision=bf16", config=config)
    assert result.returncode == 0, result.stderr  # the precision chosen settles torch_autocast
    assert load_recipe(out).train.precision == "bf16"


def test_account_says_what_the_recipe_trains_on(tmp_path):
    result, out = run_import(tmp_path, "zero2_bf16.json")
    assert result.returncode == 0, result.stderr
    for text in (result.stdout, out.read_text()):
        assert "a ds_config has neither" in text and "built-in GPT" in text
        assert "--set model.n_layers=" in text and "--set data.source=PATH" in text
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("hello world\n" * 2000)
    result, out = run_import(tmp_path, "zero2_bf16.json", "--set", f"data.source={corpus}", "--set", "model.n_layers=2")
    assert result.returncode == 0, result.stderr
    assert f"data: {corpus} (your --set data.source)" in result.stdout and "your --set model.*" in result.stdout


NEXT = [("zero2_bf16.json", ()), ("zero3_offload.json", ()), ("fp16_warmup_decay.json", ()),
        ("pipeline_bf16.json", ()), ("hf_trainer_auto.json", ("--set", "train.micro_batch_size=4", "--lenient"))]


def next_command(stdout: str) -> list[str]:
    import shlex

    line = next(line for line in stdout.splitlines() if "next: " in line)
    command = shlex.split(line.split("next: ", 1)[1].split("  (", 1)[0])
    assert command[:2] == ["sdtrain", "launch"]
    return command[2:]


@pytest.mark.parametrize("name, args", NEXT)
def test_the_printed_next_command_launches_the_written_recipe(tmp_path, name, args):
    result, out = run_import(tmp_path, name, *args)
    assert result.returncode == 0, result.stderr
    launch = sdtrain("launch", *next_command(result.stdout), "--dry-run", "--json", "--run-dir", tmp_path / "run")
    assert launch.returncode == 0, launch.stderr
    config, plan = ds(name), json.loads(launch.stdout)
    sizes = [config.get(k) for k in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")]
    if all(isinstance(size, int) for size in sizes):
        # The three batch sizes fix the world size, and the recipe says it: 32 / (4 x 4) = 2 here.
        assert plan["world_size"] == sizes[0] // (sizes[1] * sizes[2]) > 1


def test_three_batch_sizes_that_do_not_divide_exit_2(tmp_path):
    config = {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 4}
    result, out = run_import(tmp_path, "odd.json", config=config)
    assert result.returncode == 2 and "DeepSpeed refuses it too" in result.stderr and not out.exists()


def test_tensorboard_without_the_extra_is_written_off(tmp_path):
    from importlib.util import find_spec

    config = {"train_micro_batch_size_per_gpu": 2, "tensorboard": {"enabled": True, "output_path": "tb/"}}
    result, out = run_import(tmp_path, "tb.json", config=config)
    assert result.returncode == 0, result.stderr
    installed = find_spec("tensorboard") is not None
    assert load_recipe(out).log.tensorboard is installed
    if not installed:
        assert "- tensorboard.enabled: true, but tensorboard is not installed" in result.stdout
    launch = sdtrain("launch", *next_command(result.stdout), "--dry-run", "--run-dir", tmp_path / "run")
    assert launch.returncode == 0, launch.stderr


def test_imported_recipe_trains_two_steps_as_written(tmp_path):
    """One real launch of the next command (2 workers, as the config's batch sizes say)."""
    result, _ = run_import(tmp_path, "zero2_bf16.json")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "run"
    short = ["train.steps=2", "train.warmup_steps=1", "data.max_bytes=262144", "log.every=1", "checkpoint.at_end=false",
             "model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.seq_len=32"]  # seconds, not a minute
    launch = sdtrain("launch", *next_command(result.stdout), *[arg for s in short for arg in ("--set", s)],
                     "--run-dir", run, env={"OMP_NUM_THREADS": "1"})
    assert launch.returncode == 0, launch.stderr
    assert [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in m] == [1, 2]


@pytest.mark.parametrize("schedule", ["WarmupLR", "WarmupDecayLR", "WarmupCosineLR"])
def test_deepspeed_defaults_written_out_never_block(schedule):
    """Public configs write DeepSpeed's defaults out ("last_batch_iteration": -1, bf16 master
    weights false): a value that is DeepSpeed's default changes nothing, so it is carried, not "!"."""
    from sdtrain.migrate.deepspeed import convert_config
    from sdtrain.migrate.deepspeed_values import Converter
    from sdtrain.recipe import ModelConfig

    def blocking(config):
        c = Converter("ds_config.json")
        convert_config(c, config, ModelConfig())
        return [d.ds_key for d in c.dropped if d.numerics]

    params = {"warmup_num_steps": 10, "warmup_type": "linear", "last_batch_iteration": -1}
    if schedule != "WarmupLR":  # the one that runs until the script stops
        params["total_num_steps"] = 100
    config = {"train_micro_batch_size_per_gpu": 2, "scheduler": {"type": schedule, "params": params},
              "bf16": {"enabled": True, "bf16_master_weights_and_grads": False, "bf16_optimizer_states": False},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "bias_correction": True, "amsgrad": False,
                                                         "fp32_optimizer_states": True, "set_grad_none": True}}}
    assert blocking(config) == []
    params["last_batch_iteration"] = 500  # starts the schedule part-way: other LRs
    config["bf16"].update(bf16_master_weights_and_grads=True, bf16_optimizer_states=True)
    config["optimizer"]["params"].update(fp32_optimizer_states=False)
    assert sorted(blocking(config)) == ["bf16.bf16_master_weights_and_grads", "bf16.bf16_optimizer_states",
                                        "optimizer.params.fp32_optimizer_states", "scheduler.params.last_batch_iteration"]


def test_every_schedule_parameter_given_is_accounted_for():
    """A floor of 0 written out is DeepSpeed's default and sdtrain's start: carried, and said so."""
    from sdtrain.migrate.deepspeed_optim import convert_scheduler
    from sdtrain.migrate.deepspeed_values import Converter

    for schedule, floor in [("WarmupLR", "warmup_min_lr"), ("WarmupDecayLR", "warmup_min_lr"),
                            ("WarmupCosineLR", "warmup_min_ratio")]:
        c = Converter("ds_config.json")
        params = {"warmup_type": "linear", floor: 0, "last_batch_iteration": -1}
        params.update({} if schedule == "WarmupLR" else {"total_num_steps": 10})
        convert_scheduler(c, {"type": schedule, "params": params})
        listed = {entry.ds_key for entry in c.carried + c.dropped + c.autos}
        assert {f"scheduler.params.{key}" for key in params} <= listed, schedule
        assert not [d for d in c.dropped if d.numerics], schedule


def test_a_schedule_parameter_its_class_does_not_take_is_listed():
    """DeepSpeed builds the schedule with params as keywords: WarmupLR has no total_num_steps and
    WarmupCosineLR no warmup_max_lr (a TypeError there), so neither passes unlisted."""
    from sdtrain.migrate.deepspeed_optim import convert_scheduler
    from sdtrain.migrate.deepspeed_values import Converter

    for schedule, extra in [("WarmupLR", "total_num_steps"), ("WarmupCosineLR", "warmup_max_lr")]:
        c = Converter("ds_config.json")
        convert_scheduler(c, {"type": schedule, "params": {"warmup_type": "linear", "total_num_steps": 10, extra: 5}})
        assert [d.ds_key for d in c.dropped if d.numerics] == [f"scheduler.params.{extra}"], schedule


CONTROL = {"\u001b[2Jzz": 1, "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "\u001b]0;x\u0007Lamb"}}


def test_control_characters_of_a_config_are_shown_escaped_and_the_recipe_still_launches(tmp_path):
    result, out = run_import(tmp_path, "ctl.json", config=CONTROL)
    assert result.returncode == 2 and not out.exists()
    for text in (result.stdout, result.stderr):
        assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b[2Jzz" in result.stdout and "\\x1b]0;x\\x07Lamb" in result.stdout
    result, out = run_import(tmp_path, "ctl.json", "--lenient", config=CONTROL)
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x1b" not in out.read_text() and "\\x1b[2Jzz" in out.read_text()
    launch = sdtrain("launch", *next_command(result.stdout), "--dry-run", "--run-dir", tmp_path / "run")
    assert launch.returncode == 0, launch.stderr  # the comments are valid YAML


def test_out_is_never_overwritten_without_force_and_a_dash_path_launches(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 2}))
    (tmp_path / "-r.yaml").write_text("mine\n")
    result = sdtrain("import-deepspeed", "ds.json", "--out", "-r.yaml", cwd=tmp_path)
    assert result.returncode == 2 and "already exists; pass --force" in result.stderr
    assert (tmp_path / "-r.yaml").read_text() == "mine\n"
    result = sdtrain("import-deepspeed", "ds.json", "--out", "-r.yaml", "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert next_command(result.stdout) == ["./-r.yaml"]  # "-r.yaml" would be read as an option
    launch = sdtrain("launch", *next_command(result.stdout), "--dry-run", "--run-dir", tmp_path / "run", cwd=tmp_path)
    assert launch.returncode == 0, launch.stderr
