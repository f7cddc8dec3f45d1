"""Hugging Face at both ends: model.init_from reads a transformers folder (GPT-2 here; LLaMA
and Mixtral in test_hf_llama.py), `sdtrain export --format hf` writes one transformers loads,
and the logits agree with transformers' on both sides."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from conftest import TINY, launch_run, merge, sdtrain

transformers = pytest.importorskip("transformers")

from sdtrain.model.gpt import GPT, GPTConfig  # noqa: E402
from sdtrain.model.hf_files import HFFolderError  # noqa: E402
from sdtrain.model.hf_import import HFWeights, load_hf_model, load_pretrained  # noqa: E402

TOL = 1e-4
SHAPE = {"n_layers": 2, "d_model": 32, "n_heads": 2, "seq_len": 32, "vocab_size": 256}


def save_hf(model, folder):
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A tiny GPT-2 with random weights, as transformers makes and saves it (the exact GELU;
    GPT-2's own tanh form: test_gpt2_tanh_gelu), with more positions than the recipe uses."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=256, n_positions=48, n_embd=32, n_layer=2, n_head=2,
                                     activation_function="gelu", bos_token_id=0, eos_token_id=0)
    return save_hf(transformers.GPT2LMHeadModel(config).eval(), tmp_path_factory.mktemp("hf") / "gpt2")


def hf_logits(folder, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits, type(model).__name__


def sdtrain_logits(model, tokens):
    with torch.no_grad():
        return model.logits(model(tokens))


def tokens(n=2, t=32):
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(1))


def test_gpt2_init_from_gives_transformers_logits(hf_gpt2):
    model = GPT(GPTConfig(**SHAPE), seed=7).eval()
    load_pretrained(model, hf_gpt2)
    theirs, _ = hf_logits(hf_gpt2, tokens())
    assert (sdtrain_logits(model, tokens()) - theirs).abs().max() < TOL
    assert (sdtrain_logits(load_hf_model(hf_gpt2), tokens()) - theirs).abs().max() < TOL  # sdtrain generate's way


def test_gpt2_tanh_gelu(tmp_path):
    """OpenAI's GPT-2 weights go with the tanh-approximated GELU (gelu_new, transformers'
    default for GPT-2): model.activation gelu_tanh, which the launcher asks for by name."""
    torch.manual_seed(0)
    folder = save_hf(transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval(), tmp_path / "gpt2")
    model = GPT(GPTConfig(**SHAPE, activation="gelu_tanh")).eval()
    load_pretrained(model, folder)
    theirs, _ = hf_logits(folder, tokens())
    assert (sdtrain_logits(model, tokens()) - theirs).abs().max() < TOL
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe({"model": {"init_from": str(folder)}})))
    result = sdtrain("launch", path, "--dry-run")
    assert result.returncode == 2 and "model.activation is 'gelu'" in result.stderr and "gelu_tanh" in result.stderr
    assert sdtrain("launch", path, "--dry-run", "--set", "model.activation=gelu_tanh").returncode == 0
    # and back: export's tensors and config.json (gelu_new) give transformers the same model
    from sdtrain.model.hf_config import hf_config
    from sdtrain.model.hf_export import hf_tensors, write_weights

    from sdtrain.recipe import ModelConfig

    section = ModelConfig(**SHAPE, activation="gelu_tanh").model_dump()  # as a checkpoint's sdtrain.json holds it
    out = tmp_path / "out"
    out.mkdir()
    write_weights(out, hf_tensors(dict(model.state_dict()), section), 10**9)
    (out / "config.json").write_text(json.dumps(hf_config(section)))
    again, _ = hf_logits(out, tokens())
    assert (again - theirs).abs().max() < TOL
    result = sdtrain("launch", path, "--dry-run", "--set", "model.activation=gelu_tanh", "--set", "model.arch=llama")
    assert result.returncode == 2 and "activation gelu_tanh is a gpt2 setting" in result.stderr


def test_meta_device_model_reads_its_values_later(hf_gpt2):
    """ZeRO builds the model on the meta device and makes each weight later through
    model.initial_value: that must give the folder's values too."""
    whole = GPT(GPTConfig(**SHAPE))
    load_pretrained(whole, hf_gpt2)
    with torch.device("meta"):
        meta = GPT(GPTConfig(**SHAPE))
    load_pretrained(meta, hf_gpt2)
    for name, param in whole.named_parameters():
        out = torch.empty(param.shape)
        meta.initial_value(name, out)
        assert torch.equal(out, param), name


