"""Hugging Face at both ends with llama blocks: a LlamaForCausalLM with grouped-query
attention (n_kv_heads < n_heads) and an untied head, imported and exported (helpers: test_hf.py)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import TINY, launch_run, merge, sdtrain

transformers = pytest.importorskip("transformers")

from test_hf import TOL, exported_logits_match, hf_logits, save_hf, sdtrain_logits, tokens  # noqa: E402

from sdtrain.model.gpt import GPT, GPTConfig  # noqa: E402
from sdtrain.model.hf_import import load_hf_model, load_pretrained  # noqa: E402

SHAPE = {"arch": "llama", "n_layers": 2, "d_model": 32, "n_heads": 4, "n_kv_heads": 2, "seq_len": 32,
         "vocab_size": 256, "ffn_hidden": 48, "norm_eps": 1e-6, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0)
    return save_hf(transformers.LlamaForCausalLM(config).eval(), tmp_path_factory.mktemp("hf") / "llama")


def test_llama_init_from_gives_transformers_logits(hf_llama):
    model = GPT(GPTConfig(**SHAPE), seed=7).eval()
    load_pretrained(model, hf_llama)
    assert not model.cfg.tie_embeddings and model.lm_head.weight is not model.tok_emb.weight
    theirs, _ = hf_logits(hf_llama, tokens())
    assert (sdtrain_logits(model, tokens()) - theirs).abs().max() < TOL
    assert (sdtrain_logits(load_hf_model(hf_llama), tokens()) - theirs).abs().max() < TOL


def test_llama_recipe_from_hf_and_mismatch(hf_llama, tmp_path):
    result = sdtrain("recipe", "from-hf", hf_llama)
    assert result.returncode == 0, result.stderr
    model = yaml.safe_load(result.stdout)["model"]
    assert {k: model[k] for k in SHAPE} == SHAPE and model["tie_embeddings"] is False
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, {"model": {**model, "n_kv_heads": 4}})))
    result = sdtrain("launch", path, "--dry-run")
    assert result.returncode == 2 and "model.n_kv_heads is 4" in result.stderr and "says 2 (num_key_value_heads)" in result.stderr


def test_llama_pipeline_run_then_export_loads_in_transformers(hf_llama, tmp_path):
    """A 2-stage pipeline: each stage reads its own blocks, the last its own (untied) head."""
    run = launch_run(tmp_path, "run", 2, merge(TINY, {
        "model": {**SHAPE, "init_from": str(hf_llama)}, "checkpoint": {"at_end": True},
        "train": {"steps": 3, "global_batch_size": 4, "micro_batch_size": 2},
        "parallel": {"pipeline": {"stages": 2}}}))
    out = tmp_path / "hf"
    result = sdtrain("export", run, out, "--format", "hf")
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["tie_word_embeddings"]) == ("llama", 2, False)
    weights = exported_logits_match(run, out, tmp_path, "LlamaForCausalLM")
    first = GPT(GPTConfig(**SHAPE))
    load_pretrained(first, hf_llama)
    assert max((weights[n] - p).abs().max().item() for n, p in first.named_parameters()) < 2 * 3 * 3e-3


def test_tied_llama_round_trip(tmp_path):
    """tie_embeddings true: the export has no lm_head tensor (transformers ties it), and a
    folder without one imports with the head read from the embedding."""
    from sdtrain.model.hf_config import hf_config
    from sdtrain.model.hf_export import hf_tensors, write_weights
    from sdtrain.recipe import ModelConfig

    section = ModelConfig(**SHAPE, tie_embeddings=True).model_dump()
    model = GPT(GPTConfig(**section), seed=3).eval()
    out = tmp_path / "tied"
    out.mkdir()
    tensors = hf_tensors(dict(model.state_dict()), section)
    assert "lm_head.weight" not in tensors
    write_weights(out, tensors, 10**9)
    (out / "config.json").write_text(json.dumps(hf_config(section)))
    theirs, name = hf_logits(out, tokens())
    assert name == "LlamaForCausalLM" and (sdtrain_logits(model, tokens()) - theirs).abs().max() < TOL
    back = GPT(GPTConfig(**section), seed=4).eval()
    load_pretrained(back, out)
    assert back.lm_head.weight is back.tok_emb.weight
    assert torch.equal(sdtrain_logits(back, tokens()), sdtrain_logits(model, tokens()))


def test_llama3_rope_scaling(tmp_path):
    """Llama 3.1/3.2's rotary scaling (rope_type llama3, as their config.json has it): imported
    with equal logits at positions past original_max_position_embeddings, and exported back."""
    from sdtrain.model.hf_config import hf_config
    from sdtrain.model.hf_export import hf_tensors, write_weights
    from sdtrain.recipe import ModelConfig

    torch.manual_seed(0)
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                      rms_norm_eps=1e-6, rope_parameters={**scaling, "rope_theta": 500000.0})
    folder = save_hf(transformers.LlamaForCausalLM(config).eval(), tmp_path / "llama3")
    result = sdtrain("recipe", "from-hf", folder)
    assert result.returncode == 0, result.stderr
    section = ModelConfig(**yaml.safe_load(result.stdout)["model"]).model_dump()
    assert section["rope_scaling"] == scaling and section["rope_theta"] == 500000.0
    model = GPT(GPTConfig(**section)).eval()
    load_pretrained(model, folder)
    theirs, _ = hf_logits(folder, tokens())
    plain = GPT(GPTConfig(**{**section, "rope_scaling": None})).eval()
    load_pretrained(plain, folder)  # (a recipe without the scaling is refused at launch; here: it matters)
    assert (sdtrain_logits(plain, tokens()) - theirs).abs().max() > 10 * TOL
    assert (sdtrain_logits(model, tokens()) - theirs).abs().max() < TOL
    out = tmp_path / "out"
    out.mkdir()
    write_weights(out, hf_tensors(dict(model.state_dict()), section), 10**9)
    (out / "config.json").write_text(json.dumps(hf_config(section)))
    again, _ = hf_logits(out, tokens())
    assert (again - theirs).abs().max() < TOL
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merge(TINY, {"model": {**section, "rope_scaling": None}})))
    result = sdtrain("launch", path, "--dry-run")
    assert result.returncode == 2 and "model.rope_scaling is None" in result.stderr