def test_pipeline_stage_reads_only_its_blocks(hf_gpt2, monkeypatch):
    read = []
    original = HFWeights.read
    monkeypatch.setattr(HFWeights, "read", lambda self, name, out, first=0: (read.append(name), original(self, name, out, first)))
    stage = GPT(GPTConfig(**SHAPE), layers=[1], first=False, last=True)
    load_pretrained(stage, hf_gpt2)
    assert read and all(name.startswith(("blocks.1.", "ln_f.", "lm_head.")) for name in read), read
    whole = load_hf_model(hf_gpt2)
    assert torch.equal(stage.lm_head.weight, whole.tok_emb.weight)  # the stage's copy of the tied head
    assert torch.equal(stage.blocks["1"].attn.qkv.weight, whole.blocks["1"].attn.qkv.weight)


def recipe(extra: dict) -> dict:
    return merge(TINY, merge({"model": SHAPE, "checkpoint": {"at_end": True}}, extra))


def test_launch_refuses_a_recipe_the_folder_does_not_describe(hf_gpt2, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe({"model": {"init_from": str(hf_gpt2), "n_layers": 3}})))
    result = sdtrain("launch", path, "--dry-run")
    assert result.returncode == 2
    assert "model.n_layers is 3" in result.stderr and "says 2 (n_layer)" in result.stderr, result.stderr
    result = sdtrain("launch", path, "--dry-run", "--set", "model.n_layers=2", "--set", "model.seq_len=64")
    assert result.returncode == 2 and "48 positions" in result.stderr, result.stderr
    assert sdtrain("launch", path, "--dry-run", "--set", "model.n_layers=2").returncode == 0


def rewrite_header(path, tensor, **change):
    """A safetensors file whose header says something else of `tensor` (its bytes unchanged)."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    header[tensor].update(change)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length:])


def bad_folder(tmp_path, hf_gpt2, change) -> str:
    folder = tmp_path / "bad"
    shutil.copytree(hf_gpt2, folder)
    change(folder)
    return str(folder)


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "config.json").unlink(), "has no config.json"),
    (lambda f: (f / "config.json").write_text("[1]"), "not a JSON object"),
    (lambda f: (f / "config.json").write_text('{"model_type": "bert"}'), "model_type 'bert' is not one sdtrain builds"),
    (lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                          "activation_function": "relu"})), "'relu'"),
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "pickle file, which sdtrain never loads"),
    (lambda f: ((f / "model.safetensors").unlink(), (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"transformer.wte.weight": "../model.safetensors"}}))), "not a path"),
    (lambda f: rewrite_header(f / "model.safetensors", "transformer.wte.weight", dtype="I32"), "is I32"),
    (lambda f: rewrite_header(f / "model.safetensors", "transformer.wte.weight", shape=[128, 32]), "do not match"),
])
def test_bad_folders_are_named_before_launch(hf_gpt2, tmp_path, change, message):
    folder = bad_folder(tmp_path, hf_gpt2, change)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe({"model": {"init_from": folder}})))
    result = sdtrain("launch", path, "--dry-run")
    # the console wraps at its width, where the temporary path's length puts the break
    assert result.returncode == 2 and message in " ".join(result.stderr.split()), result.stderr
    assert "Traceback" not in result.stderr


def test_tensor_shapes_are_checked_before_reading(hf_gpt2, tmp_path):
    """A config.json that lies about its weights: named per tensor, nothing read."""
    folder = bad_folder(tmp_path, hf_gpt2, lambda f: None)
    model = GPT(GPTConfig(**{**SHAPE, "vocab_size": 300}))
    before = model.blocks["0"].attn.qkv.weight.clone()
    with pytest.raises(HFFolderError, match=r"transformer.wte.weight has shape \[256, 32\].*needs \[300, 32\]"):
        load_pretrained(model, folder)
    assert torch.equal(model.blocks["0"].attn.qkv.weight, before)


def test_recipe_from_hf_prints_a_model_section_launch_takes(hf_gpt2, tmp_path):
    result = sdtrain("recipe", "from-hf", hf_gpt2)
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)["model"]
    assert model["init_from"] == str(hf_gpt2) and model["seq_len"] == 48
    assert (model["n_layers"], model["d_model"], model["n_heads"], model["vocab_size"]) == (2, 32, 2, 256)
    out = tmp_path / "model.yaml"
    assert sdtrain("recipe", "from-hf", hf_gpt2, "-o", out).returncode == 0
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, {"model": yaml.safe_load(out.read_text())["model"]})))
    assert sdtrain("launch", path, "--dry-run").returncode == 0
    assert sdtrain("recipe", "from-hf", tmp_path / "nope").returncode == 2
    assert "data" not in yaml.safe_load(result.stdout)
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(hf_gpt2, folder)
    (folder / "tokenizer.json").write_text("{}")
    result = sdtrain("recipe", "from-hf", folder)
    assert yaml.safe_load(result.stdout)["data"] == {"tokenizer": str(folder / "tokenizer.json")}


def exported_logits_match(run_dir, out, tmp_path, architecture):
    """transformers loads the export, and its logits are the checkpoint's in sdtrain's model."""
    from sdtrain.train.export import load_model_weights

    weights, info = load_model_weights(run_dir)
    model = GPT(GPTConfig(**info["model"])).eval()
    model.load_state_dict(weights, strict=False)
    missing = {n for n, _ in model.named_parameters()} - set(weights)
    assert not missing, missing
    theirs, name = hf_logits(out, tokens())
    assert name == architecture
    assert (sdtrain_logits(model, tokens()) - theirs).abs().max() < TOL
    return weights


def test_gpt2_launch_zero3_two_ranks_then_export_loads_in_transformers(hf_gpt2, tmp_path):
    """init_from in a real 2-rank ZeRO-3 run (the meta-device path), a few steps, export."""
    lr, steps = 3e-3, 3
    run = launch_run(tmp_path, "run", 2, recipe({"model": {"init_from": str(hf_gpt2)},
                                                 "train": {"steps": steps, "lr": lr, "warmup_steps": 0},
                                                 "parallel": {"zero_stage": 3}}))
    out = tmp_path / "hf"
    result = sdtrain("export", run, out, "--format", "hf")
    assert result.returncode == 0, result.stderr
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "generation_config.json"}
    weights = exported_logits_match(run, out, tmp_path, "GPT2LMHeadModel")
    # The run started from the folder's weights: Adam moves a weight by about lr a step, while
    # a name-seeded start would differ from them by ~0.02 everywhere.
    first = GPT(GPTConfig(**SHAPE))
    load_pretrained(first, hf_gpt2)
    moved = max((weights[n] - p).abs().max().item() for n, p in first.named_parameters())
    assert moved < 2 * steps * lr
    # again into the same folder: refused without --force, replaced with it
    assert sdtrain("export", run, out, "--format", "hf").returncode == 2
    assert sdtrain("export", run, out, "--format", "hf", "--force").returncode == 0


def test_export_shards_above_max_shard_size(hf_gpt2, tmp_path, full_run):
    _, run = full_run
    out = tmp_path / "hf"
    result = sdtrain("export", run, out, "--format", "hf", "--max-shard-size", "20KB")
    assert result.returncode == 0, result.stderr
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    exported_logits_match(run, out, tmp_path, "GPT2LMHeadModel")
    assert sdtrain("export", run, tmp_path / "x", "--format", "hf", "--max-shard-size", "lots").returncode == 2


def test_init_from_a_sharded_bf16_folder(hf_gpt2, tmp_path):
    """save_pretrained's shards (model.safetensors.index.json) in bf16: read and widened."""
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_gpt2).to(torch.bfloat16)
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    model = GPT(GPTConfig(**SHAPE))
    load_pretrained(model, folder)
    assert torch.equal(model.tok_emb.weight, hf.transformer.wte.weight.float())
    assert torch.equal(model.blocks["1"].mlp.fc.weight, hf.transformer.h[1].mlp.c_fc.weight.float().t())


def test_export_copies_the_runs_tokenizer(full_run, tmp_path):
    _, run = full_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"model": {}}')
    recipe = yaml.safe_load((copy / "recipe.yaml").read_text())
    recipe["data"]["tokenizer"] = str(tokenizer)
    (copy / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "hf"
    assert sdtrain("export", copy, out, "--format", "hf").returncode == 0
    assert (out / "tokenizer.json").read_text() == tokenizer.read_text()
    tokenizer.unlink()  # named but gone: said, nothing written
    result = sdtrain("export", copy, tmp_path / "hf2", "--format", "hf")
    assert result.returncode == 2 and "tok.json" in result.stderr and not (tmp_path / "hf2").exists()


def test_export_force_replaces_only_a_model_folder(full_run, tmp_path):
    _, run = full_run
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    result = sdtrain("export", run, tmp_path / "notes", "--format", "hf", "--force")
    assert result.returncode == 2 and "holds no config.json" in result.stderr
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("moe, reason", [
    ({"arch": "gpt2", "moe": {"num_experts": 4, "every_n_layers": 1, "drop_tokens": False}}, "gpt2-arch model"),
    ({"arch": "llama", "moe": {"num_experts": 4, "every_n_layers": 2, "drop_tokens": False}}, "every_n_layers 2"),
    ({"arch": "llama", "moe": {"num_experts": 4, "every_n_layers": 1, "drop_tokens": True}}, "drop_tokens true"),
    ({"arch": "llama", "moe": {"num_experts": 4, "every_n_layers": 1, "drop_tokens": False, "balance": "bias"}},
     "balance bias"),
    ({"arch": "llama", "moe": {"num_experts": 4, "every_n_layers": 1, "drop_tokens": False, "top_k": 1}}, "top_k 1"),
])
def test_export_names_the_moe_settings_mixtral_lacks(moe, reason):
    from sdtrain.model.hf_config import export_problems

    problems = export_problems({**SHAPE, "n_heads": 4, **moe})
    assert len(problems) == 1 and reason in problems[0], problems
    assert export_problems({**SHAPE, "arch": "llama", "moe": {"num_experts": 4, "every_n_layers": 1,
                                                               "drop_tokens": False, "top_k": 2}}) == []


def test_export_of_a_gpt2_moe_run_is_refused_with_the_reason(tmp_path):
    run = launch_run(tmp_path, "moe", 1, recipe({"model": {"moe": {"num_experts": 2, "top_k": 1}},
                                                 "train": {"steps": 1, "warmup_steps": 0}}))
    result = sdtrain("export", run, tmp_path / "hf", "--format", "hf")
    assert result.returncode == 2 and "gpt2-arch model" in result.stderr and not (tmp_path / "hf").exists()



FIRST_EVAL = {"train": {"steps": 1, "warmup_steps": 0, "eval_every": 1}, "checkpoint": {"at_end": False}}


def first_eval(run) -> float:
    step, loss = json.loads((run / "summary.json").read_text())["eval_losses"][0]
    assert step == 0
    return loss


@pytest.fixture(scope="module")
def one_process_first_evals(hf_gpt2, tmp_path_factory):
    """The step-0 eval loss of one process started from the folder, and from the seed."""
    tmp = tmp_path_factory.mktemp("one")
    loaded = launch_run(tmp, "loaded", 1, recipe({**FIRST_EVAL, "model": {"init_from": str(hf_gpt2)}}))
    return first_eval(loaded), first_eval(launch_run(tmp, "seeded", 1, recipe(FIRST_EVAL)))


@pytest.mark.slow  # four launches; the meta-device path is in the fast ZeRO-3 test too
@pytest.mark.parametrize("zero_stage", [0, 1])
def test_gpt2_tensor_parallel_starts_from_the_folder(hf_gpt2, tmp_path, zero_stage, one_process_first_evals):
    """tp 2: pieces cut from the folder's whole tensors (stage 0 slices the real model's, ZeRO
    makes them from a meta-device model through initial_value), the vocabulary-parallel head
    from the embedding: the step-0 eval loss is one process's from the folder."""
    run = launch_run(tmp_path, "tp", 2, recipe({**FIRST_EVAL, "model": {"init_from": str(hf_gpt2)},
                                                "parallel": {"tensor_parallel": 2, "zero_stage": zero_stage}}))
    loaded, seeded = one_process_first_evals
    assert first_eval(run) == pytest.approx(loaded, abs=1e-5)
    assert seeded != pytest.approx(loaded, abs=1e-3)  # the check would see a seeded start


@pytest.mark.slow  # two launches
def test_a_resumed_run_needs_neither_the_folder_nor_its_name(hf_gpt2, tmp_path):
    """A run from init_from continues from its checkpoint: the folder may be gone by then, and
    a recipe without init_from resumes it as well (the weights are the checkpoint's)."""
    folder = tmp_path / "gpt2"
    shutil.copytree(hf_gpt2, folder)
    run = launch_run(tmp_path, "run", 1, recipe({"model": {"init_from": str(folder)},
                                                 "train": {"steps": 2, "warmup_steps": 0}}))
    shutil.rmtree(folder)
    launch_run(tmp_path, "run", 1, recipe({"model": {"init_from": str(folder)}, "train": {"steps": 3, "warmup_steps": 0}}),
               "train.resume=auto")
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_3"
    from sdtrain.launch.resume_target import recipe_problems
    from sdtrain.recipe import validate_recipe
    from sdtrain.train.checkpoint_verify import verify_checkpoint

    checkpoint = run / "checkpoints" / "step_3"
    without = validate_recipe(recipe({"train": {"steps": 4, "warmup_steps": 0}}), source="test")
    assert recipe_problems(without, checkpoint, verify_checkpoint(checkpoint)) == []
